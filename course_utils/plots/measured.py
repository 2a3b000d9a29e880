"""Measured points with their spread: every widget's points (:func:`measurements`) and rates
against a setting (:func:`throughput`); lesson 01's two sweeps (:func:`thread_sweep`,
:func:`step_phases`). Medians of repeats are drawn with a min-max error bar, and
a point whose repeats disagree by more than 20% is drawn hollow and called noisy in the legend
(:class:`course_utils.measure.Spread`)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from course_utils.plots.core import _axes

__all__ = ["measurements", "throughput", "thread_sweep", "step_phases"]


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


def thread_sweep(batch_sizes: Sequence[int], throughputs: dict, cores: int):
    """Lesson 01: samples/s against the batch size, one line per thread count (left), and the
    paired speedup of each thread count over 1 thread, with its ideal dotted (right).
    ``throughputs``: ``{batch size: {threads: Spread}}`` (:func:`course_utils.single_device.
    throughput_sweep`)."""
    from course_utils.measure import ratios

    threads = list(next(iter(throughputs.values())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    throughput(
        batch_sizes,
        {f"{t} thread(s)": [throughputs[b][t] for b in batch_sizes] for t in threads},
        xlabel="batch size",
        title="Throughput vs batch size",
        ax=axes[0],
    )
    top = max(s.high for row in throughputs.values() for s in row.values())
    axes[0].set_ylim(0, 1.3 * top)  # from zero, so that differences look as big as they are
    more = [t for t in threads if t != 1]
    if not more:
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "one core: no thread count to compare", ha="center")
        return fig
    speedups = {
        t: [ratios(throughputs[b][t], throughputs[b][1]) for b in batch_sizes] for t in more
    }
    axes[1].axhline(1, color="black", linestyle="--", linewidth=1, label="1 thread: no gain")
    throughput(
        batch_sizes,
        {f"{t} threads": speedups[t] for t in more},
        xlabel="batch size",
        ylabel="speedup over 1 thread (paired)",
        title=f"Speedup of more threads (dotted: ideal; {cores} cores)",
        ax=axes[1],
    )
    colors = {line.get_label(): line.get_color() for line in axes[1].get_lines()}
    for t in more:  # the ideal: t threads, t times the throughput
        axes[1].axhline(t, color=colors[f"{t} threads"], linestyle=":", linewidth=1.5)
    highest = max([*more, *(s.high for row in speedups.values() for s in row)])
    axes[1].set_ylim(0, 1.15 * highest)
    fig.tight_layout()
    return fig


def step_phases(phases: dict, step: dict):
    """Lesson 01: where a step's time goes, per step (left) and per sample (right), as stacked
    medians of each phase with the whole step's min-max bar. ``phases``: ``{batch: {phase:
    Spread of ms}}``, ``step``: ``{batch: Spread of ms}`` (:func:`course_utils.single_device.
    phase_sweep`)."""
    from course_utils.plots.core import stacked_bars

    batch_sizes = list(phases)
    names = list(next(iter(phases.values())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, per_sample in zip(axes, (False, True)):
        scale = [1 / b if per_sample else 1.0 for b in batch_sizes]
        stacked_bars(
            [f"batch {b}" for b in batch_sizes],
            {n: [k * phases[b][n].median for k, b in zip(scale, batch_sizes)] for n in names},
            ylabel="ms per sample" if per_sample else "ms per step",
            title="per sample" if per_sample else "per step",
            totals=[(k * step[b].low, k * step[b].high) for k, b in zip(scale, batch_sizes)],
            ax=ax,
        )
    fig.tight_layout()
    return fig
