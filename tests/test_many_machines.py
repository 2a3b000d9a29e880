"""Lesson 14 (many machines) without a cluster: the arithmetic it predicts with, against hand
calculation; the agents' log lines read into a timeline; its figures drawn from made-up data;
the lesson's own functions against the package's; and the whole lesson run where no cluster can
be made, as on a laptop without root. The probes on a real cluster are in
``tests/cluster/test_many_machines_cluster.py``."""

import math
import subprocess
import sys

import matplotlib.colors as mcolors
import pytest
from conftest import ROOT, lesson_without_a_cluster, notebook_functions

import course_utils as cu
from course_utils import cluster
from course_utils import many_machines as mm
from course_utils.cluster import torchrun

NOTEBOOK = ROOT / "notebooks" / "14_many_machines.ipynb"
B = 1_000_000  # a made-up gradient, bytes


# --- what the link must carry -------------------------------------------------------------


def test_the_cnns_gradient_is_four_bytes_per_parameter():
    conv1, conv2, fc = 1 * 32 * 25 + 32, 32 * 64 * 25 + 64, 64 * 7 * 7 * 10 + 10
    assert mm.gradient_bytes("cnn") == 4 * (conv1 + conv2 + fc) == 4 * 83_466


@pytest.mark.parametrize(
    "nodes, workers, link, loopback",
    [
        (2, 1, 1.0, 0.0),  # a ring of 2: one gradient each way, all of it on the link
        (2, 2, 1.5, 1.5),  # a ring of 4: 2(4-1)/4 per rank; rank 0 -> 1 stays home
        (4, 2, 1.75, 1.75),
        (2, 4, 1.75, 5.25),  # 3 of a node's 4 ranks send to a neighbour on the same node
        (1, 4, 0.0, 6.0),  # one node: the whole ring on loopback
        (1, 1, 0.0, 0.0),
    ],
)
def test_a_ring_ordered_by_rank_sends_one_ranks_share_off_each_node(nodes, workers, link, loopback):
    assert mm.ring_link_bytes(B, nodes, workers) == pytest.approx(link * B)
    assert mm.ring_loopback_bytes(B, nodes, workers) == pytest.approx(loopback * B)


def test_node_0_sends_the_weights_once_more_than_the_others():
    assert mm.predicted_sent(B, 10, node=0) == 11 * B
    assert mm.predicted_sent(B, 10, node=1) == 10 * B
    assert mm.predicted_sent(B, 10, node=3, world_size=4) == pytest.approx(15 * B)


def test_the_bucket_is_two_milliseconds_at_the_rate_and_never_under_256_kib():
    assert (
        cluster.burst_bytes("20mbit") == cluster.burst_bytes("1gbit") == 256 * 1024
    )  # 2 ms: 250 kB
    assert cluster.burst_bytes("10gbit") == 2_500_000


def test_tcp_puts_1514_bytes_on_the_wire_for_every_1448_it_carries():
    assert mm.WIRE == pytest.approx(1514 / 1448)


def test_link_time_and_the_alpha_beta_step_by_hand():
    wire = 1514 / 1448
    assert mm.link_seconds(2_500_000, "20mbit") == pytest.approx(1.0)
    assert mm.link_seconds(B, mm.UNLIMITED) == 0.0
    assert mm.alpha_beta_step(0.05, B, 2, "20mbit") == pytest.approx(0.05 + wire * 0.4)
    assert mm.alpha_beta_step(0.05, B, 2, "20mbit", alpha=1e-3) == pytest.approx(
        0.05 + 2e-3 + wire * 0.4
    )
    assert mm.alpha_beta_step(0.05, B, 4, "20mbit") == pytest.approx(0.05 + wire * 1.5 * 0.4)
    assert mm.alpha_beta_step(0.05, B, 2, mm.UNLIMITED) == 0.05


def test_the_token_bucket_lends_the_idle_links_time():
    wire = 1514 / 1448
    # slow: 2.5 MB/s x 50 ms = 125 kB of credit, below the burst: the step is bytes / rate
    assert mm.bucket_step(0.05, B, 2, "20mbit") == pytest.approx(wire * B / 2.5e6)
    # fast: the credit is the whole burst, the rest goes at 125 MB/s
    fast = 0.05 + (wire * B - 262_144) / 1.25e8
    assert mm.bucket_step(0.05, B, 2, "1gbit") == pytest.approx(fast)
    assert mm.bucket_step(0.05, 200_000, 2, "1gbit") == 0.05  # the gradient fits in the burst
    assert mm.bucket_step(0.05, B, 2, mm.UNLIMITED) == 0.05
    for rate in ("5mbit", "20mbit", "100mbit", "1gbit"):  # never slower than a wire
        for compute in (0.001, 0.05, 1.0):
            assert mm.bucket_step(compute, B, 2, rate) <= mm.alpha_beta_step(compute, B, 2, rate)


