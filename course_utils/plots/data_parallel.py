"""Figures of lesson 05: speedup and efficiency, sample orders, DDP's bucket timeline."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes
from course_utils.plots.measured import _noisy_legend, _spread_line

__all__ = ["speedup", "sample_orders", "ddp_timeline"]


def speedup(
    points: Sequence[dict],
    by: str | None = "label",
    cores: int | None = None,
    title: str | None = None,
    axes=None,
):
    """Speedup (left) and scaling efficiency (right) against the number of workers, with the ideal
    lines (speedup N, efficiency 1). ``points``: dicts with ``nproc`` and ``speedup`` (and
    optionally ``speedup_min``/``speedup_max``/``speedup_noisy``, the spread of repeats: an error
    bar, and a hollow marker when noisy), one line per value of ``by``. With ``cores``, the worker
    counts above it are shaded: those runs oversubscribe the machine."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    fig = axes[0].figure
    groups: dict = {}
    for p in points:
        s = p["speedup"]
        value = (s, p.get("speedup_min", s), p.get("speedup_max", s), p.get("speedup_noisy", False))
        groups.setdefault(p[by] if by else None, []).append((p["nproc"], value))
    all_n = sorted({p["nproc"] for p in points} | {1})
    n_max = max(all_n + [2])
    grid = np.arange(1, n_max + 1)
    axes[0].plot(grid, grid, "k--", alpha=0.7, label="ideal: N times faster")
    axes[1].plot(grid, 100 * np.ones_like(grid), "k--", alpha=0.7, label="ideal: 100%")
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        ns, values = zip(*sorted(groups[key]))
        label = str(key) if by and key is not None else None
        _spread_line(axes[0], ns, values, label=label)
        efficiency = [tuple(100 * v / n if not isinstance(v, bool) else v for v in value)
                      for n, value in zip(ns, values)]  # fmt: skip
        _spread_line(axes[1], ns, efficiency, label=label)
    highs = [v[2] for pts in groups.values() for _, v in pts]
    top = max(highs + [n_max]) * 1.1
    axes[0].set(xlabel="workers N", ylabel="speedup over 1 worker", ylim=(0, top))
    axes[1].set(xlabel="workers N", ylabel="scaling efficiency, % (speedup / N)")
    effs = [100 * v[2] / n for pts in groups.values() for n, v in pts]
    axes[1].set_ylim(0, max(110, max(effs + [100]) * 1.1))
    noisy = any(v[3] for pts in groups.values() for _, v in pts)
    for ax in axes:
        if cores is not None and n_max > cores:
            ax.axvspan(cores + 0.5, n_max + 0.5, color="0.85", alpha=0.6, label="oversubscribed")
        ax.set_xticks(grid)
        ax.set_xlim(0.5, n_max + 0.5)
        ax.grid(alpha=0.3)
        _noisy_legend(ax, noisy)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sample_orders(orders: dict, title: str | None = None, axes=None):
    """Which sample each position of an epoch reads, one row per epoch, one panel per setting
    (``{label: array (epochs, samples)}``): identical rows mean every epoch sees the same order."""
    if axes is None:
        fig, axes = plt.subplots(1, len(orders), figsize=(5.5 * len(orders), 2.8), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    for ax, (label, order) in zip(axes, orders.items()):
        order = np.asarray(order)
        image = ax.imshow(order, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(order.shape[0]), [f"epoch {e}" for e in range(order.shape[0])])
        ax.set(xlabel="position in this rank's epoch", title=label)
        fig.colorbar(image, ax=ax, label="sample index")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def ddp_timeline(events: Sequence[dict], backward_s: float, title: str | None = None, ax=None):
    """One backward pass under DDP: when each parameter's gradient was ready (ticks, top row) and
    when each bucket's all-reduce ran (bars, one row per bucket). ``events``: dicts with ``kind``
    ("grad" or "allreduce"), ``name``, ``start``, ``end`` (seconds from the start of backward)."""
    fig, ax = _axes(ax, figsize=(10, 3))
    buckets = [e for e in events if e["kind"] == "allreduce"]
    grads = [e for e in events if e["kind"] == "grad"]
    ax.axvspan(0, backward_s * 1e3, color="tab:orange", alpha=0.15, label="backward running")
    for e in grads:
        ax.plot([e["start"] * 1e3] * 2, [-0.35, 0.35], color="tab:orange", linewidth=2)
        ax.text(e["start"] * 1e3, 0.45, e["name"], rotation=30, fontsize=7, va="bottom")
    for i, e in enumerate(buckets, start=1):
        width = max((e["end"] - e["start"]) * 1e3, backward_s * 1e3 / 200)
        ax.barh(i, width, left=e["start"] * 1e3, height=0.6, color="tab:blue", alpha=0.8)
        ax.text(e["end"] * 1e3, i, f"  {e['name']}", va="center", fontsize=7)
    ax.set_yticks(
        range(len(buckets) + 1), ["gradients ready"] + [f"bucket {i}" for i in range(len(buckets))]
    )
    ax.set_ylim(len(buckets) + 0.7, -0.9)
    end = max([backward_s] + [e["end"] for e in events]) * 1e3
    ax.set_xlim(0, end * 1.35)
    ax.set(xlabel="ms since backward started", title=title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
