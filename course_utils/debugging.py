"""Reading the evidence a parallel run leaves behind (lesson 10): one step of a profiler trace,
the collectives in each step and when each rank arrived at them, where the memory of a step went,
every rank's trace in one file, and the frames of a stack dump.

Pure functions of what :mod:`course_utils.profiling` and :mod:`course_utils.launch` produce:
the events of a trace (:func:`course_utils.profiling.events`) and the ``faulthandler`` dumps of a
:class:`course_utils.launch.LaunchTimeout` (``.stacks[rank]``). No torch, no matplotlib; the
tables print through :mod:`course_utils.readout`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from course_utils.readout import Reading, table

__all__ = [
    "PHASES",
    "Frame",
    "arrivals",
    "arrivals_table",
    "collective_counts",
    "frames",
    "memory_by_phase",
    "memory_table",
    "merge_traces",
    "step_events",
]

PHASES = ("zero_grad", "forward", "backward", "optimizer")  # in the order a step runs them


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


def _phase_of(name: str) -> str | None:
    if name in PHASES[1:]:
        return name
    if name.startswith("Optimizer.zero_grad"):  # PyTorch's own label: "Optimizer.zero_grad#SGD..."
        return "zero_grad"
    return None


def memory_by_phase(events: Sequence[dict]) -> dict:
    """Where the bytes of the events' ``[memory]`` records went: for each phase of the step
    (``zero_grad``, ``forward``, ``backward``, ``optimizer``; ``other`` outside them), the bytes
    ``allocated`` and ``freed`` on the thread that ran the step, and apart from it those of other
    threads (gloo's: the buffers of its collectives) as ``"<phase>, other threads"``. Also the
    level of ``Total Allocated`` (bytes, since the profiler started) before the first record
    (``start``), its ``peak`` and its ``end``. Blocks allocated before the profiler started are
    invisible: freeing one shows up in no record."""
    spans = []  # (start, end, phase) of the step thread's phases
    main_tid = None
    for e in events:
        phase = _phase_of(e.get("name", "")) if e.get("ph") == "X" else None
        if phase and e.get("cat") == "user_annotation":
            spans.append((e["ts"], e["ts"] + e["dur"], phase))
            main_tid = e.get("tid") if main_tid is None else main_tid  # the step's thread
    records = sorted(
        (e for e in events if e.get("name") == "[memory]" and "Bytes" in e.get("args", {})),
        key=lambda e: e["ts"],
    )
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


def collective_counts(events: Sequence[dict], num_steps: int) -> list[Counter]:
    """How many collectives of each kind (``gloo:all_reduce``, ``gloo:broadcast``...) each of the
    ``num_steps`` profiled steps of a trace holds: one :class:`~collections.Counter` per step."""
    return [
        Counter(
            e["name"]
            for e in step_events(events, step)
            if e.get("ph") == "X" and e["name"].lower().startswith(("gloo:", "nccl"))
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
        rows.append(
            {
                "first": first,
                "last": last,
                "start_gap_ms": (spans[last][0] - spans[first][0]) / 1e3,
                "end_gap_ms": (
                    max(e for _, e in spans.values()) - min(e for _, e in spans.values())
                )
                / 1e3,
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


def memory_table(by_phase: dict[str, dict], unit: int = 1024) -> Reading:
    """Runs' :func:`memory_by_phase` side by side (``{"DDP": m, "FSDP": m}``): for each phase
    where at least ``unit`` bytes moved in one of them, allocated / freed, in ``unit``s (KiB)."""

    def order(phase: str) -> tuple[int, str]:  # the order a step runs them, "other" last
        return next((i for i, p in enumerate(PHASES) if phase.startswith(p)), len(PHASES)), phase

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
        for e in trace["traceEvents"]:
            if not isinstance(e.get("pid"), int):  # the profiler's own bookkeeping rows
                continue
            if e.get("ph") == "M" and e["name"] in ("process_name", "process_sort_index"):
                continue  # replaced below: "rank r", in rank order
            merged.append(e)
        pids = sorted({e["pid"] for e in trace["traceEvents"] if isinstance(e.get("pid"), int)})
        for pid in pids:
            merged.append(_meta("process_name", pid, {"name": f"rank {rank}"}))
            merged.append(_meta("process_sort_index", pid, {"sort_index": rank}))
    out = Path(out)
    out.write_text(json.dumps({**header, "traceEvents": merged}))
    return out


def _meta(name: str, pid: int, args: dict) -> dict:
    return {"ph": "M", "name": name, "pid": pid, "tid": 0, "args": args}


@dataclass(frozen=True)
class Frame:
    """One line of a Python stack dump: the file, the line number, the function."""

    path: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{Path(self.path).name}, line {self.line}, in {self.function}"


_FRAME = re.compile(r'^\s*File "(?P<path>.*)", line (?P<line>\d+) in (?P<function>.+)$')


def frames(dump: str) -> list[Frame]:
    """The main thread's frames in a ``faulthandler`` dump (a :class:`LaunchTimeout`'s
    ``stacks[rank]``), innermost first, down to the worker's function: the launcher's own frames
    below it (``child_main`` and what started it) are left out."""
    blocks = [b for b in dump.strip().split("\n\n") if "most recent call first" in b]
    if not blocks:
        return []
    # faulthandler marks the thread that took the signal (the main one) as "Current thread";
    # without the mark, the main thread is the oldest, listed last.
    block = next((b for b in blocks if b.lstrip().startswith("Current thread")), blocks[-1])
    out = []
    for line in block.splitlines():
        match = _FRAME.match(line)
        if match is None:
            continue
        if match["function"] == "child_main":
            break
        out.append(Frame(match["path"], int(match["line"]), match["function"]))
    return out
