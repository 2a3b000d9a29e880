"""The cluster on one machine (``scripts/cluster``, lesson 14): nodes that are network namespaces
come up and go away leaving nothing, the link's rate limit is real, and the course's entry point
runs across the nodes under torchrun, both rendezvous forms, with the losses of one process and
its gradients counted on the link."""

import json
import math
import subprocess
import sys
import time

import pytest
from cluster_support import host_links, leftovers, needs_cluster, running, single_process

from course_utils import cluster, collectives, models
from course_utils.cluster import torchrun

pytestmark = needs_cluster
AGENT_TIMEOUT_S = 180  # a 10-step job across the nodes takes 5-10 s here; c10d's join longer
SETTINGS = dict(model="cnn", batch_size=32, steps=10, seed=0)


def train_args(path, parallel="ddp") -> list[str]:
    flags = ["--model", "cnn", "--parallel", parallel, "--batch-size", "32", "--steps", "10"]
    return flags + ["--json", str(path)]


def close(a: list[float], b: list[float]) -> bool:
    """Equal to float32 rounding: the same arithmetic, summed in another order."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a, b))


def cluster_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "course_utils.cluster", *argv], capture_output=True, text=True
    )


def test_up_status_down_from_the_command_line_leave_the_host_as_it_was():
    before = host_links()
    made = cluster_cli("--name", "ctest", "up", "--nodes", "3", "--rate", "100mbit")
    assert made.returncode == 0, made.stderr
    try:
        assert "up in" in made.stdout and "10.99.0.3" in made.stdout
        state = json.loads(cluster_cli("--name", "ctest", "status").stdout)
        assert state["rate"] == "100mbit" and [n["node"] for n in state["nodes"]] == [
            "node0", "node1", "node2"
        ]  # fmt: skip
        assert all(n["link"] == "UP" for n in state["nodes"])
        assert host_links() == before  # every interface is inside the namespaces
        with pytest.raises(cluster.ClusterError, match="already up"):
            cluster.up(cluster.Cluster("ctest", 2))
        seen = cluster_cli("--name", "ctest", "run", "2", "--", "hostname")
        assert seen.stdout.strip() == "node2"
    finally:
        gone = cluster_cli("--name", "ctest", "down")
    assert gone.returncode == 0 and "removed 4 namespaces" in gone.stdout
    assert leftovers("ctest") == [] and host_links() == before
    assert cluster.down("ctest") == []  # twice is harmless


def test_a_bad_rate_is_refused_before_anything_is_made():
    with pytest.raises(ValueError, match="tc's units"):
        cluster.up(cluster.Cluster("ctest", 2, "fast"))
    assert leftovers("ctest") == []


def test_a_failure_halfway_through_up_removes_what_was_made(monkeypatch):
    calls = []
    real = cluster._run

    def fail_on_the_eighth(*argv, check=True):
        calls.append(argv)
        if len(calls) == 8:  # after the switch and the first node's namespace exist
            raise cluster.ClusterError("simulated: " + " ".join(argv))
        return real(*argv, check=check)

    monkeypatch.setattr(cluster, "_run", fail_on_the_eighth)
    with pytest.raises(cluster.ClusterError, match="simulated"):
        cluster.up(cluster.Cluster("ctest", 2, "1gbit"))
    monkeypatch.setattr(cluster, "_run", real)
    assert leftovers("ctest") == []


SENDER = """
import socket, sys, time
data = bytes(int(sys.argv[2]))
with socket.create_connection((sys.argv[1], 5000), timeout=30) as s:
    start = time.perf_counter(); s.sendall(data); s.shutdown(socket.SHUT_WR); s.recv(1)
    print(time.perf_counter() - start)
"""
RECEIVER = """
import socket
with socket.create_server(("0.0.0.0", 5000)) as server:
    print("ready", flush=True)
    conn, _ = server.accept()
    while conn.recv(1 << 20): pass
    conn.sendall(b"k"); conn.close()
"""


def transfer_seconds(made: cluster.Cluster, nbytes: int) -> float:
    """Seconds to send ``nbytes`` over TCP from node 0 to node 1."""
    receiver = cluster.spawn(made, 1, [sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE)
    try:
        assert receiver.stdout.readline().strip() == b"ready"
        argv = [sys.executable, "-c", SENDER, made.address(1), str(nbytes)]
        sent = subprocess.run(cluster.command(made, 0, argv), capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        return float(sent.stdout)
    finally:
        receiver.kill()
        receiver.wait()


def test_the_link_is_as_slow_as_its_rate_and_loopback_is_not():
    nbytes = 4_000_000
    with running("ctest", 2, "40mbit") as made:
        slow = transfer_seconds(made, nbytes)
        fast = transfer_seconds(cluster.set_rate(made, None), nbytes)
    at_rate = nbytes / cluster.rate_bytes("40mbit")  # 0.8 s; the bucket's burst goes at once
    assert 0.8 * at_rate < slow < 3 * at_rate, (slow, at_rate)  # above: a busy machine's slack
    assert fast < slow / 5, (fast, slow)


def gradient_bytes() -> int:
    return 4 * sum(p.numel() for p in models.MODELS["cnn"]().parameters())


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_across_two_nodes_trains_like_one_process(tmp_path, rdzv):
    out = tmp_path / "result.json"  # one shared file system: only global rank 0 writes it
    with running("ctest", 2, "1gbit") as made:
        before = [cluster.link_bytes(made, i) for i in range(2)]
        job = torchrun.job(made, train_args(out), logs=tmp_path, rdzv=rdzv, job_id="ctest")
        try:
            time.sleep(1)
            listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
            codes = torchrun.finish(job, timeout=AGENT_TIMEOUT_S)
        finally:
            job.stop()
        after = [cluster.link_bytes(made, i) for i in range(2)]
    assert codes == {0: 0, 1: 0}, job.log(0)[-2000:] + job.log(1)[-2000:]
    assert "torchrun" not in listening and "python" not in listening  # nothing on the host
    result = json.loads(out.read_text())
    assert result["nproc"] == 2 and close(result["losses"], single_process(**SETTINGS)["losses"])
    # The gradients crossed the link: each node sends a ring all-reduce's share of all of them per
    # step, and node 0 (rank 0) DDP's broadcast of the weights once; the rest (rendezvous, the
    # loss's sum, headers) is small.
    each_step = collectives.ring_bytes_sent(gradient_bytes(), 2)
    for node in range(2):
        least = SETTINGS["steps"] * each_step + (gradient_bytes() if node == 0 else 0)
        sent = after[node]["sent"] - before[node]["sent"]
        assert least < sent < 1.15 * least + 200_000, (node, sent, least)
