"""Figures of lesson 03: Amdahl's and Gustafson's laws, and measured speedups as bars."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils import scaling
from course_utils.plots.core import _axes
from course_utils.plots.diagrams import WORKER_COLORS

__all__ = ["scaling_laws", "scaling_law_curves", "speedup_bars"]


def scaling_laws(
    ps: Sequence[float] = (0.5, 0.75, 0.9, 0.95, 0.99),
    max_workers: int = 64,
    measured: dict[str, tuple[float, float]] | None = None,
    axes=None,
):
    """Amdahl's speedup (left) and Gustafson's scaled speedup (right) against workers, one line per
    parallel fraction p; ``measured`` adds points ``{"label": (workers, speedup)}`` to both."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    fig = axes[0].figure
    workers = np.arange(1, max_workers + 1)
    for ax, law, title in (
        (axes[0], scaling.amdahl, "Amdahl: fixed problem, speedup = 1 / ((1-p) + p/N)"),
        (axes[1], scaling.gustafson, "Gustafson: problem grows with N, (1-p) + p·N"),
    ):
        ax.plot(workers, workers, "k:", label="ideal: N")
        for p in ps:
            line = ax.plot(workers, law(p, workers), label=f"p = {p:g}")[0]
            if law is scaling.amdahl and p < 1:
                ax.axhline(
                    scaling.max_speedup(p),
                    color=line.get_color(),
                    linestyle="--",
                    alpha=0.4,
                    linewidth=0.8,
                )
        for label, (n, speedup) in (measured or {}).items():
            ax.plot([n], [speedup], "o", markersize=8, markeredgecolor="black", label=label)
        ax.set(xlabel="workers N", ylabel="speedup", title=title)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top = max(
        scaling.max_speedup(max(p for p in ps if p < 1) if any(p < 1 for p in ps) else 0.0), 2.0
    )
    axes[0].set_ylim(0, min(max_workers, top) * 1.1)
    axes[1].set_ylim(0, max_workers * 1.05)
    fig.tight_layout()
    return fig


def scaling_law_curves(laws: dict, measured: dict[str, tuple[float, float]] | None = None, ax=None):
    """One parallel fraction, both laws on one axes: ``laws`` is :func:`course_utils.scaling.laws`'
    output (workers, amdahl, gustafson, limit); ``measured`` adds points ``{"label": (N, S)}``."""
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
    if np.isfinite(laws["limit"]):
        ax.axhline(
            laws["limit"],
            color="tab:blue",
            linestyle="--",
            alpha=0.6,
            label=f"Amdahl's ceiling 1/(1-p) = {laws['limit']:.1f}×",
        )
    for label, (n, speedup) in (measured or {}).items():
        ax.plot([n], [speedup], "o", markersize=9, markeredgecolor="black", label=label)
    ax.set(
        xlabel="workers N",
        ylabel="speedup",
        xlim=(1, max(n_max, 2)),
        ylim=(0, max(n_max, 2) * 1.05),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def speedup_bars(
    labels: Sequence[str],
    seconds: Sequence[float],
    title: str | None = None,
    baseline: int = 0,
    ax=None,
):
    """Wall-clock times as bars, in ms or s (whichever reads better), each labelled with its time and
    its speedup over bar ``baseline`` (lesson 03)."""
    fig, ax = _axes(ax, figsize=(6, 3.6))
    seconds = np.asarray(seconds, dtype=float)
    scale, unit = (1e3, "ms") if seconds.max() < 1 else (1.0, "s")
    values = seconds * scale
    colors = [WORKER_COLORS[i % len(WORKER_COLORS)] for i in range(len(labels))]
    bars = ax.bar(labels, values, color=colors, edgecolor="black")
    for bar, value, s in zip(bars, values, seconds):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            value,
            f"{value:.3g} {unit}\n{seconds[baseline] / s:.2f}×",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel=f"{unit} (lower is faster)", title=title, ylim=(0, values.max() * 1.3))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
