"""Seeing inside a parallel run: ``torch.profiler`` traces, one per rank, and what they say.

Every training step of the course is labelled with ``record_function`` ("forward", "backward",
"optimizer"; a pipeline's steps per microbatch), so a trace shows the phases of each rank. The
collectives show up by themselves: gloo runs them on its own threads as ``gloo:all_reduce``,
``gloo:broadcast`` ... events (NCCL as ``nccl...`` kernels on the GPU). From a trace,
:func:`summary` measures per step:

- **compute**: the time inside forward, backward and the optimizer on the rank's main thread;
- **communication**: the time some collective was running (the union of their intervals);
- **overlap**: the share of the communication inside the backward span (DDP's buckets start
  all-reducing before backward ends: lesson 05). Under DDP that span also holds the wait for the
  last bucket, so **hidden** is the stricter measure: the share that ran while autograd was
  computing gradients (its ``evaluate_function`` spans, less ``AccumulateGrad``), hidden rather
  than added to the step.

:class:`Recorder` is what ``--profile DIR`` uses: it profiles a few steps after a warm-up and writes
``DIR/trace_rank<r>.json`` (Chrome / Perfetto format: open it at https://ui.perfetto.dev or in
chrome://tracing), memory events included. :func:`events` reads a trace back for drawing.

The pieces are public for lesson 10, which writes them by hand: :func:`intervals` and
:func:`common_us` (the union of some events' spans, and what two such unions share),
:func:`hidden_share`; :func:`summary_table` shows the ranks' summaries side by side. The lesson's
overlap experiment is :mod:`course_utils.overlap`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from course_utils.readout import Reading, table

PHASES = ("forward", "backward", "optimizer")
COMMUNICATION = ("gloo:", "nccl")  # prefixes of collective events (lower case)

__all__ = [
    "PHASES",
    "Recorder",
    "common_us",
    "events",
    "hidden_share",
    "intervals",
    "is_backward_arithmetic",
    "is_communication",
    "label",
    "line",
    "summary",
    "summary_table",
    "trace_path",
]

label = record_function  # ``with label("forward"): ...``: a named span in every trace


def trace_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"trace_rank{rank}.json"


class Recorder:
    """Profile ``active`` steps of a run on this rank, after skipping the first ones where the run
    is long enough; call :meth:`step` after every training step and :meth:`stop` at the end. The
    trace is written when the active steps are done (or at :meth:`stop`, if the run was shorter).
    ``memory``: record allocations too (for memory over time)."""

    def __init__(
        self, directory: str | Path, rank: int, num_steps: int, active: int = 3, memory: bool = True
    ):
        self.path = trace_path(directory, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the first step builds buffers, the second DDP's buckets (in the order gradients came):
        # skip both where the run is long enough, then warm the profiler up for one step
        wait = 1 if num_steps > active + 2 else 0
        warmup = 1 if num_steps > active + 1 else 0
        self.active = max(1, min(active, num_steps - warmup - wait))
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.written = False
        with warnings.catch_warnings():  # "won't be using warmup": a short run has no spare step
            warnings.simplefilter("ignore", UserWarning)
            self.profiler = profile(
                activities=activities,
                schedule=schedule(wait=wait, warmup=warmup, active=self.active, repeat=1),
                on_trace_ready=self._write,
                profile_memory=memory,  # the memory events (each rank then warns once, in C++,
            )  # that it saw memory freed whose allocation happened before it started)

    def _write(self, prof) -> None:
        prof.export_chrome_trace(str(self.path))
        self.written = True

    def __enter__(self) -> Recorder:
        with _quiet_stderr():
            self.profiler.start()
        return self

    def step(self) -> None:
        with _quiet_stderr():  # the schedule starts and stops the recording inside step()
            self.profiler.step()

    def stop(self) -> Path:
        with _quiet_stderr():
            self.profiler.stop()  # writes the trace if the schedule had not finished
        return self.path

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def _quiet_stderr():
    """PyTorch's profiler library prints lines to the process's stderr (file descriptor 2, out
    of Python's reach) whenever it starts and stops recording, and a warning about memory
    allocated before it started; every rank of every run would show three. They go to /dev/null
    while the profiler changes state."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def events(path: str | Path) -> list[dict]:
    """The complete events (``"ph": "X"``) of a Chrome trace: name, ts and dur (microseconds),
    tid, cat; and its memory counter events (``[memory]``, ``Total Allocated`` in bytes)."""
    trace = json.loads(Path(path).read_text())
    out = []
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" or e.get("name") == "[memory]":
            out.append(e)
    return out


def intervals(events: Sequence[dict], keep: Callable[[dict], bool]) -> list[list[float]]:
    """The union of the ``[start, end]`` (microseconds) of the complete events that ``keep``
    selects: sorted, no two overlapping (lesson 10, section 3)."""
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


def is_communication(name: str) -> bool:
    """Whether an event's name is a collective's (gloo's or NCCL's)."""
    return name.lower().startswith(COMMUNICATION)


def is_backward_arithmetic(e: dict) -> bool:
    """Whether an event is one of autograd's gradient computations (not AccumulateGrad, which
    adds a gradient to ``.grad`` and is where DDP's hooks start a bucket's all-reduce)."""
    name = e["name"]
    return name.startswith("autograd::engine::evaluate_function") and "AccumulateGrad" not in name


def _is_phase(e: dict, phases=PHASES) -> bool:
    return e["name"] in phases and e.get("cat") == "user_annotation"


def hidden_share(events: Sequence[dict]) -> float:
    """The share of the communication time during which backward was computing (0 without
    communication)."""
    comm = intervals(events, lambda e: is_communication(e["name"]))
    total = _length(comm)
    return common_us(comm, intervals(events, is_backward_arithmetic)) / total if total else 0.0


def summary(path: str | Path, steps: int | None = None) -> dict:
    """Seconds per step of compute, of communication, and the share of the communication that
    overlapped backward, from one rank's trace. ``steps``: how many steps the trace holds
    (default: the number of "optimizer" spans, at least 1)."""
    complete = [e for e in events(path) if e.get("ph") == "X"]
    steps = steps or max(1, sum(_is_phase(e, ("optimizer",)) for e in complete))
    compute = intervals(complete, _is_phase)
    comm = intervals(complete, lambda e: is_communication(e["name"]))
    backward = intervals(complete, lambda e: _is_phase(e, ("backward",)))
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
    return table(
        (
            "rank",
            "compute ms/step",
            "communication ms/step",
            "in backward",
            "hidden",
            "collectives",
        ),
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
