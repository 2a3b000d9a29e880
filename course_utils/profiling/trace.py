"""Reading a trace: every function that says what a ``torch.profiler`` trace holds (lesson 11).

A trace is a Chrome/Perfetto JSON file per rank (:class:`~course_utils.profiling.Recorder` writes
them, :func:`events` reads one). What counts as what is decided here, once: a **phase** of a step
is a span the course labels (:func:`is_phase`); **communication**, a collective: gloo's, on its own
threads, or NCCL's kernels (:func:`is_communication`); **backward's arithmetic**, autograd's
gradient computations less ``AccumulateGrad`` (:func:`is_backward_arithmetic`); **memory**, the
allocator's ``[memory]`` records (:func:`memory_records`).

From those: a rank's :func:`summary` (compute, communication, how much of it overlapped backward),
built from :func:`intervals`, :func:`common_us` and :func:`hidden_share`, which lesson 11 writes by
hand; one profiled step (:func:`step_events`), its collectives (:func:`collective_counts`), when
each rank reached them (:func:`arrivals`), where its memory went (:func:`memory_by_phase`); every
rank's trace in one file (:func:`merge_traces`). The figures (:mod:`course_utils.plots.profiling`)
draw what these select. No torch: a trace is JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from course_utils.readout import Reading, table

PHASES = ("forward", "backward", "optimizer")  # the spans every training step labels
STEP_ORDER = ("zero_grad", *PHASES)  # a step's phases in the order it runs them
COMMUNICATION = ("gloo:", "nccl")  # prefixes of collective events (lower case)

__all__ = [
    "COMMUNICATION",
    "PHASES",
    "STEP_ORDER",
    "arrivals",
    "arrivals_table",
    "collective_counts",
    "common_us",
    "events",
    "hidden_share",
    "intervals",
    "is_backward_arithmetic",
    "is_communication",
    "is_phase",
    "line",
    "memory_by_phase",
    "memory_records",
    "memory_table",
    "merge_traces",
    "step_events",
    "summary",
    "summary_table",
]


def events(path: str | Path) -> list[dict]:
    """The complete events (``"ph": "X"``) of a Chrome trace: name, ts and dur (microseconds),
    tid, cat; and its memory counter events (``[memory]``, ``Total Allocated`` in bytes)."""
    trace = json.loads(Path(path).read_text())
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" or e.get("name") == "[memory]"]


def is_phase(e: dict, phases: Sequence[str] = PHASES) -> bool:
    """Whether an event is one of the course's labelled spans with one of these names."""
    return e["name"] in phases and e.get("cat") == "user_annotation"


def is_communication(name: str) -> bool:
    """Whether an event's name is a collective's (gloo's or NCCL's)."""
    return name.lower().startswith(COMMUNICATION)


def is_backward_arithmetic(e: dict) -> bool:
    """Whether an event is one of autograd's gradient computations (not AccumulateGrad, which
    adds a gradient to ``.grad`` and is where DDP's hooks start a bucket's all-reduce)."""
    name = e["name"]
    return name.startswith("autograd::engine::evaluate_function") and "AccumulateGrad" not in name


def memory_records(events: Sequence[dict]) -> list[dict]:
    """The allocator's ``[memory]`` records, in time order: ``args`` holds ``Bytes`` (negative
    when freed) and ``Total Allocated`` (bytes, counted from the profiler's start)."""
    records = [e for e in events if e.get("name") == "[memory]" and "args" in e]
    return sorted((e for e in records if "Total Allocated" in e["args"]), key=lambda e: e["ts"])


def intervals(events: Sequence[dict], keep: Callable[[dict], bool]) -> list[list[float]]:
    """The union of the ``[start, end]`` (microseconds) of the complete events that ``keep``
    selects: sorted, no two overlapping (lesson 11, section 3)."""
    merged: list[list[float]] = []
    for start, end in sorted(
        (e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X" and keep(e)
    ):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)  # overlaps the previous one: extend it
        else:
            merged.append([start, end])
    return merged


