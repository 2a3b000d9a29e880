"""Lesson 10's helpers (course_utils.debugging): one step of a trace, where a step's memory went,
every rank's trace in one file, and the frames of a launch's stack dump."""

import json
import time

import pytest
import torch
import torch.distributed as dist

import course_utils as cu
from course_utils import debugging


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
