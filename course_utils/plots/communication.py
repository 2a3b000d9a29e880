"""Figures of lesson 04: collectives before/after, the ring's steps, bandwidth."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes

__all__ = ["collective_diagram", "ring_steps", "bandwidth"]


def collective_diagram(before, after, title: str | None = None, ax=None):
    """What a collective did: each rank's values before (left) and after (right), one row per rank.

    ``before``/``after``: one sequence of numbers per rank (lengths may differ, e.g. an all-gather
    turns one value per rank into N). Cells are coloured by value, on one scale for both sides."""
    import matplotlib.colors as mcolors

    before = [np.atleast_1d(np.asarray(v, dtype=float)) for v in before]
    after = [np.atleast_1d(np.asarray(v, dtype=float)) for v in after]
    num_ranks = len(before)
    width_before = max((len(v) for v in before), default=1)
    width_after = max((len(v) for v in after), default=1)
    gap = 1.6  # room for the arrow
    fig, ax = _axes(ax, figsize=(0.55 * (width_before + width_after) + 3.2, 0.5 * num_ranks + 1.1))
    values = np.concatenate([*before, *after]) if num_ranks else np.zeros(1)
    norm = mcolors.Normalize(vmin=float(values.min()), vmax=float(values.max()) or 1.0)
    cmap = plt.get_cmap("YlGnBu")
    for x0, rows in ((0.0, before), (width_before + gap, after)):
        for rank, row in enumerate(rows):
            y = num_ranks - 1 - rank  # rank 0 on top
            for k, v in enumerate(row):
                color = cmap(0.15 + 0.7 * norm(v))
                ax.add_patch(plt.Rectangle((x0 + k, y), 0.95, 0.8, color=color))
                text = f"{v:g}" if abs(v) < 1e4 else f"{v:.1e}"
                ink = "white" if norm(v) > 0.6 else "black"  # readable on dark cells
                ax.text(
                    x0 + k + 0.47, y + 0.4, text, ha="center", va="center", fontsize=8, color=ink
                )
    for rank in range(num_ranks):
        ax.text(-0.2, num_ranks - 1 - rank + 0.4, f"rank {rank}", ha="right", va="center")
    mid = width_before + gap / 2
    ax.annotate(
        "",
        xy=(mid + 0.5, num_ranks / 2),
        xytext=(mid - 0.5, num_ranks / 2),
        arrowprops=dict(arrowstyle="-|>", lw=2, color="gray"),
    )
    ax.text(width_before / 2, num_ranks + 0.1, "before", ha="center")
    ax.text(width_before + gap + width_after / 2, num_ranks + 0.1, "after", ha="center")
    ax.set_xlim(-1.6, width_before + gap + width_after + 0.2)
    ax.set_ylim(-0.3, num_ranks + 0.6)
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def ring_steps(schedule: Sequence[dict], ncols: int | None = None):
    """The steps of a ring all-reduce (from ``cu.collectives.ring_schedule(N)``): one panel per
    step, a row per rank and a column per chunk; a cell lists the ranks whose data that copy of the
    chunk sums, darker the more it holds; red outlines are the chunks received in that step."""
    n = len(schedule[0]["state"])
    ncols = ncols or n  # start + (N-1) reduce-scatter steps on the first row, all-gather below
    rows = [schedule[:n], [None, *schedule[n:]]]
    fig, axes = plt.subplots(2, ncols, figsize=(3.0 * ncols, 2.1 * 2 + 0.7), squeeze=False)
    cmap = plt.get_cmap("Blues")
    counts = {"reduce-scatter": 0, "all-gather": 0}
    for i, (row_axes, row) in enumerate(zip(axes, rows)):
        for j, (ax, step) in enumerate(zip(row_axes, row + [None] * (ncols - len(row)))):
            ax.axis("off")
            if step is None:
                if (i, j) == (1, 0):
                    note = "after reduce-scatter,\nrank r holds chunk r+1\ncomplete (green);\nall-gather passes\nthem round the ring"
                    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=9)
                continue
            received = {(dst, chunk) for _, dst, chunk in step["sends"]}
            for rank, chunks in enumerate(step["state"]):
                for chunk, holds in enumerate(chunks):
                    y = n - 1 - rank
                    full = len(holds) == n
                    color = "#9be39b" if full else cmap(0.15 + 0.6 * len(holds) / n)
                    edge = "red" if (rank, chunk) in received else "white"
                    ax.add_patch(
                        plt.Rectangle((chunk, y), 0.95, 0.9, facecolor=color, edgecolor=edge, lw=2)
                    )
                    label = "all" if full else "+".join(map(str, holds))
                    ax.text(chunk + 0.47, y + 0.45, label, ha="center", va="center", fontsize=7.5)
            ax.set_xlim(-0.9, n)
            ax.set_ylim(-0.6, n + 0.1)
            for rank in range(n):
                ax.text(-0.1, n - 1 - rank + 0.45, f"r{rank}", ha="right", va="center", fontsize=8)
            for chunk in range(n):
                ax.text(chunk + 0.47, -0.35, f"c{chunk}", ha="center", va="center", fontsize=8)
            if step["phase"] == "start":
                ax.set_title("start: rank r holds\nits own data (r)", fontsize=9)
            else:
                counts[step["phase"]] += 1
                ax.set_title(f"{step['phase']}\nstep {counts[step['phase']]}", fontsize=9)
    fig.suptitle(
        f"Ring all-reduce on {n} ranks: each step, every rank sends one chunk to rank + 1 "
        "(red: just received)"
    )
    fig.tight_layout()
    return fig


def bandwidth(sizes, seconds, model=None, ax=None, rate: bool = False, title: str | None = None):
    """All-reduce time against message size on log-log axes: measured points (one series, or a
    dict ``{label: seconds}``) and, when given, a model's line (anything with ``predict(bytes)``,
    e.g. a fitted ``cu.collectives.AlphaBeta``). With ``rate``, bytes per second instead of time."""
    fig, ax = _axes(ax)
    sizes = np.asarray(sizes, dtype=float)
    series = seconds if isinstance(seconds, dict) else {"measured": seconds}
    for label, s in series.items():
        s = np.asarray(s, dtype=float)
        ax.plot(sizes, sizes / s / 1e9 if rate else s * 1e3, "o", label=label)
    if model is not None:
        grid = np.geomspace(sizes.min(), sizes.max(), 200)
        t = np.asarray(model.predict(grid), dtype=float)
        label = "model"
        if hasattr(model, "alpha_s"):
            label = (
                f"alpha-beta model: alpha = {model.alpha_s * 1e6:.0f} µs, "
                f"beta = {model.beta_bytes_per_s / 1e9:.2f} GB/s"
            )
        ax.plot(grid, grid / t / 1e9 if rate else t * 1e3, "k-", alpha=0.7, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [s for s in sizes if np.log2(s) % 2 == 0] or list(sizes)
    ax.set_xticks(ticks, [_bytes_label(s) for s in ticks])
    ylabel = "size / time, GB/s" if rate else "time per all-reduce, ms"
    ax.set(xlabel="tensor size", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bytes_label(nbytes: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"