def common_us(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Microseconds covered by both of two sorted lists of disjoint intervals (:func:`intervals`);
    one pass over both (the lesson writes the double loop: the same sum)."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _length(spans) -> float:
    return sum(end - start for start, end in spans)


def hidden_share(events: Sequence[dict]) -> float:
    """The share of the communication time during which backward was computing (0 without
    communication)."""
    comm = intervals(events, lambda e: is_communication(e["name"]))
    total = _length(comm)
    return common_us(comm, intervals(events, is_backward_arithmetic)) / total if total else 0.0


def summary(path: str | Path, steps: int | None = None) -> dict:
    """Seconds per step of compute (inside the phases), of communication (some collective
    running), the share of the communication inside the backward span (``overlap``) and behind
    backward's arithmetic (``hidden``), from one rank's trace. ``steps``: how many steps the trace
    holds (default: the number of "optimizer" spans, at least 1)."""
    complete = [e for e in events(path) if e.get("ph") == "X"]
    steps = steps or max(1, sum(is_phase(e, ("optimizer",)) for e in complete))
    compute = intervals(complete, is_phase)
    comm = intervals(complete, lambda e: is_communication(e["name"]))
    backward = intervals(complete, lambda e: is_phase(e, ("backward",)))
    comm_us = _length(comm)
    return {
        "steps": steps,
        "compute_s": _length(compute) / 1e6 / steps,
        "communication_s": comm_us / 1e6 / steps,
        "overlap": common_us(comm, backward) / comm_us if comm_us else 0.0,
        "hidden": hidden_share(complete),
        "collectives": len(comm),
    }


def summary_table(summaries: Sequence[dict]) -> Reading:
    """The ranks' :func:`summary` side by side (times in ms per step, shares in %)."""
    headers = ("rank", "compute ms/step", "communication ms/step", "in backward", "hidden")
    return table(
        (*headers, "collectives"),
        [
            (
                rank,
                s["compute_s"] * 1e3,
                s["communication_s"] * 1e3,
                f"{s['overlap']:.0%}",
                f"{s['hidden']:.0%}",
                s["collectives"],
            )
            for rank, s in enumerate(summaries)
        ],
    )


def line(rank: int, s: dict) -> str:
    """One readable line of a rank's :func:`summary`."""
    text = (
        f"rank {rank}: compute {s['compute_s'] * 1e3:.1f} ms/step, communication "
        f"{s['communication_s'] * 1e3:.1f} ms/step"
    )
    if s["communication_s"] > 0:
        text += f" ({s['overlap']:.0%} of it during backward"
        text += f", {s['hidden']:.0%} hidden behind its arithmetic)" if "hidden" in s else ")"
    return text


def step_events(events: Sequence[dict], step: int) -> list[dict]:
    """The events of the ``step``-th profiled step of a trace (1: the first ``ProfilerStep#``
    span it holds, whatever the profiler numbered it), every thread's, memory events included."""
    spans = sorted(
        (e for e in events if e.get("ph") == "X" and e["name"].startswith("ProfilerStep#")),
        key=lambda e: e["ts"],
    )
    if not 1 <= step <= len(spans):
        raise ValueError(f"step {step} asked for, but the trace holds {len(spans)} profiled steps")
    start, end = spans[step - 1]["ts"], spans[step - 1]["ts"] + spans[step - 1]["dur"]
    return [e for e in events if start <= e["ts"] <= end]


def _phase_of(e: dict) -> str | None:
    if e.get("ph") != "X" or e.get("cat") != "user_annotation":
        return None
    if e["name"] in PHASES:
        return e["name"]
    if e["name"].startswith("Optimizer.zero_grad"):  # PyTorch's label: "Optimizer.zero_grad#SGD..."
        return "zero_grad"
    return None


def memory_by_phase(events: Sequence[dict]) -> dict:
    """Where the bytes of the events' :func:`memory_records` went: for each phase of the step
    (:data:`STEP_ORDER`; ``other`` outside them), the bytes ``allocated`` and ``freed`` on the
    thread that ran the step, and apart from it those of other threads (gloo's: the buffers of its
    collectives) as ``"<phase>, other threads"``. Also the level of ``Total Allocated`` (bytes,
    since the profiler started) before the first record (``start``), its ``peak`` and its
    ``end``. Blocks allocated before the profiler started are invisible: freeing one shows up in
    no record."""
    spans = []  # (start, end, phase) of the step thread's phases
    main_tid = None
    for e in events:
        phase = _phase_of(e)
        if phase:
            spans.append((e["ts"], e["ts"] + e["dur"], phase))
            main_tid = e.get("tid") if main_tid is None else main_tid  # the step's thread
    records = [r for r in memory_records(events) if "Bytes" in r["args"]]
    phases: dict[str, dict[str, int]] = {}
    for r in records:
        size = int(r["args"]["Bytes"])
        if size == 0:  # a record of nothing (an empty tensor)
            continue
        phase = next((p for begin, end, p in spans if begin <= r["ts"] <= end), "other")
        if r.get("tid") != main_tid:
            phase += ", other threads"
        tally = phases.setdefault(phase, {"allocated": 0, "freed": 0})
        tally["allocated" if size > 0 else "freed"] += abs(size)
    levels = [int(r["args"]["Total Allocated"]) for r in records]
    start = levels[0] - int(records[0]["args"]["Bytes"]) if records else 0
    return {
        "start": start,
        "peak": max([start, *levels]),
        "end": levels[-1] if levels else start,
        "phases": phases,
    }


def memory_table(by_phase: dict[str, dict], unit: int = 1024) -> Reading:
    """Runs' :func:`memory_by_phase` side by side (``{"DDP": m, "FSDP": m}``): for each phase
    where at least ``unit`` bytes moved in one of them, allocated / freed, in ``unit``s (KiB)."""

    def order(phase: str) -> tuple[int, str]:  # the order a step runs them, "other" last
        return next((i for i, p in enumerate(STEP_ORDER) if phase.startswith(p)), 99), phase

    phases = sorted(
        {
            phase
            for m in by_phase.values()
            for phase, t in m["phases"].items()
            if max(t["allocated"], t["freed"]) >= unit
        },
        key=order,
    )
    rows = []
    for phase in phases:
        cells = []
        for m in by_phase.values():
            t = m["phases"].get(phase, {"allocated": 0, "freed": 0})
            cells.append(f"{t['allocated'] / unit:,.0f} / {t['freed'] / unit:,.0f}")
        rows.append((phase, *cells))
    return table(("phase", *(f"{name}: allocated / freed" for name in by_phase)), rows)


def collective_counts(events: Sequence[dict], num_steps: int) -> list[Counter]:
    """How many collectives of each kind (``gloo:all_reduce``, ``gloo:broadcast``...) each of the
    ``num_steps`` profiled steps of a trace holds: one :class:`~collections.Counter` per step."""
    return [
        Counter(
            e["name"]
            for e in step_events(events, step)
            if e.get("ph") == "X" and is_communication(e["name"])
        )
        for step in range(1, num_steps + 1)
    ]


def arrivals(
    traces: dict[int, Sequence[dict]], num_steps: int, name: str = "gloo:all_reduce"
) -> list[dict]:
    """For each profiled step of two or more ranks' traces, the first ``name`` collective of
    each rank: which rank started it first (``first``) and last (``last``), how far apart the
    first and the last started and ended (``start_gap_ms``, ``end_gap_ms``), and how long it
    lasted on the first and on the last rank (``first_ms``, ``last_ms``)."""
    rows = []
    for step in range(1, num_steps + 1):
        spans = {}  # rank -> (start, end) of its first `name` of the step, in microseconds
        for rank, events in traces.items():
            mine = sorted(
                (e["ts"], e["ts"] + e["dur"])
                for e in step_events(events, step)
                if e.get("ph") == "X" and e["name"] == name
            )
            if not mine:
                raise ValueError(f"rank {rank}'s profiled step {step} holds no {name}")
            spans[rank] = mine[0]
        first = min(spans, key=lambda r: spans[r][0])
        last = max(spans, key=lambda r: spans[r][0])
        ends = [end for _, end in spans.values()]
        rows.append(
            {
                "first": first,
                "last": last,
                "start_gap_ms": (spans[last][0] - spans[first][0]) / 1e3,
                "end_gap_ms": (max(ends) - min(ends)) / 1e3,
                "first_ms": (spans[first][1] - spans[first][0]) / 1e3,
                "last_ms": (spans[last][1] - spans[last][0]) / 1e3,
            }
        )
    return rows


def arrivals_table(rows: Sequence[dict]) -> Reading:
    """:func:`arrivals` as a table, one line per profiled step (times in ms)."""
    return table(
        ("step", "first rank", "starts apart", "ends apart", "span, first", "span, last"),
        [
            (step, r["first"], r["start_gap_ms"], r["end_gap_ms"], r["first_ms"], r["last_ms"])
            for step, r in enumerate(rows, start=1)
        ],
    )


def merge_traces(paths: Iterable[str | Path], out: str | Path) -> Path:
    """Every rank's trace in one Chrome/Perfetto file (``out``), one process per rank, named
    ``rank r`` and sorted by rank: the ranks share one clock (one machine), so their timelines
    line up. Ranks are read from each trace (``distributedInfo``), else counted in order."""
    merged: list[dict] = []
    header: dict = {}
    for i, path in enumerate(paths):
        trace = json.loads(Path(path).read_text())
        rank = trace.get("distributedInfo", {}).get("rank", i)
        if not header:
            header = {k: v for k, v in trace.items() if k in ("schemaVersion", "displayTimeUnit")}
        own = [e for e in trace["traceEvents"] if isinstance(e.get("pid"), int)]  # not the
        for e in own:  # profiler's own bookkeeping rows, and not the names replaced below
            if not (e.get("ph") == "M" and e["name"] in ("process_name", "process_sort_index")):
                merged.append(e)
        for pid in sorted({e["pid"] for e in own}):  # "rank r", in rank order
            merged.append(_meta("process_name", pid, {"name": f"rank {rank}"}))
            merged.append(_meta("process_sort_index", pid, {"sort_index": rank}))
    out = Path(out)
    out.write_text(json.dumps({**header, "traceEvents": merged}))
    return out


def _meta(name: str, pid: int, args: dict) -> dict:
    return {"ph": "M", "name": name, "pid": pid, "tid": 0, "args": args}
