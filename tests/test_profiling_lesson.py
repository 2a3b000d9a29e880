"""Lesson 10's helpers (course_utils.debugging, course_utils.profiling): one step of a trace, where a
step's memory went, every rank's trace in one file, the frames of a launch's stack dump; the
lesson's hand-written overlap measure against the package's, per-step rows and their tables."""

import json
import random
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import notebook_functions

import course_utils as cu
from course_utils import debugging, overlap, profiling


def span(name, ts, dur, cat="user_annotation", tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid}


def memory(ts, nbytes, total, tid=1):
    args = {"Bytes": nbytes, "Total Allocated": total}
    return {"ph": "i", "name": "[memory]", "ts": ts, "tid": tid, "args": args}


def two_steps():
    """Two profiled steps (numbered 5 and 6 by the profiler); each: zero_grad frees 100 bytes of
    gradients, forward keeps 400 of activations, gloo's thread allocates and frees a 50-byte
    buffer, backward frees the activations and allocates 100 of gradients, the optimizer a 30-byte
    temporary."""
    events = []
    for k, t in ((5, 0), (6, 1000)):
        events += [
            span(f"ProfilerStep#{k}", t, 900),
            span("Optimizer.zero_grad#SGD.zero_grad", t + 10, 10),
            memory(t + 15, -100, 900),
            span("forward", t + 100, 200),
            memory(t + 150, 400, 1300),
            memory(t + 160, 50, 1350, tid=7),
            memory(t + 170, -50, 1300, tid=7),
            memory(t + 180, 0, 1300),  # an empty tensor: counted nowhere
            span("backward", t + 300, 300),
            memory(t + 350, 100, 1400),
            memory(t + 400, -400, 1000),
            span("optimizer", t + 700, 100),
            memory(t + 710, 30, 1030),
            memory(t + 720, -30, 1000),
            memory(t + 850, 8, 1008),  # between the phases
            memory(t + 860, -8, 1000),
        ]
    return events


def test_a_step_of_a_trace_is_found_by_its_position_not_its_number():
    events = two_steps()
    second = debugging.step_events(events, 2)
    assert {e["ts"] for e in second} == {e["ts"] for e in events if 1000 <= e["ts"] <= 1900}
    assert [e["name"] for e in second if e["name"].startswith("ProfilerStep")] == ["ProfilerStep#6"]
    with pytest.raises(ValueError, match="holds 2 profiled steps"):
        debugging.step_events(events, 3)


def test_memory_is_attributed_to_the_phase_and_thread_it_happened_in():
    m = debugging.memory_by_phase(debugging.step_events(two_steps(), 1))
    assert m["phases"] == {
        "zero_grad": {"allocated": 0, "freed": 100},
        "forward": {"allocated": 400, "freed": 0},
        "forward, other threads": {"allocated": 50, "freed": 50},
        "backward": {"allocated": 100, "freed": 400},
        "optimizer": {"allocated": 30, "freed": 30},
        "other": {"allocated": 8, "freed": 8},
    }
    assert (m["start"], m["peak"], m["end"]) == (1000, 1400, 1000)
    assert debugging.memory_by_phase([]) == {"start": 0, "peak": 0, "end": 0, "phases": {}}


