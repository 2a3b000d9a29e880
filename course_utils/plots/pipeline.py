"""Figures of lesson 06: Gantt charts of pipeline schedules and the bubble."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from course_utils.plots.core import _axes


def _field(event, name: str):
    return event[name] if isinstance(event, dict) else getattr(event, name)


def gantt(
    events: Sequence,
    title: str | None = None,
    unit: str = "ms",
    num_stages: int | None = None,
    ax=None,
):
    """A pipeline timeline: one row per stage, a bar per forward (blue) and backward (orange) of
    each microbatch, its number inside; idle time is the white space (the bubble). ``events``:
    objects or dicts with stage, kind ("F"/"B"), microbatch, start, end (seconds, or slots with
    ``unit="slot"``)."""
    fig, ax = _axes(ax, figsize=(9, 2.6))
    scale = {"ms": 1e3, "s": 1.0, "slot": 1.0}[unit]
    stages = [_field(e, "stage") for e in events]
    num_stages = num_stages or (max(stages) + 1 if stages else 1)
    end = max((_field(e, "end") for e in events), default=1.0) * scale
    colors = {"F": "tab:blue", "B": "tab:orange"}
    for e in events:
        start, width = _field(e, "start") * scale, (_field(e, "end") - _field(e, "start")) * scale
        kind, stage = _field(e, "kind"), _field(e, "stage")
        ax.barh(
            stage, width, left=start, height=0.8, color=colors.get(kind, "gray"), edgecolor="white"
        )
        if width > end / 60:  # label bars wide enough to read
            ax.text(
                start + width / 2,
                stage,
                str(_field(e, "microbatch")),
                ha="center",
                va="center",
                fontsize=8,
                color="white",
            )
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
    ax.set_ylim(num_stages - 0.5, -0.5)  # stage 0 on top, as data flows downwards
    ax.set_xlim(0, end * 1.01)
    ax.set(xlabel="time slot" if unit == "slot" else f"time ({unit})", title=title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["forward", "backward"], loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def bubble(
    microbatches: Sequence[int],
    formula: dict[str, Sequence[float]],
    simulated: dict[str, Sequence[float]] | None = None,
    measured: dict[str, Sequence[float]] | None = None,
    title: str | None = "Pipeline bubble",
    ax=None,
):
    """Idle fraction against the number of microbatches: the formula as lines, the simulation as
    open circles, measurements as crosses; one colour per key (e.g. "p = 2") in all three.
    A measured series may hold None where nothing was measured."""
    fig, ax = _axes(ax)
    for k, (label, values) in enumerate(formula.items()):
        color = f"C{k}"
        ax.plot(microbatches, values, color=color, label=f"{label}: (p-1)/(m+p-1)")
        if simulated and label in simulated:
            ax.plot(
                microbatches,
                simulated[label],
                "o",
                mfc="none",
                color=color,
                ms=9,
                label=f"{label}: simulated",
            )
        if measured and label in measured:
            pts = [(m, v) for m, v in zip(microbatches, measured[label]) if v is not None]
            if pts:
                ax.plot(*zip(*pts), "x", color=color, ms=9, mew=2, label=f"{label}: measured")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(microbatches), [str(m) for m in microbatches])
    ax.set(xlabel="microbatches m", ylabel="idle share of stage time", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- lesson 04: communication ------------------------------------------------------------------
