"""Lesson 14's probes on a real cluster (``make cluster-test``): the lesson's cluster replaces a
leftover and leaves nothing; the token bucket is the size the models assume; DDP across the nodes
trains like one process and sends what the ring all-reduce must, and a slow link makes its step
link-bound, as the token bucket's model says; and a node killed mid-run leaves a job that goes
on from its checkpoint, told by the agents' logs in order."""

import json
import math
import subprocess

import pytest
from cluster_support import leftovers, needs_cluster, single_process

from course_utils import cluster
from course_utils import many_machines as mm

pytestmark = needs_cluster
NAME = "slowlessonmm"
SETTINGS = dict(model="cnn", batch_size=64, seed=0)


@pytest.fixture
def made():
    up = mm.bring_up(NAME, nodes=2, rate="1gbit")
    try:
        yield up
    finally:
        assert mm.take_down(NAME) == []
        assert leftovers(NAME) == [], leftovers(NAME)


def close(a: list[float], b: list[float]) -> bool:
    """Equal to float32 rounding: the same arithmetic, summed in another order."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a, b))


def bucket(where: str, device: str) -> dict:
    out = subprocess.run(
        ["tc", "-j", "-n", where, "qdisc", "show", "dev", device], capture_output=True, text=True
    ).stdout
    return json.loads(out)[0]["options"]


def test_the_lessons_cluster_replaces_a_leftover_and_its_buckets_are_the_models():
    cluster.up(cluster.Cluster(NAME, 2, "20mbit"))  # what a crashed kernel left behind
    try:
        made = mm.bring_up(NAME, nodes=2, rate="1gbit")
        assert cluster.status(NAME)["rate"] == "1gbit"
        for rate in ("1gbit", "20mbit"):
            cluster.set_rate(made, rate)
            for where, device in ((made.namespace(1), "eth0"), (made.switch, "node1")):
                options = bucket(where, device)
                assert options["rate"] == cluster.rate_bytes(rate)
                assert options["burst"] == pytest.approx(cluster.burst_bytes(rate), rel=1e-3)
    finally:
        assert mm.take_down(NAME) == []
    assert leftovers(NAME) == []


def test_ddp_across_the_nodes_sends_what_the_ring_must_and_a_slow_link_binds_its_step(
    made, tmp_path
):
    slow, steps, grad = "20mbit", 8, mm.gradient_bytes()
    times, runs = mm.step_sweep(made, tmp_path, [mm.UNLIMITED, slow], steps)
    assert cluster.status(NAME)["rate"] == "1gbit"  # the sweep put the rate back
    one = single_process(steps=steps, **SETTINGS)["losses"]
    for run in runs.values():
        assert close(run["result"]["losses"], one)
        for node in (0, 1):  # the model is what must cross; the rest is a small extra
            predicted = mm.predicted_sent(grad, steps, node)
            assert predicted <= run["sent"][node] < 1.05 * predicted, (node, run["sent"])
        assert run["received"][1] == pytest.approx(run["sent"][0], rel=0.01)  # via the bridge
        _, sent = zip(*run["trace"])
        assert list(sent) == sorted(sent)  # node 1's sent bytes (its received are a gradient more)
        assert 0.99 * run["sent"][1] <= sent[-1] <= run["sent"][1]
        assert 0 < run["step_s"] < run["result"]["wall_s"]
    # whatever the bucket's credit, a link-bound step takes the gradient's time at the rate
    assert times[slow].median > 0.9 * mm.link_seconds(grad, slow)
    ratio = times[slow].median / mm.bucket_step(times[mm.UNLIMITED].median, grad, 2, slow)
    assert 0.8 < ratio < 1.6, ratio
    rate, burst = cluster.rate_bytes(slow), cluster.burst_bytes(slow)
    trace = runs[slow]["trace"]
    for (t0, b0), (t1, b1) in zip(trace, trace[5:]):  # never faster than the bucket allows
        assert b1 - b0 <= rate * (t1 - t0) + burst + 65536, (t0, t1, b1 - b0)


def test_a_node_killed_mid_run_leaves_a_job_that_goes_on_from_its_checkpoint(made, tmp_path):
    steps, every = 10, 5
    run = mm.survive_node_loss(made, tmp_path, steps, every, SETTINGS["batch_size"])
    assert run["codes"] == {0: 0, 1: -9}
    result = run["result"]
    assert result["nproc"] == 1 and result["resumed_from_step"] == every
    assert close(result["losses"], single_process(steps=steps, **SETTINGS)["losses"])
    story = [(e["event"], e["node"]) for e in run["events"]]
    first = [e for e in run["events"] if e["event"] == "rendezvous"][:2]
    assert {e["node"] for e in first} == {0, 1} and all(e["nodes"] == 2 for e in first)
    after = story[story.index(("killed", 1)) :]
    assert after[:3] == [("killed", 1), ("failed", 0), ("rendezvous", 0)]
    assert after[-1] == ("finished", 0)
    failed = next(e["t"] for e in run["events"] if e["event"] == "failed")
    rejoined = next(e for e in run["events"] if e["event"] == "rendezvous" and e["round"] == 1)
    assert rejoined["nodes"] == 1
    assert 0.5 < (rejoined["t"] - failed) / mm.rejoin_seconds() < 2.0
