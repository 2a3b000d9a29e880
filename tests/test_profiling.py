"""--profile DIR: one torch.profiler trace per rank, with the step's phases and the collectives in
it, and a summary (compute, communication, overlap) that reads the trace right."""

import json

import pytest

import course_utils as cu
from course_utils import profiling
from course_utils.config import RunConfig, UsageError


def write_trace(path, events):
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def span(name, ts, dur, cat="user_annotation", tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid}


def test_the_summary_measures_compute_communication_and_overlap(tmp_path):
    events = [
        span("forward", 0, 100),
        span("backward", 100, 200),
        span("optimizer", 300, 50),
        span("forward", 1000, 100),
        span("backward", 1100, 200),
        span("optimizer", 1300, 50),
        # an all-reduce half inside backward, half after it; one entirely after
        span("gloo:all_reduce", 250, 100, cat="cpu_op", tid=7),
        span("gloo:all_reduce", 1400, 100, cat="cpu_op", tid=7),
        span("aten::mm", 10, 50, cat="cpu_op"),  # inside forward: not counted twice
    ]
    hidden = profiling.summary(
        write_trace(
            tmp_path / "h.json",
            [
                *events,
                span("autograd::engine::evaluate_function: MmBackward0", 1380, 60, "cpu_op"),
                span("autograd::engine::evaluate_function: AccumulateGrad", 260, 40, "cpu_op"),
            ],
        )
    )
    assert hidden["hidden"] == pytest.approx(40 / 200)  # 1400..1440 under MmBackward0
    s = profiling.summary(write_trace(tmp_path / "t.json", events))
    assert s["steps"] == 2
    assert s["compute_s"] == pytest.approx(350e-6)  # (100 + 200 + 50) us per step
    assert s["communication_s"] == pytest.approx(100e-6)
    assert s["overlap"] == pytest.approx(50 / 200)
    assert s["hidden"] == 0  # no autograd arithmetic ran beside it
    assert s["collectives"] == 2


@pytest.mark.parametrize(
    "parallel, nproc, collective",
    [
        ("none", 1, None),
        ("ddp", 2, "gloo:all_reduce"),
        ("fsdp", 2, "gloo:all_gather"),
        ("tp", 2, "gloo:all_reduce"),
        ("pipeline", 2, "gloo:"),
    ],
)
def test_every_strategy_writes_one_trace_per_rank_with_its_collectives(
    tmp_path, parallel, nproc, collective
):
    folder = tmp_path / "traces"
    cfg = RunConfig(
        model="transformer",
        parallel=parallel,
        nproc=nproc,
        steps=5,
        batch_size=32,
        profile=str(folder),
    )
    result = cu.train.run(cfg, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [f"trace_rank{r}.json" for r in range(nproc)]
    assert len(result["profile_summary"]) == nproc
    for rank in range(nproc):
        events = profiling.events(profiling.trace_path(folder, rank))
        names = {e["name"] for e in events}
        assert {"forward", "backward", "optimizer"} <= names
        summary = result["profile_summary"][rank]
        assert summary["compute_s"] > 0 and 0 <= summary["overlap"] <= 1
        if collective is None:
            assert summary["communication_s"] == 0
        else:
            assert any(n.startswith(collective) for n in names)
            assert summary["communication_s"] > 0
        assert any(
            e["name"] == "[memory]" for e in events
        )  # memory over time (the profiling lesson)


def test_the_cli_prints_one_summary_line_per_rank(cli, tmp_path):
    proc = cli(
        "--model", "cnn", "--parallel", "ddp", "--nproc", "2", "--steps", "6",
        "--profile", str(tmp_path / "p"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("profile: rank")]
    assert len(lines) == 2 and all("during backward" in line for line in lines)
    assert "USDT" not in proc.stderr and "profiler_start" not in proc.stderr


def test_a_profile_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UsageError, match="--profile"):
        cu.train.run(RunConfig(model="cnn", steps=2, profile=str(afile)), progress=False)


def test_the_timeline_draws_each_span_in_its_rank_and_lane():
    import matplotlib.pyplot as plt

    from course_utils.plots import profiling as drawing

    traces = {
        0: [span("forward", 1000, 2000), span("gloo:all_reduce", 2500, 500, cat="cpu_op")],
        1: [span("backward", 1500, 1000), span("aten::mm", 1500, 10, cat="cpu_op")],
    }
    fig = drawing.trace_timeline(traces)
    bars = fig.axes[0].patches
    assert len(bars) == 3  # aten::mm is neither a phase nor a collective
    starts = sorted((round(b.get_x(), 3), round(b.get_width(), 3)) for b in bars)
    assert starts == [(0.0, 2.0), (0.5, 1.0), (1.5, 0.5)]  # ms from the first span of all
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [
        "rank 0, compute",
        "rank 0, communication",
        "rank 1, compute",
        "rank 1, communication",
    ]
    plt.close(fig)


def test_the_memory_timeline_draws_allocated_bytes_over_time():
    import matplotlib.pyplot as plt

    from course_utils.plots import profiling as drawing

    def memory(ts, allocated):
        return {"name": "[memory]", "ts": ts, "args": {"Total Allocated": allocated}}

    fig = drawing.memory_timeline({"DDP": [memory(0, 0), memory(1000, 2**20), memory(3000, 0)]})
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [0, 1, 3] and list(line.get_ydata()) == [0, 1, 0]
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "DDP"
    plt.close(fig)
