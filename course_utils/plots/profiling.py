"""Figures of the profiling lesson, drawn from ``torch.profiler`` traces (offline, no browser):
each rank's timeline of forward, backward, optimizer and communication (one step of several
versions of it side by side), and memory over time (one step of several runs, shaded by phase).
What counts as a phase, a collective or a memory record is :mod:`course_utils.profiling.trace`'s
to say: these only draw it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt

from course_utils.plots.core import _axes
from course_utils.profiling import PHASES, is_communication, is_phase, memory_records, step_events

__all__ = ["memory_steps", "memory_timeline", "step_timelines", "trace_timeline"]

PHASE_COLORS = dict(zip(PHASES, ("tab:blue", "tab:orange", "tab:green")))
COMM_COLOR = "tab:red"


def trace_timeline(
    traces: Mapping[int, Sequence[dict]],
    title: str | None = None,
    ax=None,
):
    """Each rank's trace (``{rank: course_utils.profiling.events(path)}``) as two lanes: the
    phases of its steps (forward, backward, optimizer: the ``record_function`` spans) and the
    collectives running on gloo's (or NCCL's) threads. Times in ms from the first event of all
    ranks (one clock: the processes share a machine)."""
    fig, ax = _axes(ax, figsize=(11, 1.4 + 1.1 * len(traces)))
    spans = []
    for rank, events in traces.items():
        for e in events:
            if e.get("ph") != "X":
                continue
            if is_phase(e):
                spans.append((rank, 0, e, PHASE_COLORS[e["name"]]))
            elif is_communication(e["name"]):
                spans.append((rank, 1, e, COMM_COLOR))
    if not spans:
        ax.text(0.5, 0.5, "no spans in these traces", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    t0 = min(e["ts"] for _, _, e, _ in spans)
    ticks, labels = [], []
    for rank in sorted(traces):
        for lane, name in ((0, "compute"), (1, "communication")):
            ticks.append(-(2.2 * rank + lane))
            labels.append(f"rank {rank}, {name}")
    for rank, lane, e, color in spans:
        y = -(2.2 * rank + lane)
        ax.barh(y, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.8, color=color, lw=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=COMM_COLOR))
    ax.legend(
        handles,
        [*PHASE_COLORS, "collective (gloo / NCCL)"],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncol=4,
        fontsize=9,
    )
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "What each rank did, step by step (from its profiler trace)")
    fig.tight_layout()
    return fig


def memory_timeline(
    traces: Mapping[str, Sequence[dict]],
    title: str | None = None,
    ax=None,
):
    """Bytes allocated over time from each trace's ``[memory]`` events (``profile_memory=True``):
    one line per label, e.g. ``{"DDP, rank 0": events, "FSDP, rank 0": events}``; each line's
    time from its own first event. The allocations made before the profiler started are not
    seen, so the lines start near zero: what they show is what a step adds and frees."""
    fig, ax = _axes(ax, figsize=(9, 4))
    for label, events in traces.items():
        points = [(e["ts"], e["args"]["Total Allocated"]) for e in memory_records(events)]
        if not points:
            continue
        t0 = points[0][0]
        ax.step(
            [(t - t0) / 1e3 for t, _ in points],
            [b / 2**20 for _, b in points],
            where="post",
            label=label,
        )
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("MiB allocated (since the trace began)")
    ax.set_title(title or "Memory over the profiled steps")
    if ax.lines:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def step_timelines(
    rounds: Mapping[str, Mapping[int, Sequence[dict]]], step: int = 2, width: float = 11
):
    """One panel per version of a step (``{name: {rank: events}}``, lesson 11's overlap
    experiment): each rank's ``step``-th profiled step, as :func:`trace_timeline` draws it."""
    fig, axes = plt.subplots(len(rounds), 1, figsize=(width, 3.4 * len(rounds)), squeeze=False)
    for ax, (name, traces) in zip(axes[:, 0], rounds.items()):
        one_step = {rank: step_events(events, step) for rank, events in traces.items()}
        trace_timeline(one_step, title=f"{name}: one step", ax=ax)
    fig.tight_layout()
    return fig


def memory_steps(steps: Mapping[str, Sequence[dict]], title: str | None = None):
    """Memory over one step per run (``{"DDP": events, "FSDP": events}``, the events of one
    profiled step), a panel each, shaded by the phases (forward, backward, optimizer)."""
    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4), sharey=True, squeeze=False)
    for ax, (name, events) in zip(axes[0], steps.items()):
        memory_timeline({f"{name}, rank 0": events}, title=f"{name}: one step", ax=ax)
        records = memory_records(events)
        t0 = records[0]["ts"] if records else 0  # the line's 0
        for e in events:
            if is_phase(e):
                start, end = (e["ts"] - t0) / 1e3, (e["ts"] + e["dur"] - t0) / 1e3
                ax.axvspan(start, end, color=PHASE_COLORS[e["name"]], alpha=0.15, lw=0)
        shading = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.3) for c in PHASE_COLORS.values()]
        ax.legend([*ax.lines[:1], *shading], [f"{name}, rank 0", *PHASE_COLORS], fontsize=8)
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    fig.suptitle(title or "Memory during one training step")
    fig.tight_layout()
    return fig
