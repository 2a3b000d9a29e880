"""Figures of lessons 12 and 13, the article's challenges: the decision guide, the
compute-to-communication ratio measured against the cost model (:mod:`course_utils.cost_model`),
step times of ranks that wait for each other, attribution maps and how far they agree, and an
autoencoder's 2-D code."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes
from course_utils.plots.measured import _noisy_legend, _spread_line

__all__ = [
    "decision_map",
    "cost_model",
    "rank_steps",
    "attributions",
    "agreement_matrix",
    "code_map",
]


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
    """Which strategy wins where (lesson 13's decision guide): ``choices[i][j]`` is the label at
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


def cost_model(
    batch_sizes: Sequence[int],
    measured: dict[str, Sequence],
    modelled: dict[str, Sequence[float]],
    xlabel: str = "batch per worker",
    ylabel: str = "compute time / all-reduce time",
    title: str | None = None,
    ax=None,
):
    """Measured against modelled ratios (lesson 12's compute-to-communication ratio): one colour
    per model, its measurements solid (medians of :class:`course_utils.measure.Spread` s, min-max
    bars, noisy points hollow) and the cost model dashed; log-log, with the line where the two
    times are equal."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, labels = [], []
    any_noisy = False
    for i, (name, values) in enumerate(measured.items()):
        colour = colours[i % len(colours)]
        line = _spread_line(ax, batch_sizes, values, color=colour)
        if name in modelled:
            ax.plot(batch_sizes, modelled[name], color=colour, ls="--", lw=1.5)
        handles.append(line)
        labels.append(name)
        any_noisy |= any(getattr(v, "noisy", False) for v in values)
    ax.axhline(1, color="black", ls=":", lw=1)
    handles += [
        plt.Line2D([], [], color="gray", marker="o", label="measured"),
        plt.Line2D([], [], color="gray", ls="--", label="cost model"),
        plt.Line2D([], [], color="black", ls=":", label="compute = communication"),
    ]
    labels += ["measured (median, min-max)", "cost model", "compute = communication"]
    if any_noisy:
        handles.append(plt.Line2D([], [], marker="o", mfc="white", mec="gray", ls="none", ms=9))
        labels.append("noisy: repeats > 20% apart")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
    ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def rank_steps(
    xs: Sequence[float],
    ranks: dict[str, Sequence],
    reference: dict[str, Sequence[float]] | None = None,
    xlabel: str = "rank 1's sleep per step (ms)",
    ylabel: str = "ms per step",
    title: str | None = None,
    ax=None,
):
    """Step times of several ranks that may coincide (a synchronous step ends together on every
    rank): each rank gets its own marker and line style and a small sideways offset, so that
    lines lying on top of each other both stay visible; ``reference`` lines are drawn thin and
    dotted. Values may be :class:`course_utils.measure.Spread` s (min-max bars)."""
    fig, ax = _axes(ax, figsize=(6.5, 4.2))
    styles = [("o", "-", 8), ("s", "--", 5), ("^", "-.", 5), ("D", ":", 5)]
    width = (max(xs) - min(xs)) or 1.0
    for i, (label, values) in enumerate(ranks.items()):
        marker, ls, size = styles[i % len(styles)]
        shift = (i - (len(ranks) - 1) / 2) * 0.012 * width
        line = _spread_line(ax, [x + shift for x in xs], values, label=label, ls=ls)
        line.set_marker(marker)
        line.set_markersize(size)
    for label, values in (reference or {}).items():
        ax.plot(xs, values, color="gray", ls=":", lw=1.5, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _noisy_legend(ax, any(getattr(v, "noisy", False) for vs in ranks.values() for v in vs))
    fig.tight_layout()
    return fig


def attributions(
    images,
    maps: dict[str, Sequence],
    titles: Sequence[str] | None = None,
    signed: Sequence[str] = (),
    size: float = 1.7,
):
    """Attribution maps side by side: a column per image (the image on top), a row per method
    (``maps``: ``{method: [(H, W) map per image]}``). Methods named in ``signed`` get a
    blue-white-red scale centred on 0 (red: evidence for the class), the others a dark-to-bright
    one; every map has its own scale, and the digit's outline is drawn over it."""
    images = [np.asarray(im, dtype=float).reshape(np.shape(im)[-2:]) for im in images]
    rows = ["image", *maps]
    fig, axes = plt.subplots(
        len(rows), len(images), figsize=(size * len(images) + 0.9, size * len(rows) + 0.3)
    )
    axes = np.asarray(axes).reshape(len(rows), len(images))
    for j, image in enumerate(images):
        outline = image > image.min() + 0.5 * (image.max() - image.min())
        for i, row in enumerate(rows):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == "image":
                ax.imshow(image, cmap="gray")
                if titles is not None:
                    ax.set_title(titles[j], fontsize=9)
            else:
                m = np.asarray(maps[row][j], dtype=float)
                if row in signed:
                    lim = float(np.abs(m).max()) or 1.0
                    ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
                else:
                    ax.imshow(m, cmap="magma")
                ax.contour(outline, levels=[0.5], colors="limegreen", linewidths=0.6)
            if j == 0:
                ax.set_ylabel(row, fontsize=9)
    fig.tight_layout()
    return fig


def agreement_matrix(
    names: Sequence[str],
    pairs: dict,
    k: int,
    title: str | None = None,
):
    """How far attribution methods agree (lesson 12): two matrices, the mean Spearman rank
    correlation of their patch scores and the mean overlap of their top-``k`` patches, from
    :func:`course_utils.interpret.agreement` (``pairs[(a, b)]`` with keys ``spearman`` and
    ``overlap``); each cell is written in."""
    names = list(names)
    n = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(4.1 * 2 + 0.6, 3.9))
    for ax, key, label, vmin in (
        (axes[0], "spearman", "rank correlation (Spearman)", -1.0),
        (axes[1], "overlap", f"shared top-{k} patches", 0.0),
    ):
        matrix = np.full((n, n), np.nan)
        for (a, b), values in pairs.items():
            i, j = names.index(a), names.index(b)
            matrix[i, j] = matrix[j, i] = values[key]
        np.fill_diagonal(matrix, 1.0)
        image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=1.0)
        for i in range(n):
            for j in range(n):
                if not np.isnan(matrix[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{matrix[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if matrix[i, j] > vmin + 0.6 * (1 - vmin) else "white",
                    )
        ax.set_xticks(range(n), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def code_map(
    codes,
    labels,
    decoded,
    extent: tuple[float, float, float, float],
    title: str | None = None,
):
    """An autoencoder's 2-D code (lesson 12): left, the code of each image as a dot coloured by
    its digit, the digit written at its class's mean; right, what the decoder draws at a grid of
    codes over the same ``extent`` ``(xmin, xmax, ymin, ymax)`` (``decoded``: ``(rows, cols,
    H, W)``, row 0 at the bottom)."""
    codes, labels = np.asarray(codes, dtype=float), np.asarray(labels)
    decoded = np.asarray(decoded, dtype=float)
    rows, cols, h, w = decoded.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    colours = plt.get_cmap("tab10")
    for c in range(10):
        mine = codes[labels == c]
        if len(mine):
            axes[0].scatter(*mine.T, s=4, alpha=0.5, color=colours(c), label=str(c))
            axes[0].text(
                *mine.mean(0),
                str(c),
                fontsize=13,
                weight="bold",
                ha="center",
                va="center",
                color=colours(c),
                bbox=dict(boxstyle="circle,pad=0.2", fc="white", ec=colours(c)),
            )
    axes[0].set(xlim=extent[:2], ylim=extent[2:], xlabel="code 1", ylabel="code 2")
    axes[0].set_title("each test image's code, coloured by digit", fontsize=10)
    axes[0].legend(markerscale=3, fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    mosaic = decoded[::-1].transpose(0, 2, 1, 3).reshape(rows * h, cols * w)  # row 0 at the bottom
    axes[1].imshow(mosaic, cmap="gray", extent=extent, aspect="auto")
    axes[1].set(xlabel="code 1", ylabel="code 2")
    axes[1].set_title("what the decoder draws at each code", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