def test_traces_merge_into_one_file_with_a_process_per_rank(tmp_path):
    paths = []
    for rank, pid in ((1, 222), (0, 111)):  # given out of order: the names come from the traces
        events = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "python"}},
            span("forward", 10, 5, tid=pid) | {"pid": pid},
            {"ph": "X", "name": "PyTorch Profiler", "pid": "Spans", "tid": 0, "ts": 0, "dur": 1},
        ]
        trace = {"schemaVersion": 1, "distributedInfo": {"rank": rank}, "traceEvents": events}
        paths.append(tmp_path / f"trace_rank{rank}.json")
        paths[-1].write_text(json.dumps(trace))
    out = debugging.merge_traces(paths, tmp_path / "both.json")
    merged = json.loads(out.read_text())
    events = merged["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {111: "rank 0", 222: "rank 1"}
    order = {e["pid"]: e["args"]["sort_index"] for e in events if e["name"] == "process_sort_index"}
    assert order == {111: 0, 222: 1}
    assert sorted(e["pid"] for e in events if e["name"] == "forward") == [111, 222]
    assert all(isinstance(e["pid"], int) for e in events)  # the profiler's own rows are left out
    assert merged["schemaVersion"] == 1


DUMP = """Thread 0x00007f0000000001 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f0000000002 (most recent call first):
  File "/venv/torch/distributed/distributed_c10d.py", line 3252 in all_reduce
  File "/tmp/ipykernel_1/123.py", line 17 in train
  File "/repo/course_utils/launch/worker.py", line 185 in child_main
  File "/usr/lib/python3.11/multiprocessing/process.py", line 108 in run
"""


def test_the_frames_of_a_dump_are_the_main_threads_down_to_the_workers_function():
    frames = debugging.frames(DUMP)
    assert [(f.function, f.line) for f in frames] == [("all_reduce", 3252), ("train", 17)]
    assert str(frames[1]) == "123.py, line 17, in train"
    no_mark = DUMP.replace("Current thread", "Thread")  # then the oldest thread: listed last
    assert [f.function for f in debugging.frames(no_mark)] == ["all_reduce", "train"]
    assert debugging.frames("") == []


def skip_the_collective():
    """Rank 0 all-reduces; rank 1 never does (it sleeps)."""
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(4))
    else:
        time.sleep(60)


def test_a_real_hang_shows_each_rank_where_it_waits():
    with pytest.raises(cu.launch.LaunchTimeout) as caught:
        cu.launch.run(skip_the_collective, 2, timeout=3, group_timeout=30, threads=1, device="cpu")
    where = {rank: debugging.frames(dump) for rank, dump in caught.value.stacks.items()}
    assert where[0][0].function == "all_reduce" and where[0][-1].function == "skip_the_collective"
    assert where[1][0].function == "skip_the_collective"  # in time.sleep, a C function: no frame


# --- the lesson's hand-written intervals and hidden share are the package's -----------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "10_profiling.ipynb"


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


def traced_steps(comm_at: tuple[int, ...] = (450, 650)) -> list[dict]:
    """Two profiled steps of 900 us, 1000 us apart: forward 0-200, backward 200-500 (arithmetic 250-400),
    optimizer 600-700; an all-reduce of 100 us at each of ``comm_at`` (from the step's start)."""
    events = []
    for k, t in ((3, 0), (4, 1000)):
        events += [
            span(f"ProfilerStep#{k}", t, 900),
            span("forward", t, 200),
            span("backward", t + 200, 300),
            span("autograd::engine::evaluate_function: MmBackward0", t + 250, 150, "cpu_op"),
            span("optimizer", t + 600, 100),
        ]
        events += [span("gloo:all_reduce", t + c, 100, "cpu_op", tid=7) for c in comm_at]
    return events


def test_step_rows_measure_each_step_and_carry_their_tags():
    rows = overlap.step_rows(traced_steps((350, 650)), 2, round=1, rank=0)
    assert len(rows) == 2
    for step, row in enumerate(rows, start=1):
        assert row["round"] == 1 and row["rank"] == 0 and row["step"] == step
        assert row["step_ms"] == pytest.approx(0.9)
        assert row["compute_ms"] == pytest.approx(0.6)  # forward + backward + optimizer
        assert row["comm_ms"] == pytest.approx(0.2)
        assert row["in_backward"] == pytest.approx(0.5)  # 350-450 of 350-450 and 650-750
        assert row["hidden"] == pytest.approx(0.25)  # 350-400 under the arithmetic
        assert row["all_reduces"] == 2
    rows = [{"round": k % 2, "x": float(k)} for k in range(6)]  # round 0: 0, 2, 4; round 1: 1, 3, 5
    assert overlap.round_medians(rows, "x") == [2.0, 3.0]


