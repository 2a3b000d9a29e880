"""Every figure of the course. Each function takes ``ax=None`` (or draws its own grid) and returns
the figure; importing this module changes no global matplotlib state."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np


def _axes(ax=None, figsize=(6, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    return ax.figure, ax


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def curves(histories: dict, smooth: int = 10, axes=None):
    """Loss and accuracy per step for one or more runs: ``{"label": History or dict}``."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    fig = axes[0].figure
    for label, h in histories.items():
        h = h if isinstance(h, dict) else h.as_dict()
        for ax, key in zip(axes, ("losses", "accuracies")):
            values = _smooth(h[key], smooth)
            ax.plot(np.arange(len(values)) + min(smooth, len(h[key])) - 1, values, label=label)
    axes[0].set(xlabel="step", ylabel="training loss", title="Loss (moving average)")
    axes[1].set(
        xlabel="step", ylabel="training accuracy", title="Accuracy (moving average)", ylim=(0, 1.02)
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def image_grid(
    images,
    labels=None,
    predictions=None,
    ncols: int = 10,
    title: str | None = None,
    cmap: str = "gray",
):
    """A grid of images (N, H, W) or (N, 1, H, W), with their labels (and predictions) above."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 * ncols, 1.35 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap=cmap)
        if labels is not None:
            text = str(int(labels[i]))
            color = "black"
            if predictions is not None:
                text += f" → {int(predictions[i])}"
                color = "green" if predictions[i] == labels[i] else "red"
            ax.set_title(text, fontsize=9, color=color)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def feature_maps(maps, title: str | None = None, ncols: int = 8, cmap: str = "viridis"):
    """The channels of one feature map tensor (C, H, W), one small image each."""
    maps = np.asarray(maps)
    n = maps.shape[0]
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(maps[i], cmap=cmap)
            ax.set_title(str(i), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def throughput(
    xs: Sequence,
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str = "samples / s",
    title: str | None = None,
    logx: bool = True,
    ax=None,
):
    """Throughput (or any rate) against a setting, one line per series."""
    fig, ax = _axes(ax)
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def stacked_bars(
    labels: Sequence[str],
    parts: dict[str, Sequence[float]],
    ylabel: str,
    title: str | None = None,
    ax=None,
):
    """Stacked bars, e.g. where a training step's time goes (forward, backward, optimizer)."""
    fig, ax = _axes(ax)
    bottom = np.zeros(len(labels))
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom += np.asarray(values, dtype=float)
    ax.set(ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