def test_the_rendezvous_waits_for_the_missed_heartbeats_then_the_last_call():
    assert mm.rejoin_seconds() == 1 * 3 + 5  # the course's RDZV_CONF
    assert mm.rejoin_seconds("keep_alive_interval=2,last_call_timeout=1") == 2 * 3 + 1
    assert mm.rejoin_seconds("") == 5 * 3 + 30  # PyTorch's defaults


def test_the_entry_points_flags():
    args = mm.train_args(10, 64, "out.json", "--checkpoint", "c")
    assert args[:4] == ["--model", "cnn", "--parallel", "ddp"]
    assert args[args.index("--steps") + 1] == "10" and args[args.index("--batch-size") + 1] == "64"
    assert args[-4:] == ["--json", "out.json", "--checkpoint", "c"]


# --- the agents' logs, read into a timeline -------------------------------------------------

START = 15 * 3600 + 25 * 60 + 20.0  # the job started at 15:25:20 (second of the day)
AGENT = "I1207 15:25:{:09.6f} 12846 torch/distributed/elastic/agent/server/api.py:553] {}"
FAILED = "E1207 15:25:34.449000 12846 torch/distributed/elastic/multiprocessing/api.py:1002] "
LOG = [  # (node, seconds read, line) as an elastic job's two logs hold them
    (0, 7.0, AGENT.format(26.803, "[default] Rendezvous complete for workers. Result:")),
    (0, 7.0, AGENT.format(26.803, "  restart_count=0")),
    (0, 7.0, AGENT.format(26.803, "  group_world_size=2")),
    (1, 7.0, AGENT.format(26.801, "[default] Rendezvous complete for workers. Result:")),
    (1, 7.0, AGENT.format(26.801, "  restart_count=0")),
    (1, 7.0, AGENT.format(26.801, "  group_world_size=2")),
    (0, 14.39, "checkpoint: step 5 saved to /tmp/x/checkpoint/latest.pt"),
    (0, 14.6, "RuntimeError: [.../pair.cc:537] Read error [10.99.0.2]:44719: Connection reset"),
    (0, 14.64, FAILED + "failed (exitcode: 1) local_rank: 0 (pid: 12996) of binary: python"),
    (0, 22.03, AGENT.format(41.831, "[default] Rendezvous complete for workers. Result:")),
    (0, 22.03, AGENT.format(41.831, "  restart_count=1")),
    (0, 22.03, AGENT.format(41.831, "  group_world_size=1")),
    (0, 29.0, "checkpoint: step 10 saved to /tmp/x/checkpoint/latest.pt"),
    (0, 30.6, AGENT.format(50.406, "[default] worker group successfully finished. Waiting")),
]


def lines() -> list[dict]:
    return [mm.read_line(text, node, now, START) for node, now, text in LOG]


def test_an_agents_line_is_timed_by_its_own_clock_and_a_workers_when_read():
    first, *_, saved, error, failed = lines()[:9]
    assert first["t"] == pytest.approx(6.803) and first["node"] == 0
    assert first["agent"] == "[default] Rendezvous complete for workers. Result:"
    assert failed["t"] == pytest.approx(14.449)
    assert saved["t"] == 14.39 and "agent" not in saved and "agent" not in error
    late = mm.read_line(AGENT.format(1.0, "x").replace("15:25:", "00:00:"), 1, 0.0, 86399.0)
    assert late["t"] == pytest.approx(2.0)  # across midnight


def test_the_timeline_tells_the_rounds_the_checkpoints_the_kill_and_the_end():
    events = mm.timeline(lines(), killed_at=14.4, node=1)
    told = [(e["event"], e["node"], e.get("round"), e.get("nodes"), e.get("step")) for e in events]
    assert told == [
        ("rendezvous", 1, 0, 2, None),
        ("rendezvous", 0, 0, 2, None),
        ("checkpoint", 0, None, None, 5),
        ("killed", 1, None, None, None),
        ("failed", 0, None, None, None),
        ("rendezvous", 0, 1, 1, None),
        ("checkpoint", 0, None, None, 10),
        ("finished", 0, None, None, None),
    ]
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    rejoined = events[5]["t"] - events[4]["t"]
    assert rejoined == pytest.approx(41.831 - 34.449)


