"""Lesson 11's figures (each rank's timeline, one step of several versions side by side, memory
over time and over one step) and its hand-written overlap measure against the package's.

A lesson's ``test_<subject>_figures.py`` tests what the lesson draws, and the code it writes by hand
against the package's; the package itself is tested in ``test_<subject>.py`` (here
``test_profiling.py``)."""

import random
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from conftest import notebook_functions
from traces import span, traced_steps, two_steps

import course_utils as cu
from course_utils import profiling
from course_utils.plots import profiling as drawing


def test_the_timeline_draws_each_span_in_its_rank_and_lane():
    traces = {
        0: [span("forward", 1000, 2000), span("gloo:all_reduce", 2500, 500, cat="cpu_op")],
        1: [
            span("backward", 1500, 1000),
            span("aten::mm", 1500, 10, cat="cpu_op"),
            span("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 1600, 100, cat="kernel"),
        ],
    }
    fig = drawing.trace_timeline(traces)
    bars = fig.axes[0].patches
    assert len(bars) == 4  # aten::mm is neither a phase nor a collective; NCCL's kernel is one
    starts = sorted((round(b.get_x(), 3), round(b.get_width(), 3)) for b in bars)
    assert starts == [(0.0, 2.0), (0.5, 1.0), (0.6, 0.1), (1.5, 0.5)]  # ms from the first span
    lanes = {
        round(b.get_y() + b.get_height() / 2, 1) for b in bars if round(b.get_width(), 3) == 0.1
    }
    assert lanes == {-3.2}  # rank 1's communication lane
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [
        "rank 0, compute",
        "rank 0, communication",
        "rank 1, compute",
        "rank 1, communication",
    ]
    plt.close(fig)


def test_the_memory_timeline_draws_allocated_bytes_over_time():
    def memory(ts, allocated):
        return {"name": "[memory]", "ts": ts, "args": {"Total Allocated": allocated}}

    fig = drawing.memory_timeline({"DDP": [memory(0, 0), memory(1000, 2**20), memory(3000, 0)]})
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [0, 1, 3] and list(line.get_ydata()) == [0, 1, 0]
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "DDP"
    plt.close(fig)


def test_the_step_and_memory_figures_draw_a_panel_per_version():
    fig = drawing.step_timelines(
        {"a": {0: traced_steps(), 1: traced_steps()}, "b": {0: traced_steps()}}
    )
    assert [ax.get_title() for ax in fig.axes] == ["a: one step", "b: one step"]
    assert len(fig.axes[0].patches) == 10  # step 2 of each rank: 3 phases, 2 all-reduces
    plt.close(fig)
    fig = drawing.memory_steps({"DDP": two_steps(), "FSDP": two_steps()[:8]})
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    assert [ax.get_title() for ax in fig.axes] == ["DDP: one step", "FSDP: one step"]
    plt.close(fig)


# --- the lesson's hand-written intervals and hidden share are the package's -----------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "11_profiling.ipynb"


def lesson_functions(*names: str) -> dict:
    """The notebook's definitions of ``names``, executed: their functions, by name."""
    return notebook_functions(NOTEBOOK, names, {"cu": cu})


def random_trace(seed: int) -> list[dict]:
    """Backward arithmetic, AccumulateGrad and collectives at random times, overlapping."""
    rng = random.Random(seed)
    names = [
        "autograd::engine::evaluate_function: ConvolutionBackward0",
        "autograd::engine::evaluate_function: AccumulateGrad",
        "gloo:all_reduce",
        "aten::mm",
    ]
    return [
        span(rng.choice(names), rng.randrange(0, 2000), rng.randrange(0, 300), "cpu_op")
        for _ in range(60)
    ]


def test_the_lessons_intervals_and_hidden_share_are_the_packages():
    mine = lesson_functions("intervals", "common_us", "is_backward_arithmetic", "hidden_share")
    for seed in range(20):
        events = random_trace(seed)
        comm = profiling.intervals(events, lambda e: profiling.is_communication(e["name"]))
        assert mine["intervals"](events, lambda e: e["name"] == "gloo:all_reduce") == comm
        work = profiling.intervals(events, profiling.is_backward_arithmetic)
        assert work == mine["intervals"](events, mine["is_backward_arithmetic"])
        assert mine["common_us"](comm, work) == pytest.approx(profiling.common_us(comm, work))
        assert mine["hidden_share"](events) == pytest.approx(profiling.hidden_share(events))
    # by hand: communication 0..100 and 150..250; arithmetic 50..200 (AccumulateGrad not counted)
    events = [
        span("gloo:all_reduce", 0, 100, "cpu_op"),
        span("gloo:broadcast", 150, 100, "cpu_op"),
        span("autograd::engine::evaluate_function: MmBackward0", 50, 150, "cpu_op"),
        span("autograd::engine::evaluate_function: AccumulateGrad", 0, 300, "cpu_op"),
    ]
    assert profiling.intervals(events, lambda e: True) == [[0, 300]]
    assert profiling.hidden_share(events) == mine["hidden_share"](events) == pytest.approx(0.5)
    assert profiling.hidden_share([]) == mine["hidden_share"]([]) == 0.0
