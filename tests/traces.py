"""Traces written by hand for the tests of lesson 11's helpers: a few events of known times, in
the shape ``torch.profiler`` writes them (a complete span, a ``[memory]`` record, two profiled
steps), so that every number a reading gives can be worked out on paper."""

import json


def write_trace(path, events):
    path.write_text(json.dumps({"traceEvents": events}))
    return path


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


def traced_steps(comm_at: tuple[int, ...] = (450, 650)) -> list[dict]:
    """Two profiled steps of 900 us, 1000 us apart: forward 0-200, backward 200-500 (arithmetic
    250-400), optimizer 600-700; an all-reduce of 100 us at each of ``comm_at`` (from the step's
    start)."""
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