# --- a job's results --------------------------------------------------------------------------


def finished_job(tmp_path, *programs: str) -> torchrun.Job:
    """A job whose agents, one per node, are Python ``programs``, each printing to its log."""
    job = torchrun.Job(cluster.Cluster("jobtest", len(programs)))
    for node, program in enumerate(programs):
        job.logs[node] = tmp_path / f"node{node}.log"
        with open(job.logs[node], "wb") as log:
            job.agents[node] = subprocess.Popen([sys.executable, "-c", program], stdout=log)
    return job


def test_a_jobs_results_are_rank_0s_json_or_an_error_with_every_nodes_log(tmp_path):
    out = tmp_path / "run.json"
    wrote = f"import json; json.dump({{'losses': [1.0]}}, open({str(out)!r}, 'w'))"
    job = finished_job(tmp_path, wrote, "print('node 1 done')")
    assert torchrun.results(job, 30, out) == {"losses": [1.0]}
    assert [agent.returncode for agent in job.agents.values()] == [0, 0]
    job = finished_job(tmp_path, wrote, "print('node 1 lost'); raise SystemExit(9)")
    with pytest.raises(RuntimeError, match=r"exit codes \{0: 0, 1: 9\}") as failed:
        torchrun.results(job, 30, out)
    assert "node1: node 1 lost" in str(failed.value)
    assert torchrun.results(job, 30, out, lost=1) == {"losses": [1.0]}  # killed on purpose
    out.unlink()
    with pytest.raises(RuntimeError, match="wrote no"):
        torchrun.results(finished_job(tmp_path, "pass", "pass"), 30, out)
    job = finished_job(tmp_path, "print('stuck', flush=True); import time; time.sleep(60)", "pass")
    with pytest.raises(RuntimeError, match="ran past 1 s") as stuck:
        torchrun.results(job, 1, out)
    assert "node0: stuck" in str(stuck.value) and job.agents[0].poll() is not None  # stopped


# --- the lesson's cluster, where none can be made, and where one can ------------------------


