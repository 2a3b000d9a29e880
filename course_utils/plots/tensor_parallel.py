"""Figures of lesson 09 (tensor parallelism): Megatron's split of an MLP over two ranks, a
device mesh's groups, and the measured speedup and communication share against width and batch."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from course_utils.plots.core import _axes
from course_utils.plots.diagrams import WORKER_COLORS, _arrow, _box
from course_utils.plots.measured import _spread_line

__all__ = ["megatron_mlp", "device_mesh", "tp_speedups"]

_COMM = "#f6d0d0"  # boxes where the ranks communicate
_WHOLE = "#eeeeee"  # tensors that are whole (the same) on every rank


def megatron_mlp(world_size: int = 2, ax=None):
    """Megatron's MLP on ``world_size`` ranks, one lane per rank: the input whole on every rank,
    ``f``, fc1 column parallel (rank r: hidden units r*H/T ..), GELU on each rank's units, fc2
    row parallel (a partial sum of the output), ``g`` (the all-reduce that adds the partials)."""
    fig, ax = _axes(ax, figsize=(11, 1.4 + 1.3 * world_size))
    lane_h, gap = 0.9, 0.35
    top = world_size * (lane_h + gap)
    for r in range(world_size):
        y = top - (r + 1) * (lane_h + gap)
        color = WORKER_COLORS[r % len(WORKER_COLORS)]
        ax.text(-0.15, y + lane_h / 2, f"rank {r}", ha="right", va="center", fontsize=9)
        lo, hi = _fraction(r, world_size), _fraction(r + 1, world_size)
        steps = [
            (0.0, 1.5, "x\n(B, T, d), whole", _WHOLE),
            (2.3, 1.9, f"fc1, rows {lo}..{hi}\n(column parallel)", color),
            (4.6, 1.3, f"GELU\n(B, T, H/{world_size})", color),
            (6.3, 1.9, f"fc2, columns {lo}..{hi}\n(row parallel)", color),
            (8.6, 1.3, f"partial y{r}\n(B, T, d)", color),
        ]
        for i, (x, w, text, c) in enumerate(steps):
            _box(ax, x, y, w, lane_h, text, c, fontsize=8)
            if i:
                prev_x, prev_w = steps[i - 1][0], steps[i - 1][1]
                _arrow(ax, (prev_x + prev_w, y + lane_h / 2), (x, y + lane_h / 2))
        _arrow(ax, (9.9, y + lane_h / 2), (10.05, y + lane_h / 2))  # the partial sum, into g
    # f and g span the lanes: the only places where the ranks talk to each other
    span = top - gap
    _box(ax, 1.6, gap * 0.3, 0.6, span, "f", _COMM, fontsize=10)
    _box(ax, 10.05, gap * 0.3, 0.6, span, "g", _COMM, fontsize=10)
    _box(ax, 11.0, span / 2 - lane_h / 2 + gap * 0.3, 1.3, lane_h, "y = y0 + y1\nwhole", _WHOLE, 8)
    _arrow(ax, (10.65, span / 2 + gap * 0.3), (11.0, span / 2 + gap * 0.3))
    ax.text(
        1.9,
        -0.15,
        "f: identity forward,\nall-reduce backward",
        ha="center",
        va="top",
        fontsize=8,
    )
    ax.text(
        10.35,
        -0.15,
        "g: all-reduce forward,\nidentity backward",
        ha="center",
        va="top",
        fontsize=8,
    )
    ax.set_xlim(-1.0, 12.5)
    ax.set_ylim(-0.75, top + 0.05)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(
        "Megatron's MLP on 2 ranks: no communication between fc1 and fc2"
        if world_size == 2
        else f"Megatron's MLP on {world_size} ranks",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _fraction(r: int, world_size: int) -> str:
    """The r-th of ``world_size`` boundaries of H hidden units: 0, H/2, H, 2H/3, ..."""
    if r == 0:
        return "0"
    if r == world_size:
        return "H"
    return f"{'' if r == 1 else r}H/{world_size}"


def device_mesh(ranks: Sequence[Sequence[int]], names: Sequence[str] = ("dp", "tp"), ax=None):
    """A 2-D device mesh: ``ranks[i][j]`` is the rank at data-parallel index ``i`` and
    tensor-parallel index ``j``. Each row is a tensor-parallel group (boxed: one node, fast
    links); each column a data-parallel group (dashed: the ranks that hold the same slices)."""
    rows, cols = len(ranks), len(ranks[0])
    fig, ax = _axes(ax, figsize=(2.2 + 1.6 * cols, 1.2 + 1.2 * rows))
    size, step = 0.9, 1.3
    for i, row in enumerate(ranks):
        y = (rows - 1 - i) * step
        for j, rank in enumerate(row):
            _box(ax, j * step, y, size, size, f"rank {rank}", WORKER_COLORS[j % 4], fontsize=9)
        ax.add_patch(  # the tensor-parallel group: a solid frame around the row
            plt.Rectangle(
                (-0.15, y - 0.15),
                (cols - 1) * step + size + 0.3,
                size + 0.3,
                fill=False,
                edgecolor="tab:red",
                linewidth=1.8,
            )
        )
        ax.text(
            (cols - 1) * step + size + 0.3,
            y + size / 2,
            f"{names[1]} group {i}\n(one node)",
            va="center",
            fontsize=8,
            color="tab:red",
        )
    for j in range(cols):  # the data-parallel groups: a dashed frame around each column
        ax.add_patch(
            plt.Rectangle(
                (j * step - 0.08, -0.08),
                size + 0.16,
                (rows - 1) * step + size + 0.16,
                fill=False,
                edgecolor="tab:blue",
                linestyle="--",
                linewidth=1.5,
            )
        )
        ax.text(
            j * step + size / 2,
            -0.3,
            f"{names[0]} group {j}",
            ha="center",
            va="top",
            fontsize=8,
            color="tab:blue",
        )
    ax.set_xlim(-0.4, (cols - 1) * step + size + 1.6)
    ax.set_ylim(-0.75, (rows - 1) * step + size + 0.25)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"A {rows} x {cols} mesh ({names[0]} x {names[1]})", fontsize=10)
    fig.tight_layout()
    return fig


def tp_speedups(
    points: Sequence[dict],
    title: str | None = None,
    axes=None,
    x: str = "width",
    by: str = "batch",
    impl: str = "layers",
):
    """Tensor parallelism measured against one process: the speedup (left) and the share of a
    step spent in the all-reduces (right) against ``x`` (the model's width), one colour per
    ``by`` (the batch), one line style and marker per ``impl`` (how the layers were split: the
    first value met is drawn solid with circles, the next dashed with squares, ...). ``points``:
    dicts with ``x``, ``by``, ``impl`` and the keys :meth:`course_utils.measure.Spread.as_dict`
    writes for ``speedup`` and, where measured, ``comm_share`` (in %). Medians with min-max bars;
    noisy points hollow."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.0))
    fig = axes[0].figure
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    batches = sorted({p[by] for p in points})
    impls = list(dict.fromkeys(p[impl] for p in points))  # in the order met
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]
    xs_all = sorted({p[x] for p in points})

    def spread(p, key):  # (median, low, high, noisy), as _spread_line reads it
        low, high = p.get(f"{key}_min", p[key]), p.get(f"{key}_max", p[key])
        return (p[key], low, high, p.get(f"{key}_noisy", False))

    any_noisy = {0: False, 1: False}
    for panel, key in enumerate(("speedup", "comm_share")):
        ax = axes[panel]
        for b_i, b in enumerate(batches):
            for i_i, name in enumerate(impls):
                mine = [p for p in points if p[by] == b and p[impl] == name and key in p]
                mine.sort(key=lambda p: p[x])
                if not mine:
                    continue
                label = f"{by} {b}" + (f", {name}" if len(impls) > 1 and key == "speedup" else "")
                line = _spread_line(
                    ax,
                    [p[x] for p in mine],
                    [spread(p, key) for p in mine],
                    label=label,
                    color=colors[b_i % len(colors)],
                    linestyle=styles[i_i % len(styles)],
                )
                line.set_marker(markers[i_i % len(markers)])  # told apart in the legend too
                any_noisy[panel] |= any(p.get(f"{key}_noisy", False) for p in mine)
        if xs_all and min(xs_all) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [str(v) for v in xs_all])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    ax = axes[0]
    world = {p.get("world_size", 2) for p in points}
    ideal = max(world) if world else 2
    ax.axhline(1.0, color="black", linewidth=1, linestyle=":", label="break-even (one process)")
    ax.axhline(ideal, color="gray", linewidth=1, linestyle="--", label=f"ideal ({ideal} ranks)")
    tops = [p.get("speedup_max", p["speedup"]) for p in points if "speedup" in p]
    ax.set_ylim(0, max([ideal] + tops) * 1.12)
    ax.set(xlabel=f"model {x}", ylabel="speedup over one process", title="Speedup")
    axes[1].set(
        xlabel=f"model {x}",
        ylabel="% of a step in the all-reduces",
        title="Communication share (layers split by hand)",
    )
    shares = [p.get("comm_share_max", p["comm_share"]) for p in points if "comm_share" in p]
    axes[1].set_ylim(0, min(100.0, max(shares + [10.0]) * 1.15))
    for panel, ax in enumerate(axes[:2]):
        handles, labels = ax.get_legend_handles_labels()
        if any_noisy[panel]:
            handles.append(plt.Line2D([], [], marker="o", mfc="white", mec="gray", ls="none", ms=9))
            labels.append("noisy: repeats > 20% apart")
        if handles:  # under the panel: inside, it covered the "ideal 2x" line
            ax.legend(
                handles,
                labels,
                fontsize=8,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.14),
                ncol=2,
            )
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
