"""Measured points with their spread: every widget's points (:func:`measurements`) and rates
against a setting (:func:`throughput`). Medians of repeats are drawn with a min-max error bar, and
a point whose repeats disagree by more than 20% is drawn hollow and called noisy in the legend
(:class:`course_utils.measure.Spread`)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from course_utils.plots.core import _axes

__all__ = ["measurements", "throughput"]


def _spread_line(ax, xs, values, label=None, **style):
    """A line through the medians of ``values`` (numbers, or :class:`course_utils.measure.Spread`
    s, or ``(median, low, high, noisy)`` tuples) with a min-max error bar at each repeated point
    and noisy points (repeats more than 20% apart) drawn hollow. Returns the line."""
    medians, lows, highs, noisy = [], [], [], []
    for v in values:
        if hasattr(v, "median"):
            v = (v.median, v.low, v.high, v.noisy)
        elif not isinstance(v, tuple):
            v = (float(v), float(v), float(v), False)
        medians.append(v[0])
        lows.append(v[1])
        highs.append(v[2])
        noisy.append(v[3])
    (line,) = ax.plot(xs, medians, marker="o", label=label, **style)
    if any(h > lo for lo, h in zip(lows, highs)):
        yerr = [[m - lo for m, lo in zip(medians, lows)], [h - m for m, h in zip(medians, highs)]]
        ax.errorbar(xs, medians, yerr=yerr, fmt="none", ecolor=line.get_color(), capsize=3)
    loud = [(x, m) for x, m, n in zip(xs, medians, noisy) if n]
    if loud:
        ax.plot(*zip(*loud), "o", color=line.get_color(), mfc="white", ms=9, mew=1.5)
    return line


def _noisy_legend(ax, any_noisy: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if any_noisy:
        handles.append(plt.Line2D([], [], marker="o", mfc="white", mec="gray", ls="none", ms=9))
        labels.append("noisy: repeats > 20% apart")
    if handles:
        ax.legend(handles, labels, fontsize=8)


def throughput(
    xs: Sequence,
    series: dict[str, Sequence],
    xlabel: str,
    ylabel: str = "samples / s",
    title: str | None = None,
    logx: bool = True,
    ax=None,
):
    """Throughput (or any rate) against a setting, one line per series; a series may hold
    :class:`course_utils.measure.Spread` s (median, min-max bar, noisy points hollow)."""
    fig, ax = _axes(ax)
    for label, ys in series.items():
        _spread_line(ax, xs, ys, label=label)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    _noisy_legend(ax, any(getattr(v, "noisy", False) for ys in series.values() for v in ys))
    fig.tight_layout()
    return fig


def measurements(
    points: Sequence[dict],
    x: str,
    y: str,
    by: str | None = None,
    xlabel: str | None = None,
    ylabel: str = "samples / s",
    title: str | None = None,
    logx: bool = True,
    ax=None,
    dodge: float = 0.0,
):
    """Measured points (dicts, e.g. a widget's results) as ``y`` against ``x``, one line per value
    of ``by``, points sorted along x; works with any subset of the settings measured so far. A
    point with ``{y}_min``/``{y}_max`` (and ``{y}_noisy``) keys, as
    :meth:`course_utils.measure.Spread.as_dict` writes them, gets its error bar. ``dodge``: shift
    the lines sideways by this much (in octaves on a log axis), so equal points stay visible."""
    fig, ax = _axes(ax)
    groups: dict = {}
    for p in points:
        value = (p[y], p.get(f"{y}_min", p[y]), p.get(f"{y}_max", p[y]), p.get(f"{y}_noisy", False))
        groups.setdefault(p[by] if by else None, []).append((p[x], value))
    keys = sorted(groups, key=lambda k: (k is None, k))
    for i, key in enumerate(keys):
        xs, values = zip(*sorted(groups[key]))
        if dodge:
            shift = dodge * (i - (len(keys) - 1) / 2)
            xs = [v * 2**shift if logx else v + shift for v in xs]
        _spread_line(ax, xs, values, label=f"{by} = {key}" if by else None)
    all_xs = sorted({p[x] for p in points})
    if logx and all_xs and min(all_xs) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_xs, [str(v) for v in all_xs])
    ax.set(xlabel=xlabel or x, ylabel=ylabel, title=title)
    if points:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if points and (by or any(p.get(f"{y}_noisy") for p in points)):
        _noisy_legend(ax, any(p.get(f"{y}_noisy") for p in points))
    fig.tight_layout()
    return fig