def test_the_tables_show_one_row_per_rank_and_per_version():
    s = {"compute_s": 0.0125, "communication_s": 0.002, "overlap": 0.5, "hidden": 0.25}
    table = profiling.summary_table([s | {"collectives": 3}, s | {"collectives": 4}])
    lines = str(table).splitlines()
    assert len(lines) == 3 and lines[1].split() == ["0", "12.5", "2.00", "50%", "25%", "3"]
    rows = overlap.step_rows(traced_steps(), 2, round=0, rank=0)
    table = overlap.overlap_table({"after": rows, "again": rows})
    lines = str(table).splitlines()
    assert len(lines) == 3 and lines[1].startswith("after") and "0%" in lines[1]
    assert table.numbers["rows"][0][1] == "2"  # all-reduces per step


def test_collectives_are_counted_per_step_and_arrivals_per_rank():
    counts = debugging.collective_counts(traced_steps(), 2)
    assert counts == [{"gloo:all_reduce": 2}, {"gloo:all_reduce": 2}]
    late = [
        e | {"ts": e["ts"] + 30} if e["name"] == "gloo:all_reduce" else e for e in traced_steps()
    ]
    late = [e | {"dur": 70} if e["name"] == "gloo:all_reduce" else e for e in late]
    rows = debugging.arrivals({0: traced_steps(), 1: late}, 2)
    assert [(r["first"], r["last"]) for r in rows] == [(0, 1), (0, 1)]
    for r in rows:  # rank 0 started 30 us earlier, both ended together
        assert r["start_gap_ms"] == pytest.approx(0.03) and r["end_gap_ms"] == pytest.approx(0)
        assert r["first_ms"] == pytest.approx(0.1) and r["last_ms"] == pytest.approx(0.07)
    assert len(str(debugging.arrivals_table(rows)).splitlines()) == 3
    with pytest.raises(ValueError, match="holds no gloo:broadcast"):
        debugging.arrivals({0: traced_steps()}, 1, name="gloo:broadcast")


def test_the_memory_table_lists_the_phases_where_a_kibibyte_moved_in_step_order():
    m = debugging.memory_by_phase(debugging.step_events(two_steps(), 1))
    table = debugging.memory_table({"A": m, "B": m}, unit=1)
    assert [row[0] for row in table.numbers["rows"]] == [
        "zero_grad",
        "forward",
        "forward, other threads",
        "backward",
        "optimizer",
        "other",
    ]
    assert table.numbers["rows"][1] == ["forward", "400 / 0", "400 / 0"]
    assert [row[0] for row in debugging.memory_table({"A": m}, unit=200).numbers["rows"]] == [
        "forward",
        "backward",
    ]


def test_the_step_and_memory_figures_draw_a_panel_per_version():
    import matplotlib.pyplot as plt

    from course_utils.plots import profiling as drawing

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


def labelled(model, optimizer, X, y):
    """A data-parallel step by hand with a label around the all-reduces (the lesson's)."""
    optimizer.zero_grad(set_to_none=True)
    with profiling.label("forward"):
        loss = torch.nn.functional.cross_entropy(model(X), y)
    with profiling.label("backward"):
        loss.backward()
    cu.ddp.average_gradients(model)
    with profiling.label("optimizer"):
        optimizer.step()


@pytest.mark.parametrize("step_fn, cap, all_reduces", [(labelled, None, 6), ("ddp", 0.1, 3)])
def test_profile_steps_traces_the_asked_steps_of_each_version(tmp_path, step_fn, cap, all_reduces):
    paths = cu.launch.run(
        overlap.profile_steps, 2, tmp_path, step_fn, cap, 2, threads=1, device="cpu"
    )
    assert paths == [str(profiling.trace_path(tmp_path, rank)) for rank in (0, 1)]
    for path in paths:
        rows = overlap.step_rows(profiling.events(path), 2)
        assert [r["all_reduces"] for r in rows] == [all_reduces, all_reduces]
        if step_fn == "ddp":
            assert all(r["in_backward"] > 0.5 for r in rows)  # DDP all-reduces inside backward
        else:
            assert all(r["in_backward"] == 0 for r in rows)
