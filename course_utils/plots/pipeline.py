"""Figures of lessons 06 and 07: Gantt charts of pipeline schedules, the bubble, the pipeline panel."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes
from course_utils.plots.measured import _noisy_legend, measurements

__all__ = ["gantt", "gantts", "bubble", "schedule_bubbles", "pipeline_speedups", "pipeline_panel"]


def _field(event, name: str):
    return event[name] if isinstance(event, dict) else getattr(event, name)


def _row(event) -> int:
    """The timeline row of an event: its rank where it carries one (the V schedules), else its
    stage (which is the rank of a measured multi-stage run)."""
    rank = event.get("rank") if isinstance(event, dict) else getattr(event, "rank", None)
    return _field(event, "stage") if rank is None else rank


def gantt(
    events: Sequence,
    title: str | None = None,
    unit: str = "ms",
    num_stages: int | None = None,
    ax=None,
    row_label: str | None = None,
):
    """A pipeline timeline: one row per stage, a bar per forward (blue) and backward (orange) of
    each microbatch, its number inside; a split backward's weight-gradient step ("W") in green,
    its input-gradient step ("B") orange; idle time is the white space (the bubble). ``events``:
    objects or dicts with stage, kind ("F"/"B"/"W"), microbatch, start, end (seconds, or slots
    with ``unit="slot"``), and optionally rank. ``row_label`` names the rows: ``"stage"``, or
    ``"rank"`` where each row is a worker holding several stages (interleaved 1F1B records the
    rank in ``stage``; simulated V schedules carry a rank, drawn by row, their way back hatched);
    by default "rank" when the events carry ranks."""
    fig, ax = _axes(ax, figsize=(9, 2.6))
    scale = {"ms": 1e3, "s": 1.0, "slot": 1.0}[unit]
    rows = [_row(e) for e in events]
    num_stages = num_stages or (max(rows) + 1 if rows else 1)
    ranked = any(_row(e) != _field(e, "stage") for e in events)  # several stages per row
    row_label = row_label or ("rank" if ranked else "stage")
    end = max((_field(e, "end") for e in events), default=1.0) * scale
    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    for e, row in zip(events, rows):
        start, width = _field(e, "start") * scale, (_field(e, "end") - _field(e, "start")) * scale
        kind, back = _field(e, "kind"), ranked and _field(e, "stage") >= num_stages
        ax.barh(
            row,
            width,
            left=start,
            height=0.8,
            color=colors.get(kind, "gray"),
            edgecolor="white",
            hatch="///" if back else None,  # the V's way back: the rank's second stage
        )
        if width > end / 60:  # label bars wide enough to read
            ax.text(
                start + width / 2,
                row,
                str(_field(e, "microbatch")),
                ha="center",
                va="center",
                fontsize=8,
                color="white",
            )
    ax.set_yticks(range(num_stages), [f"{row_label} {s}" for s in range(num_stages)])
    ax.set_ylim(num_stages - 0.5, -0.5)  # stage 0 on top, as data flows downwards
    ax.set_xlim(0, end * 1.01)
    ax.set(xlabel="time slot" if unit == "slot" else f"time ({unit})", title=title)
    kinds = [_field(e, "kind") for e in events]
    split, whole = "W" in kinds, kinds.count("B") > kinds.count("W")  # some backwards not split
    labels = {"F": "forward", "B": "backward"}
    if split:
        labels["B"] = "backward, or its input part (B)" if whole else "backward: input (B)"
        labels["W"] = "backward: weights (W)"
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in labels]
    names = list(labels.values())
    if ranked:
        handles.append(plt.Rectangle((0, 0), 1, 1, fc="white", ec="gray", hatch="///"))
        names.append("way back (2nd stage)")
    # beside the rows, not over them: a legend inside would hide bars
    ax.legend(
        handles, names, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0, fontsize=8
    )
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
    A measured series may hold None where nothing was measured, and
    :class:`course_utils.measure.Spread` s of repeats: a cross at the median, a min-max bar, and
    a square around a noisy point (repeats more than 20% apart)."""
    fig, ax = _axes(ax, figsize=(8, 4))  # the legend sits beside the axes
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
                xs = [m for m, _ in pts]
                mid = [float(getattr(v, "median", v)) for _, v in pts]
                low = [float(getattr(v, "low", v)) for _, v in pts]
                high = [float(getattr(v, "high", v)) for _, v in pts]
                ax.plot(xs, mid, "x", color=color, ms=9, mew=2, label=f"{label}: measured")
                if any(h > lo for lo, h in zip(low, high)):
                    yerr = [[c - lo for c, lo in zip(mid, low)], [h - c for c, h in zip(mid, high)]]
                    ax.errorbar(xs, mid, yerr=yerr, fmt="none", ecolor=color, capsize=3)
                loud = [(x, c) for x, c, (_, v) in zip(xs, mid, pts) if getattr(v, "noisy", False)]
                if loud:
                    ax.plot(
                        *zip(*loud),
                        "s",
                        mfc="none",
                        color=color,
                        ms=13,
                        label=f"{label}: noisy (repeats > 20% apart)",
                    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(microbatches), [str(m) for m in microbatches])
    ax.set(xlabel="microbatches m", ylabel="idle share of stage time", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def schedule_bubbles(
    schedules: Sequence[str],
    formula: dict[str, float],
    simulated: dict[str, float],
    measured: dict,
    title: str | None = None,
    ax=None,
):
    """The bubble of each schedule three ways, side by side: with equal stages and F = B = W
    (``formula``: the formula, or the simulation where there is none), simulated from measured
    costs with free messages (``simulated``), and ``measured`` (a number or a
    :class:`course_utils.measure.Spread`: its median, with a min-max bar; a schedule missing
    from it is marked "not run")."""
    fig, ax = _axes(ax, figsize=(8, 3.6))  # the legend sits beside the axes
    x, width = np.arange(len(schedules)), 0.27
    ax.bar(x - width, [formula[s] for s in schedules], width, color="C0", label="equal costs")
    ax.bar(x, [simulated[s] for s in schedules], width, color="C1", label="simulated")
    top = max([*formula.values(), *simulated.values()])
    drawn = False
    for i, s in enumerate(schedules):
        v = measured.get(s)
        if v is None:
            ax.text(
                x[i] + width, 0.01, "not run", rotation=90, ha="center", va="bottom", fontsize=8
            )
            continue
        mid, low, high = (float(getattr(v, k, v)) for k in ("median", "low", "high"))
        ax.bar(x[i] + width, mid, width, color="C2", label=None if drawn else "measured")
        if high > low:
            ax.errorbar(x[i] + width, mid, yerr=[[mid - low], [high - mid]], fmt="none", ecolor="k")
        drawn, top = True, max(top, high)
    ax.set_xticks(x, list(schedules))
    ax.set(ylabel="idle share of a rank's step", title=title, ylim=(0, min(1.0, 1.15 * top)))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def pipeline_speedups(
    points: Sequence[dict],
    num_stages: int,
    title: str | None = None,
    ylabel: str = "speedup over 1 process",
    ax=None,
    by: str = "schedule",
):
    """Measured speedups of a pipeline of ``num_stages`` stages against the number of
    microbatches, one line per value of the points' ``by`` key (a schedule, or e.g. with
    ``by="baseline"`` the baseline each speedup is over; points as :func:`measurements` reads
    them: median, and a min-max bar and a hollow noisy marker where
    ``speedup_min``/``_max``/``_noisy`` are given), with the bound m·p/(m+p-1) as a dashed line
    and one process (1.0) as a dotted one. The y axis reaches the bound and the highest bar, so
    neither is clipped."""
    from course_utils.pipeline import schedules as sched

    fig, ax = _axes(ax, figsize=(8, 4))  # the legend sits beside the axes
    if not points:
        ax.set_axis_off()
        return fig
    measurements(
        points, x="microbatches", y="speedup", by=by, ax=ax, ylabel=ylabel, title=title, dodge=0.08
    )
    ms = sorted({r["microbatches"] for r in points})
    bounds = [sched.speedup_bound(num_stages, k) for k in ms]
    ax.plot(ms, bounds, "k--", marker="_", markersize=14, label="bound m·p/(m+p-1)")
    ax.axhline(1.0, color="gray", lw=1, ls=":", label="one process")
    top = max(bounds + [r.get("speedup_max", r["speedup"]) for r in points])
    ax.set_ylim(0, 1.15 * top)
    if len(ms) == 1:  # one point: give the x axis some room around it
        ax.set_xlim(ms[0] / 2, ms[0] * 2)
    _noisy_legend(ax, any(r.get("speedup_noisy") for r in points))
    legend = ax.get_legend()  # moved beside the axes: inside, it can hide the bound's markers
    ax.legend(
        legend.legend_handles,
        [t.get_text() for t in legend.get_texts()],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0,
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def pipeline_panel(
    simulated: Sequence,
    measured: dict | None,
    points: Sequence[dict],
    stages: int,
    microbatches: int,
    schedule: str,
    engine: str,
):
    """Lesson 06's panel: the simulated timeline of a setting (left), its measured one once Run
    (middle), and the measured speedups of every ``microbatches`` tried at this number of
    ``stages`` (right, :func:`pipeline_speedups`): each schedule a line of medians with min-max
    bars, the bound m·p/(m+p-1) as a dashed line with a marker at each measured m (visible even
    with one point)."""
    from course_utils.pipeline import schedules as sched

    p, m = stages, microbatches
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.4), gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    gantt(
        simulated,
        num_stages=p,
        ax=axes[0],
        title=f"simulated: {schedule}, p={p}, m={m}, bubble {sched.bubble_fraction(simulated, p):.0%}",
    )
    if measured is not None:
        gantt(
            measured["events"],
            num_stages=p,
            ax=axes[1],
            title=f"measured ({engine}): bubble {measured['bubble']:.0%}",
        )
    else:
        axes[1].text(0.5, 0.5, "press Run to measure this setting", ha="center", va="center")
        axes[1].set_axis_off()
    pipeline_speedups(points, p, title=f"p = {p}, measured", ax=axes[2])
    fig.tight_layout()
    return fig


def gantts(
    panels: Sequence[Sequence[tuple]],
    unit: str = "ms",
    num_stages: int | None = None,
    row_label: str | None = None,
    width: float = 11.0,
):
    """A grid of :func:`gantt` charts on one time axis: ``panels[row][column]`` is
    ``(events, title)``; the x axis of every chart reaches the longest timeline, so that bars of
    the same length look the same everywhere (a simulated step beside a measured one)."""
    nrows, ncols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 2.5 * nrows + 0.3), squeeze=False)
    scale = {"ms": 1e3, "s": 1.0, "slot": 1.0}[unit]
    end = max(e.end for row in panels for ev, _ in row for e in ev)
    for r, row in enumerate(panels):
        for c, (events, title) in enumerate(row):
            gantt(events, title, unit, num_stages, axes[r, c], row_label)
            axes[r, c].set_xlim(0, 1.01 * scale * end)
        for c in range(len(row), ncols):
            axes[r, c].set_axis_off()
    fig.tight_layout()
    return fig