def test_without_root_there_is_no_cluster_and_nothing_is_touched(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no cluster command may run here")

    monkeypatch.setattr(cluster, "unavailable", lambda: "the cluster needs root (test)")
    for name in ("up", "down", "existing"):
        monkeypatch.setattr(cluster, name, refuse)
    assert mm.bring_up("lessontest") is None
    assert mm.take_down("lessontest") == []


def test_bring_up_removes_a_leftover_first_and_takes_the_cluster_down_at_exit(monkeypatch):
    calls = []
    monkeypatch.setattr(cluster, "unavailable", lambda: None)
    monkeypatch.setattr(cluster, "down", lambda name: calls.append(("down", name)))
    monkeypatch.setattr(cluster, "up", lambda made: calls.append(("up", made.name)) or made)
    monkeypatch.setattr(mm.atexit, "register", lambda f, *a: calls.append(("at exit", f, *a)))
    made = mm.bring_up("lessontest", nodes=3, rate="20mbit")
    assert (made.name, made.nodes, made.rate) == ("lessontest", 3, "20mbit")
    at_exit = ("at exit", cluster.down, "lessontest")
    assert calls == [("down", "lessontest"), ("up", "lessontest"), at_exit]


def test_the_lesson_runs_every_cell_without_a_cluster(monkeypatch, capsys):
    namespace = lesson_without_a_cluster(NOTEBOOK, monkeypatch)
    printed = capsys.readouterr().out
    assert "no cluster here, predictions only" in printed and "needs root (test)" in printed
    assert "node1 will send (predicted)" in printed and "step predicted by token bucket" in printed
    assert namespace["made"] is None and namespace["times"] is None
    assert "Exercise 3: correct." in printed


# --- the figures ----------------------------------------------------------------------------


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_the_diagram_draws_each_node_its_address_its_workers_and_the_rate():
    fig = cu.plots.cluster_diagram(nodes=2, workers_per_node=2, rate="20mbit")
    (ax,) = fig.axes
    words = " ".join(texts(ax))
    for part in ("node0", "node1", "eth0 10.99.0.1", "eth0 10.99.0.2", "port node1", "br0"):
        assert part in words
    assert [f"worker, rank {r}" in texts(ax) for r in range(4)] == [True] * 4
    assert sum("token bucket 20mbit" in t for t in texts(ax)) == 2
    assert "no rate limit" in " ".join(texts(cu.plots.cluster_diagram(1, 1, None).axes[0]))


def test_the_step_figure_draws_measured_bars_with_spreads_and_a_marker_per_model():
    spread = cu.measure.spread
    rates = [mm.UNLIMITED, "1gbit", "20mbit"]
    measured = {
        mm.UNLIMITED: spread([0.05, 0.06]),
        "1gbit": spread([0.05]),
        "20mbit": spread([0.14]),
    }
    models = {
        "alpha-beta": dict(zip(rates, (0.05, 0.053, 0.19))),
        "bucket": dict(zip(rates, (0.05, 0.05, 0.134))),
    }
    fig = cu.plots.step_times(rates, measured, models)
    (ax,) = fig.axes
    assert [round(b.get_height(), 1) for b in ax.patches] == [55.0, 50.0, 140.0]  # ms
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == ["alpha-beta", "bucket", "measured (median)"]
    marks = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert marks["bucket"] == pytest.approx([50, 50, 134])
    assert [t.get_text() for t in ax.get_xticklabels()] == rates
    assert "measured and predicted" in ax.get_title()
    alone = cu.plots.step_times(rates, None, models).axes[0]
    assert not alone.patches and "predicted only" in alone.get_title()


def test_the_traffic_figure_draws_a_line_per_rate_and_the_slope_of_limited_ones():
    traces = {  # (seconds, bytes): 1 MB after start-up, at 2.5 MB/s on the slow link
        "unlimited": [(0.0, 0), (5.0, 100), (5.1, 500_000), (5.2, 1_000_000)],
        "20mbit": [(0.0, 0), (3.0, 100), (3.2, 500_000), (3.4, 1_000_000)],
    }
    fig = cu.plots.link_traffic(traces, {"20mbit": 2.5e6})
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"unlimited: bytes sent", "20mbit: bytes sent", "20mbit: the rate's slope"}
    assert lines["20mbit: bytes sent"].get_xdata()[2] == pytest.approx(0.0)  # from the first 2%
    (t0, t1), (y0, y1) = lines["20mbit: the rate's slope"].get_data()
    assert (y1 - y0) / (t1 - t0) == pytest.approx(2.5)  # MB per second


def test_the_elastic_timeline_draws_each_agents_phases_the_kill_and_the_checkpoints():
    events = mm.timeline(lines(), killed_at=14.4, node=1)
    fig = cu.plots.elastic_timeline(events)
    (ax,) = fig.axes
    colors = [mcolors.to_hex(b.get_facecolor()) for b in ax.patches]
    phases = {name: mcolors.to_hex(c) for name, c in cu.plots.many_machines.PHASE_COLORS.items()}
    node0 = [c for c, b in zip(colors, ax.patches) if b.get_y() < 0]  # lane 0 is centred at 0
    assert node0 == [phases[p] for p in ("agents start and meet", "job on all nodes",
                                          "waiting to rejoin", "job on fewer nodes")]  # fmt: skip
    assert len(colors) == 4 + 2  # node 1: start-up, then the job until it is killed
    assert [t.get_text() for t in ax.get_yticklabels()] == ["node0", "node1"]
    assert sorted(texts(ax)) == ["10", "5"]  # the checkpoints' steps
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == [*phases, "node killed", "checkpoint (its step)"]


# --- the lesson's exercises against the package --------------------------------------------


def test_the_lessons_answers_agree_with_the_package():
    names = ("link_bound_rate", "per_node_bytes", "loss_seconds")
    found = notebook_functions(NOTEBOOK, names, {"cu": cu})
    rate = found["link_bound_rate"](B, 0.05, 2)
    assert mm.alpha_beta_step(0.05, B, 2, f"{8 * rate:.3f}bit") == pytest.approx(0.1)
    for nodes, workers in [(2, 1), (2, 2), (3, 4), (1, 4), (1, 1)]:
        link, loop = found["per_node_bytes"](B, nodes, workers)
        assert math.isclose(link, mm.ring_link_bytes(B, nodes, workers), abs_tol=1e-6)
        assert math.isclose(loop, mm.ring_loopback_bytes(B, nodes, workers), abs_tol=1e-6)
    assert found["loss_seconds"](5, 0.1, 8.0, 3.0) == pytest.approx(11.5)
