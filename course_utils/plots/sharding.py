"""Figures of lesson 08 (sharded data parallel): the model state per rank against the world size
under each ZeRO stage, the bytes a step sends against the formula, and the bytes each rank holds,
measured, against the formula."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes

__all__ = ["zero_memory", "traffic_bars", "memory_bars"]

_FORMULA = dict(color="black", marker="_", markersize=26, markeredgewidth=2.5, linestyle="none")
# the parts of a rank's memory, in the order they are stacked, and their colours
PARTS = {
    "parameters": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer": "#55a868",
    "activations": "#c9c9c9",
}


def zero_memory(
    world_sizes: Sequence[int],
    per_stage: dict[str, Sequence[float]],
    capacity: tuple[float, str] | None = None,
    ylabel: str = "GB of model state per rank",
    title: str | None = None,
    ax=None,
):
    """Model state per rank against the number of ranks, one line per ZeRO stage (``per_stage``:
    ``{label: a value per world size}``), both axes logarithmic; ``capacity`` ``(value, label)``:
    a dotted horizontal line (one device's memory). The legend sits beside the axes."""
    fig, ax = _axes(ax, figsize=(10, 4.2))
    for label, values in per_stage.items():
        ax.plot(world_sizes, values, marker="o", markersize=4, label=label)
    if capacity is not None:
        ax.axhline(capacity[0], color="black", linestyle=":", linewidth=1.2, label=capacity[1])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(world_sizes), [str(n) for n in world_sizes])
    ax.minorticks_off()
    ax.set(xlabel="ranks (data-parallel world size N)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def traffic_bars(
    labels: Sequence[str],
    counted: Sequence[float | None],
    formula: Sequence[float | None],
    reference: tuple[float, str] | None = None,
    unit: float = 2**10,
    ylabel: str = "KiB sent per rank and step",
    title: str | None = None,
    ax=None,
):
    """Bytes counted (a bar each; None: no bar) beside the formula's (a black mark each; None: no
    mark), divided by ``unit`` on the axis. ``reference`` ``(bytes, label)``: a dotted line (DDP's
    all-reduce, say), and each bar says its height as a multiple of it."""
    fig, ax = _axes(ax, figsize=(7, 4))
    x = np.arange(len(labels))
    counted = [None if c is None else float(c) / unit for c in counted]
    formula = [None if f is None else float(f) / unit for f in formula]
    if reference is not None:
        reference = (float(reference[0]) / unit, reference[1])
    heights = [0.0 if c is None else c for c in counted]
    ax.bar(x, heights, width=0.55, color="#4c72b0", label="counted")
    marks = [(xi, f) for xi, f in zip(x, formula) if f is not None]
    if marks:
        ax.plot(*zip(*marks), **_FORMULA, label="formula")
    top = max(heights + [f for _, f in marks] + ([reference[0]] if reference else []) + [0.0])
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle=":", linewidth=1.2, label=reference[1])
        for xi, c in zip(x, counted):
            if c is not None:
                ratio = f"{c / reference[0]:.2f}x"
                ax.text(xi, c + 0.02 * top, ratio, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, list(labels))
    ax.set(ylabel=ylabel, title=title)
    ax.set_ylim(0, 1.3 * top if top > 0 else 1)  # headroom for the legend and the ratios
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", handlelength=3, markerscale=0.6)
    fig.tight_layout()
    return fig


def memory_bars(
    groups: dict[str, dict[str, dict[str, float]]],
    formula: dict[str, dict[str, float]] | None = None,
    unit: float = 2**20,
    ylabel: str = "MiB per rank",
    title: str | None = None,
):
    """What each rank holds, measured, as stacked bars: one panel per group (a world size), one bar
    per strategy, stacked by part (``groups[group][strategy][part]``, in bytes; the parts named in
    :data:`PARTS` come in that order, activations hatched). ``formula[group][strategy]``: the
    formula's bytes (of the model state), a black mark on its bar. Heights are divided by
    ``unit``. One legend, above the panels."""
    fig, axes = plt.subplots(
        1, len(groups), figsize=(3.6 * len(groups) + 1.0, 4.4), sharey=True, squeeze=False
    )
    axes = axes[0]
    top = 0.0
    for ax, (group, strategies) in zip(axes, groups.items()):
        names = list(strategies)
        x = np.arange(len(names))
        bottom = np.zeros(len(names))
        present = {part for held in strategies.values() for part in held}
        parts = [p for p in PARTS if p in present] + sorted(present - set(PARTS))  # others last
        for part in parts:
            values = np.array([strategies[n].get(part, 0.0) / unit for n in names])
            ax.bar(
                x,
                values,
                width=0.65,
                bottom=bottom,
                color=PARTS.get(part),
                hatch="//" if part == "activations" else None,
                edgecolor="white",
                label=part,
            )
            bottom += values
        top = max(top, float(bottom.max(initial=0.0)))
        if formula and group in formula:
            marks = [
                (xi, formula[group][n] / unit) for xi, n in zip(x, names) if n in formula[group]
            ]
            if marks:
                ax.plot(*zip(*marks), **_FORMULA, label="formula (model state)")
                top = max(top, max(v for _, v in marks))
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(group)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(ylabel)
    axes[0].set_ylim(0, 1.08 * top if top > 0 else 1)
    found = {}  # label -> handle, over every panel (a part may be missing from some)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            found.setdefault(label, handle)
    labels = sorted(found, key=lambda k: list(PARTS).index(k) if k in PARTS else len(PARTS))
    handles = [found[label] for label in labels]
    if title:
        fig.suptitle(title, y=0.99)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if title else 0.94))
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.95 if title else 1.0),
        ncol=len(labels),
        fontsize=8,
        frameon=False,
        handlelength=3,
        markerscale=0.6,
    )
    return fig
