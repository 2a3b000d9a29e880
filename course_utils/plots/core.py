"""Figures of lessons 01 and 02 (curves, images, feature maps, throughput, step times), and the
helpers every figure uses."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

__all__ = [
    "curves",
    "feature_maps",
    "stacked_bars",
    "sequence_view",
    "step_time",
    "images",
    "grouped_bars",
]


def _axes(ax=None, figsize=(6, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    return ax.figure, ax


def _log_minor_labels(ax) -> FuncFormatter:
    """Labels for the minor ticks of a log y axis: 2 and 5 of each decade (20, 50, 200, ...), and
    also 3 and 4 when the axis spans little more than one decade, so that it keeps a scale."""

    def label(value: float, _pos=None) -> str:
        low, high = ax.get_ylim()
        wanted = (2, 5) if high / max(low, 1e-300) > 20 else (2, 3, 4, 5)
        mantissa = value / 10 ** np.floor(np.log10(value) + 1e-9)
        near = round(mantissa)
        return f"{value:g}" if near in wanted and abs(mantissa - near) < 1e-6 else ""

    return FuncFormatter(label)


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


def feature_maps(maps, title: str | None = None, ncols: int = 8, cmap: str = "viridis"):
    """The channels of one feature map tensor (C, H, W), one small numbered image each."""
    maps = np.asarray(maps)
    titles = [str(i) for i in range(len(maps))]
    return images(maps, titles, ncols=ncols, cmap=cmap, title=title, size=1.3)


def stacked_bars(
    labels: Sequence[str],
    parts: dict[str, Sequence[float]],
    ylabel: str,
    title: str | None = None,
    ax=None,
    totals: Sequence | None = None,
):
    """Stacked bars, e.g. where a training step's time goes (forward, backward, optimizer).

    ``totals`` (optional, one per bar: :class:`course_utils.measure.Spread` s, or ``(low, high)``
    pairs, in the units of ``parts``) draws a min-max bar on top of each stack: how far the
    repeats of the whole bar were apart. The legend sits in headroom above the tallest bar, so it
    never hides one."""
    fig, ax = _axes(ax)
    bottom = np.zeros(len(labels))
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom += np.asarray(values, dtype=float)
    top = float(bottom.max()) if len(bottom) else 0.0
    if totals is not None:
        ranges = [(t.low, t.high) if hasattr(t, "low") else tuple(t) for t in totals]
        lows = [min(lo, b) for (lo, _), b in zip(ranges, bottom)]
        highs = [max(hi, b) for (_, hi), b in zip(ranges, bottom)]
        yerr = [bottom - np.asarray(lows), np.asarray(highs) - bottom]
        ax.errorbar(
            np.arange(len(labels)),
            bottom,
            yerr=yerr,
            fmt="none",
            ecolor="black",
            capsize=4,
            label="min-max of the repeats",
        )
        top = max(top, max(highs, default=0.0))
    if top > 0:
        ax.set_ylim(0, top * 1.3)  # headroom for the legend
    ax.set(ylabel=ylabel, title=title)
    ax.legend(loc="upper left", ncol=min(len(parts) + (totals is not None), 4), fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def sequence_view(image, t: int = 14, label=None, axes=None):
    """An image read as a sequence (lesson 02): row ``t`` is the input ``x_t`` at time step ``t``.

    Three panels: the image with row ``t`` boxed; the same pixels as the RNN sees them, time running
    left to right (one column per step); and the 28 features of ``x_t``."""
    image = np.asarray(image, dtype=float)
    if image.ndim == 3:  # (1, H, W)
        image = image[0]
    num_steps, num_features = image.shape
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    fig = axes[0].figure
    lo, hi = image.min(), image.max()
    box = dict(fill=False, edgecolor="red", linewidth=2)

    axes[0].imshow(image, cmap="gray", vmin=lo, vmax=hi)
    axes[0].add_patch(plt.Rectangle((-0.5, t - 0.5), num_features, 1, **box))
    title = "the image" if label is None else f"the image (label {int(label)})"
    axes[0].set(title=title, xlabel="pixel in the row = feature", ylabel="row = time step t")

    axes[1].imshow(image.T, cmap="gray", vmin=lo, vmax=hi)
    axes[1].add_patch(plt.Rectangle((t - 0.5, -0.5), 1, num_features, **box))
    axes[1].set(
        title=f"as the RNN reads it: {num_steps} steps", xlabel="time step t", ylabel="feature"
    )

    axes[2].bar(np.arange(num_features), image[t], color="tab:red")
    axes[2].set(
        title=f"x_t at t = {t}: {num_features} features",
        xlabel="feature",
        ylabel="value (normalised)",
    )
    axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def step_time(
    xs: Sequence,
    series: dict[str, Sequence],
    xlabel: str,
    title: str | None = None,
    proportional: bool = True,
    anchor: int = 0,
    log: bool = False,
    ax=None,
):
    """Milliseconds per step against a size (sequence length, batch), one line per series of
    seconds (numbers, or :class:`course_utils.measure.Spread` s: the median is drawn, with a
    min-max bar, and a noisy point hollow); with ``proportional``, a dashed line through point
    ``anchor`` of the first series shows what "time proportional to the size" would look like
    (lesson 02)."""
    from course_utils.plots.measured import _noisy_legend, _spread_line  # measured imports core

    fig, ax = _axes(ax)
    xs = np.asarray(xs, dtype=float)

    def ms(value):  # seconds -> milliseconds, for numbers and spreads alike
        if hasattr(value, "median"):
            return (1e3 * value.median, 1e3 * value.low, 1e3 * value.high, value.noisy)
        return 1e3 * float(value)

    any_noisy = False
    for label, seconds in series.items():
        _spread_line(ax, xs, [ms(s) for s in seconds], label=label)
        any_noisy = any_noisy or any(getattr(s, "noisy", False) for s in seconds)
    if proportional and series:
        first = next(iter(series.values()))[anchor]
        anchor_ms = 1e3 * float(getattr(first, "median", first))
        reference = anchor_ms * xs / xs[anchor]
        ax.plot(xs, reference, "k--", alpha=0.6, label=f"proportional to {xlabel}")
    if log:  # on log axes, label every measured size (on linear ones they would crowd)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        # plain numbers (2, 5, 10, 20, ...) instead of 2×10^0, and labels between the decades,
        # so that a range of less than a decade still has a readable scale
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(_log_minor_labels(ax))
    ax.set(xlabel=xlabel, ylabel="ms per step", title=title)
    ax.grid(alpha=0.3)
    _noisy_legend(ax, any_noisy)
    fig.tight_layout()
    return fig


def images(
    images,
    titles: Sequence[str] | None = None,
    labels=None,
    predictions=None,
    ncols: int | None = None,
    cmap: str = "gray",
    signed: bool = False,
    title: str | None = None,
    size: float = 2.0,
):
    """A row (or grid of ``ncols`` columns) of images (N, H, W) or (N, 1, H, W), each with its
    own title: ``titles``, or the ``labels`` (with ``predictions``: "label → prediction", green
    when right and red when wrong). With ``signed``, a blue-white-red colormap centred on 0 for
    images with negative values (filter kernels, edge maps)."""
    images = [np.asarray(im, dtype=float) for im in images]
    images = [im[0] if im.ndim == 3 else im for im in images]  # (1, H, W): one channel
    n = len(images)
    colors = ["black"] * n
    if titles is None and labels is not None:
        titles = [str(int(label)) for label in labels[:n]]
        if predictions is not None:
            titles = [f"{t} → {int(p)}" for t, p in zip(titles, predictions)]
            colors = ["green" if p == t else "red" for t, p in zip(labels, predictions)]
    ncols = min(ncols or n, max(n, 1))
    nrows = int(np.ceil(n / ncols))
    row = size + (0.35 if titles is not None else 0.0)  # room for each image's title
    figsize = (size * ncols, row * nrows + (0.45 if title else 0.0))
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        im = images[i]
        if signed:
            m = float(np.abs(im).max()) or 1.0
            ax.imshow(im, cmap="RdBu_r", vmin=-m, vmax=m)
        else:
            ax.imshow(im, cmap=cmap)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9, color=colors[i])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def grouped_bars(
    labels: Sequence,
    series: dict[str, Sequence[float]],
    ylabel: str,
    xlabel: str | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
    ax=None,
):
    """Bars side by side for each label, one colour per series (e.g. logits before and after ReLU);
    ``ylim`` can leave headroom for the legend."""
    fig, ax = _axes(ax, figsize=(8, 3.5))
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [str(label) for label in labels])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return fig
