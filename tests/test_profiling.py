"""course_utils.profiling: recording a trace (``--profile DIR``: one torch.profiler trace per
rank, with the step's phases and the collectives in it) and reading one (the summary: compute,
communication, overlap; one profiled step, its collectives, when each rank reached them, where its
memory went, every rank's trace in one file), on traces written by hand (``traces.py``) where the
numbers can be worked out on paper, and on real runs of every strategy."""

import json

import pytest
from traces import memory, span, traced_steps, two_steps, write_trace

import course_utils as cu
from course_utils import profiling
from course_utils.config import RunConfig, UsageError


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


def test_a_step_of_a_trace_is_found_by_its_position_not_its_number():
    events = two_steps()
    second = profiling.step_events(events, 2)
    assert {e["ts"] for e in second} == {e["ts"] for e in events if 1000 <= e["ts"] <= 1900}
    assert [e["name"] for e in second if e["name"].startswith("ProfilerStep")] == ["ProfilerStep#6"]
    with pytest.raises(ValueError, match="holds 2 profiled steps"):
        profiling.step_events(events, 3)


def test_memory_is_attributed_to_the_phase_and_thread_it_happened_in():
    m = profiling.memory_by_phase(profiling.step_events(two_steps(), 1))
    assert m["phases"] == {
        "zero_grad": {"allocated": 0, "freed": 100},
        "forward": {"allocated": 400, "freed": 0},
        "forward, other threads": {"allocated": 50, "freed": 50},
        "backward": {"allocated": 100, "freed": 400},
        "optimizer": {"allocated": 30, "freed": 30},
        "other": {"allocated": 8, "freed": 8},
    }
    assert (m["start"], m["peak"], m["end"]) == (1000, 1400, 1000)
    assert profiling.memory_by_phase([]) == {"start": 0, "peak": 0, "end": 0, "phases": {}}


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
    out = profiling.merge_traces(paths, tmp_path / "both.json")
    merged = json.loads(out.read_text())
    events = merged["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {111: "rank 0", 222: "rank 1"}
    order = {e["pid"]: e["args"]["sort_index"] for e in events if e["name"] == "process_sort_index"}
    assert order == {111: 0, 222: 1}
    assert sorted(e["pid"] for e in events if e["name"] == "forward") == [111, 222]
    assert all(isinstance(e["pid"], int) for e in events)  # the profiler's own rows are left out
    assert merged["schemaVersion"] == 1


def test_collectives_are_counted_per_step_and_arrivals_per_rank():
    counts = profiling.collective_counts(traced_steps(), 2)
    assert counts == [{"gloo:all_reduce": 2}, {"gloo:all_reduce": 2}]
    late = [
        e | {"ts": e["ts"] + 30} if e["name"] == "gloo:all_reduce" else e for e in traced_steps()
    ]
    late = [e | {"dur": 70} if e["name"] == "gloo:all_reduce" else e for e in late]
    rows = profiling.arrivals({0: traced_steps(), 1: late}, 2)
    assert [(r["first"], r["last"]) for r in rows] == [(0, 1), (0, 1)]
    for r in rows:  # rank 0 started 30 us earlier, both ended together
        assert r["start_gap_ms"] == pytest.approx(0.03) and r["end_gap_ms"] == pytest.approx(0)
        assert r["first_ms"] == pytest.approx(0.1) and r["last_ms"] == pytest.approx(0.07)
    assert len(str(profiling.arrivals_table(rows)).splitlines()) == 3
    with pytest.raises(ValueError, match="holds no gloo:broadcast"):
        profiling.arrivals({0: traced_steps()}, 1, name="gloo:broadcast")


def test_the_memory_table_lists_the_phases_where_a_kibibyte_moved_in_step_order():
    m = profiling.memory_by_phase(profiling.step_events(two_steps(), 1))
    table = profiling.memory_table({"A": m, "B": m}, unit=1)
    assert [row[0] for row in table.numbers["rows"]] == [
        "zero_grad",
        "forward",
        "forward, other threads",
        "backward",
        "optimizer",
        "other",
    ]
    assert table.numbers["rows"][1] == ["forward", "400 / 0", "400 / 0"]
    assert [row[0] for row in profiling.memory_table({"A": m}, unit=200).numbers["rows"]] == [
        "forward",
        "backward",
    ]


def test_the_summary_table_shows_one_row_per_rank():
    s = {"compute_s": 0.0125, "communication_s": 0.002, "overlap": 0.5, "hidden": 0.25}
    table = profiling.summary_table([s | {"collectives": 3}, s | {"collectives": 4}])
    lines = str(table).splitlines()
    assert len(lines) == 3 and lines[1].split() == ["0", "12.5", "2.00", "50%", "25%", "3"]


def test_what_counts_as_a_phase_a_collective_and_a_memory_record_is_decided_once():
    assert profiling.is_phase(span("forward", 0, 1))
    assert not profiling.is_phase(span("forward", 0, 1, cat="cpu_op"))  # an operator so named
    assert profiling.is_phase(span("backward", 0, 1), ("backward",))
    assert not profiling.is_phase(span("forward", 0, 1), ("backward",))
    for name in ("gloo:all_reduce", "gloo:broadcast", "ncclDevKernel_AllReduce_Sum_f32_RING_LL"):
        assert profiling.is_communication(name)
    assert not profiling.is_communication("c10d::allreduce_")  # the call on the main thread
    unsized = {"ph": "i", "name": "[memory]", "ts": 5, "args": {}}
    records = profiling.memory_records([memory(20, 8, 108), span("forward", 0, 30), unsized,
                                        memory(10, 100, 100)])  # fmt: skip
    assert [r["ts"] for r in records] == [10, 20]  # in time order, only those with a level
