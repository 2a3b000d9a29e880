"""Figures of lesson 03: Amdahl's and Gustafson's laws, and measured speedups as bars.

Measured values may be plain numbers or :class:`course_utils.measure.Spread` s (the median of
repeats): a spread gets a min-max error bar, and a noisy one (repeats more than 20% apart) is drawn
hollow (a point) or hatched (a bar)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils import scaling
from course_utils.measure import ratios
from course_utils.plots.core import _axes
from course_utils.plots.diagrams import WORKER_COLORS

__all__ = ["scaling_laws", "scaling_law_curves", "speedup_bars"]

NOISY_LABEL = "noisy: repeats > 20% apart"


def _value(v) -> tuple[float, float, float, bool]:
    """(median, low, high, noisy) of a number or a Spread."""
    if hasattr(v, "median"):
        return float(v.median), float(v.low), float(v.high), bool(v.noisy)
    return float(v), float(v), float(v), False


def _measured_points(ax, measured: dict | None, width: float) -> float:
    """Draw ``{"label": (workers, speedup)}`` (speedup a number or a Spread) with their min-max
    bars, noisy ones hollow, points at the same N side by side (``width``: the room they share, in
    x units); return the highest value drawn (0 if none)."""
    top = 0.0
    items = list((measured or {}).items())
    for i, (label, (n, speedup)) in enumerate(items):
        same_n = [j for j, (_, (m, _)) in enumerate(items) if m == n]
        x = n + (same_n.index(i) - (len(same_n) - 1) / 2) * width / max(len(same_n), 2)
        median, low, high, noisy = _value(speedup)
        (point,) = ax.plot([x], [median], "o", markersize=8, markeredgecolor="black", label=label)
        color = point.get_color()
        if high > low:
            yerr = [[median - low], [high - median]]
            ax.errorbar([x], [median], yerr=yerr, fmt="none", ecolor=color, capsize=3)
        if noisy:
            point.set(markerfacecolor="white", markeredgecolor=color, markeredgewidth=2)
            point.set_label(f"{label} (noisy: repeats > 20% apart)")
        top = max(top, high)
    return top


def _ceiling(ax, limit: float, top: float, color) -> bool:
    """Amdahl's ceiling as a dashed line; one that lies above the axes' ``top`` gets a short
    "↑ ceiling" mark at the top edge instead (the caller says so in the legend too). Returns
    whether the line is visible."""
    ax.axhline(limit, color=color, linestyle="--", alpha=0.6, linewidth=1)
    if limit <= top:
        return True
    ax.annotate(
        f"↑ ceiling {limit:.3g}×",
        xy=(0.8, 0.985),
        xycoords="axes fraction",
        ha="center",
        va="top",
        fontsize=8,
        color=color,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": color, "alpha": 0.9},
    )
    return False


def scaling_laws(
    ps: Sequence[float] = (0.5, 0.75, 0.9, 0.95, 0.99),
    max_workers: int = 64,
    measured: dict | None = None,
    axes=None,
):
    """Amdahl's speedup (left) and Gustafson's scaled speedup (right) against workers, one line per
    parallel fraction p, with Amdahl's ceilings 1/(1-p) dashed (a ceiling above the plot is named
    at its top edge); ``measured`` adds points ``{"label": (workers, speedup)}`` to both, a
    speedup being a number or a :class:`course_utils.measure.Spread`."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    fig = axes[0].figure
    workers = np.arange(1, max_workers + 1)
    highest = 0.0
    for ax, law, title in (
        (axes[0], scaling.amdahl, "Amdahl: fixed problem, speedup = 1 / ((1-p) + p/N)"),
        (axes[1], scaling.gustafson, "Gustafson: problem grows with N, (1-p) + p·N"),
    ):
        ax.plot(workers, workers, "k:", label="ideal: N")
        for p in ps:
            ax.plot(workers, law(p, workers), label=f"p = {p:g}")
        highest = _measured_points(ax, measured, width=0.03 * max(max_workers - 1, 1))
        ax.set(xlabel="workers N", ylabel="speedup")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    top = max(max_workers, 2.0, highest) * 1.08
    for ax in axes:
        ax.set_ylim(0, top)
    if any(p < 1 for p in ps):
        for line, p in zip(axes[0].lines[1 : 1 + len(ps)], ps):
            limit = scaling.max_speedup(p) if p < 1 else None
            if limit is not None and not _ceiling(axes[0], limit, top, line.get_color()):
                line.set_label(f"p = {p:g} (ceiling {limit:.3g}×, above the plot)")
        handles, labels = axes[0].get_legend_handles_labels()
        handles.append(plt.Line2D([], [], color="gray", linestyle="--"))
        labels.append("ceiling 1/(1-p), dashed, in p's colour")
        axes[0].legend(handles, labels, fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def scaling_law_curves(laws: dict, measured: dict | None = None, ax=None):
    """One parallel fraction, both laws on one axes: ``laws`` is :func:`course_utils.scaling.laws`'
    output (workers, amdahl, gustafson, limit); ``measured`` adds points ``{"label": (N, S)}``
    (S a number or a :class:`course_utils.measure.Spread`). Amdahl's ceiling is drawn dashed, and
    named at the top edge when it lies above the plot."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    workers = np.asarray(laws["workers"])
    n_max = int(workers[-1])
    amdahl_n, gustafson_n = float(laws["amdahl"][-1]), float(laws["gustafson"][-1])
    ax.plot(workers, workers, "k:", label="ideal: N")
    ax.plot(
        workers,
        laws["gustafson"],
        color="tab:green",
        marker=".",
        label=f"Gustafson (problem grows): {gustafson_n:.1f}× at N={n_max}",
    )
    ax.plot(
        workers,
        laws["amdahl"],
        color="tab:blue",
        marker=".",
        label=f"Amdahl (fixed problem): {amdahl_n:.2f}× at N={n_max}",
    )
    highest = _measured_points(ax, measured, width=0.03 * max(n_max - 1, 1))
    top = max(n_max, 2, highest) * 1.05
    if np.isfinite(laws["limit"]):
        limit = float(laws["limit"])
        text = f"Amdahl's ceiling 1/(1-p) = {limit:.3g}×"
        visible = _ceiling(ax, limit, top, "tab:blue")
        ax.lines[-1].set_label(text if visible else f"{text} (above the plot)")
    if np.allclose(laws["amdahl"], workers) and np.allclose(laws["gustafson"], workers):
        ax.annotate(  # p = 1 (or N = 1): three lines in one, say so
            "here both laws equal the ideal N:\nthe three lines coincide",
            xy=(0.97, 0.05),
            xycoords="axes fraction",
            ha="right",
            va="bottom",
            fontsize=8,
        )
    pad = 0.03 * max(n_max - 1, 1)  # room for the measured points' markers at the edges
    ax.set(xlabel="workers N", ylabel="speedup", xlim=(1 - pad, max(n_max, 2) + pad), ylim=(0, top))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def speedup_bars(
    labels: Sequence[str],
    seconds: Sequence,
    title: str | None = None,
    baseline: int = 0,
    ax=None,
):
    """Wall-clock times as bars, in ms or s (whichever reads better), each labelled with its time and
    its speedup over bar ``baseline`` (lesson 03). A time may be a
    :class:`course_utils.measure.Spread` of repeats: the bar is its median, with a min-max error
    bar, hatched when noisy, and the speedup is the median of the paired ratios (with their range)
    when the repeats were interleaved."""
    fig, ax = _axes(ax, figsize=(6, 3.6))
    points = [_value(s) for s in seconds]
    medians = np.array([m for m, *_ in points])
    scale, unit = (1e3, "ms") if medians.max() < 1 else (1.0, "s")
    colors = [WORKER_COLORS[i % len(WORKER_COLORS)] for i in range(len(labels))]
    bars = ax.bar(labels, medians * scale, color=colors, edgecolor="black")
    base = seconds[baseline]
    noisy = False
    for bar, s, (median, low, high, loud) in zip(bars, seconds, points):
        if high > low:
            ax.errorbar(
                bar.get_x() + bar.get_width() / 2,
                median * scale,
                yerr=[[(median - low) * scale], [(high - median) * scale]],
                fmt="none",
                ecolor="black",
                capsize=4,
            )
        if loud:
            bar.set_hatch("//")
            noisy = True
        paired = hasattr(s, "samples") and hasattr(base, "samples") and s is not base
        if paired and len(s.samples) == len(base.samples) and len(s.samples) > 1:
            r = ratios(base, s)
            speedup = f"{r.median:.2f}× ({r.low:.2f}-{r.high:.2f})"
        else:
            speedup = f"{_value(base)[0] / median:.2f}×"
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            high * scale,
            f"{median * scale:.3g} {unit}\n{speedup}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    top = max(high for *_, high, _ in points) * scale
    room = 1.45 if noisy else 1.3  # above the labels: the legend's line, when there is one
    ax.set(ylabel=f"{unit} (lower is faster)", title=title, ylim=(0, top * room))
    if noisy:
        ax.legend([plt.Rectangle((0, 0), 1, 1, facecolor="white", hatch="//")], [NOISY_LABEL],
                  fontsize=8, loc="upper right")  # fmt: skip
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
