"""Figures of lesson 07: the decision guide."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from course_utils.plots.core import _axes

__all__ = ["decision_map"]


def decision_map(
    xs: Sequence[float],
    ys: Sequence[float],
    choices: Sequence[Sequence[str]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    marks: dict | None = None,
    ax=None,
):
    """Which strategy wins where (lesson 07's decision guide): ``choices[i][j]`` is the label at
    ``(xs[j], ys[i])``, one colour per label, both axes logarithmic; ``marks`` ``{"name": (x, y)}``
    places named points (e.g. this machine) on the map."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, ax = _axes(ax, figsize=(7, 4.5))
    order = ["data", "pipeline", "both", "does not fit"]
    labels = [c for c in order if any(c in row for row in choices)]
    labels += sorted({c for row in choices for c in row} - set(labels))
    palette = ["tab:blue", "tab:orange", "tab:green", "lightgray", "tab:red", "tab:purple"]
    colours = [palette[i % len(palette)] for i in range(len(labels))]
    codes = np.array([[labels.index(c) for c in row] for row in choices])  # (len(ys), len(xs))
    ax.pcolormesh(
        xs,
        ys,
        codes,
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(labels) - 0.5,
        shading="nearest",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for name, (x, y) in (marks or {}).items():
        ax.plot([x], [y], "k*", markersize=12)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.legend(
        handles=[Patch(color=c, label=label) for c, label in zip(colours, labels)],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig
