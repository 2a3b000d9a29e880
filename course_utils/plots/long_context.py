"""Figures of lesson 10 (long sequences and mixtures of experts): attention's peak memory against
the sequence length, the ring as a timeline per rank, the work and time of each rank under a
causal mask, the bytes of the ring and of Ulysses against the number of ranks, the experts' load,
the balancing-loss sweep, and where each axis sits on a cluster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes
from course_utils.plots.diagrams import WORKER_COLORS
from course_utils.plots.measured import _noisy_legend, _spread_line

__all__ = [
    "attention_memory",
    "ring_timeline",
    "rank_balance",
    "context_bytes",
    "expert_load",
    "moe_sweep",
    "cluster_layout",
]

MiB = 2**20
SPAN_COLORS = {"forward": "tab:blue", "backward": "tab:orange", "wait": "tab:red"}


def attention_memory(lengths: Sequence[int], series: Mapping[str, Sequence[float]], ax=None):
    """Peak bytes (per rank) of one attention's forward and backward against the sequence
    length, log-log: ``series`` maps a name to one value per length; names ending in "cp 2" are
    drawn dashed, in the colour of the same name's "cp 1". Grey lines: slopes of T^2 and T."""
    fig, ax = _axes(ax, figsize=(7.5, 4.6))
    colors, families = plt.rcParams["axes.prop_cycle"].by_key()["color"], []
    for name, values in series.items():
        family = name.rsplit(", cp", 1)[0]
        families += [family] if family not in families else []
        color = colors[families.index(family) % len(colors)]
        dashed = name.endswith("cp 2")
        style = dict(color=color, linestyle="--" if dashed else "-", marker="s" if dashed else "o")
        ax.plot(lengths, np.asarray(values) / MiB, label=name, **style)
    ends = np.asarray([lengths[0], lengths[-1]], dtype=float)
    for power, values, style in (
        (2, [*series.values()][0], ":"),
        (1, [*series.values()][-1], "-."),
    ):
        ref = values[0] / MiB * (ends / ends[0]) ** power
        ax.plot(ends, ref, color="gray", linewidth=1, linestyle=style, label=f"slope of T^{power}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(lengths), [str(t) for t in lengths])
    ax.minorticks_off()
    ax.set(xlabel="sequence length T (tokens)", ylabel="peak MiB per rank")
    ax.set_title("One attention, forward and backward: peak memory of the fullest rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def ring_timeline(spans: Mapping[int, Sequence[dict]], title: str | None = None, ax=None):
    """The ring on each rank from its trace (``{rank: course_utils.long_context.ring_spans}``):
    its blocks of arithmetic (forward, backward), its waits, a tick at each post, and the bare
    transfers of the same message (grey). Times in ms from the first span of all ranks."""
    fig, ax = _axes(ax, figsize=(11, 1.5 + 0.9 * len(spans)))
    spans = {rank: [s for s in lane if s["kind"] != "step"] for rank, lane in spans.items()}
    t0 = min(s["start"] for lane in spans.values() for s in lane)
    for rank, lane in spans.items():
        for s in lane:
            left, width = s["start"] - t0, s["stop"] - s["start"]
            if s["kind"] == "post":
                ax.plot([left, left], [rank - 0.45, rank + 0.45], color="black", linewidth=1)
                continue
            color = SPAN_COLORS.get(s["phase"] if s["kind"] == "block" else s["kind"], "0.6")
            ax.barh(rank, width, left=left, height=0.7, color=color, lw=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in [*SPAN_COLORS.values(), "0.6"]]
    handles.append(plt.Line2D([], [], color="black"))
    names = ["block, forward", "block, backward", "wait", "transfer alone", "post (send + recv)"]
    ax.legend(handles, names, ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_yticks(list(spans), [f"rank {r}" for r in spans])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "The ring on each rank, from its profiler trace")
    fig.tight_layout()
    return fig


def rank_balance(work: Mapping[str, Sequence[int]], compute: Mapping[str, Sequence], axes=None):
    """Per rank and split (``{"contiguous": [...], "zigzag": [...]}``): the share of the score
    pairs it computes (left, from ``work``) and its measured arithmetic in ms (right,
    ``compute``: numbers or Spreads per rank, drawn as medians with min-max bars)."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fig = axes[0].figure
    width = 0.8 / len(work)
    for i, layout in enumerate(work):
        ranks = np.arange(len(work[layout]))
        shares = 100 * np.asarray(work[layout]) / sum(work[layout])
        color = WORKER_COLORS[i % len(WORKER_COLORS)]
        axes[0].bar(ranks + i * width, shares, width, label=layout, color=color, edgecolor="k")
        values = [getattr(v, "median", v) for v in compute[layout]]
        low = [v - getattr(c, "low", v) for v, c in zip(values, compute[layout])]
        high = [getattr(c, "high", v) - v for v, c in zip(values, compute[layout])]
        axes[1].bar(ranks + i * width, values, width, label=layout, color=color, edgecolor="k")
        axes[1].errorbar(ranks + i * width, values, yerr=[low, high], fmt="none", ecolor="k")
    for ax, label in zip(axes, ("% of the score pairs", "arithmetic per step (ms)")):
        n = max(len(v) for v in work.values())
        ax.set_xticks(np.arange(n) + width * (len(work) - 1) / 2, [f"rank {r}" for r in range(n)])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    axes[0].set_title("Work each rank is given (counted)")
    axes[1].set_title("Time each rank computed (measured)")
    fig.tight_layout()
    return fig


def context_bytes(cps: Sequence[int], series: Mapping[str, Sequence[float]], counted=None, ax=None):
    """Bytes each rank sends in one attention's forward against the number of context-parallel
    ranks, one line per method (the formulas); ``counted``: ``{method: (cp, bytes)}`` measured."""
    fig, ax = _axes(ax, figsize=(6.5, 4))
    for name, values in series.items():
        (line,) = ax.plot(cps, np.asarray(values) / MiB, marker="o", label=f"{name} (formula)")
        if counted and name in counted:
            cp, sent = counted[name]
            ax.plot(
                cp, sent / MiB, "x", ms=12, mew=2, color=line.get_color(), label=f"{name}, counted"
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(cps), [str(c) for c in cps])
    ax.minorticks_off()
    ax.set(xlabel="context-parallel ranks (cp)", ylabel="MiB sent per rank, forward")
    ax.set_title("One attention's messages per rank")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def expert_load(panels: Mapping[str, dict], axes=None):
    """The experts' load in one batch, one panel per run (``{title: run}``, a run holding
    ``routed`` and ``kept``, per layer and expert, and ``capacity``): each expert's choices
    (light) and those it kept (dark), layer by layer; the capacity dashed."""
    if axes is None:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    for ax, (title, run) in zip(axes, panels.items()):
        routed, kept = np.asarray(run["routed"]), np.asarray(run["kept"])
        layers, experts = routed.shape
        x = np.arange(layers * experts) + np.repeat(np.arange(layers), experts)  # a gap per layer
        ax.bar(x, routed.flatten(), color="tab:blue", alpha=0.35, label="routed to it")
        ax.bar(x, kept.flatten(), color="tab:blue", label="kept (within capacity)")
        ax.axhline(run["capacity"], color="tab:red", linestyle="--", label="capacity")
        centres = [x[i * experts : (i + 1) * experts].mean() for i in range(layers)]
        ax.set_xticks(centres, [f"layer {i}" for i in range(layers)])
        ax.set(ylabel="choices in the batch", title=title)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    return fig


def moe_sweep(points: Sequence[dict], axes=None):
    """The balancing-loss weight (x) against the router's imbalance, the share of choices
    dropped and the test accuracy, one line per capacity factor. ``points``: dicts with
    ``aux_weight``, ``capacity_factor`` and Spreads (over seeds) ``imbalance``, ``dropped`` (a
    fraction) and ``accuracy`` (:func:`course_utils.long_context.moe_points`)."""
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    fig = axes[0].figure
    weights = sorted({p["aux_weight"] for p in points})
    noisy = [False] * 3
    for cf in sorted({p["capacity_factor"] for p in points}):
        mine = sorted(
            (p for p in points if p["capacity_factor"] == cf), key=lambda p: p["aux_weight"]
        )
        xs = [weights.index(p["aux_weight"]) for p in mine]
        for i, key, scale in zip(range(3), ("imbalance", "dropped", "accuracy"), (1, 100, 100)):
            values = [
                (scale * p[key].median, scale * p[key].low, scale * p[key].high, p[key].noisy)
                for p in mine
            ]
            _spread_line(axes[i], xs, values, label=f"capacity factor {cf:g}")
            noisy[i] |= any(v[3] for v in values)
    labels = ("busiest expert / mean", "% of choices dropped", "test accuracy (%)")
    titles = ("Imbalance (1 = even)", "Dropped", "Accuracy")
    for ax, label, title, marked in zip(axes, labels, titles, noisy):
        ax.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
        ax.set(xlabel="balancing-loss weight", ylabel=label, title=title)
        ax.grid(alpha=0.3)
        _noisy_legend(ax, marked)
    fig.tight_layout()
    return fig


def cluster_layout(shape: Mapping[str, int], gpus_per_node: int = 8, ax=None):
    """The ranks of a mesh (``shape``: axis sizes, outermost first, e.g. pp, dp, ep, cp, tp;
    consecutive ranks innermost) on nodes of ``gpus_per_node`` GPUs, one row per node: the
    innermost axis framed in groups, the next one by colour, the node's outer indices beside it."""
    names, sizes = list(shape), list(shape.values())
    total = int(np.prod(sizes))
    nodes = total // gpus_per_node
    fig, ax = _axes(ax, figsize=(2.5 + 1.0 * gpus_per_node, 1.0 + 0.65 * nodes))
    inner, second = names[-1], names[-2]
    for rank in range(total):
        coords = dict(zip(names, np.unravel_index(rank, sizes)))
        node, gpu = divmod(rank, gpus_per_node)
        color = WORKER_COLORS[int(coords[second]) % len(WORKER_COLORS)]
        ax.add_patch(plt.Rectangle((gpu, -node), 0.8, 0.55, facecolor=color, edgecolor="k"))
        ax.text(gpu + 0.4, -node + 0.27, str(rank), ha="center", va="center", fontsize=8)
        if coords[inner] == 0:  # the frame of one innermost group
            frame = plt.Rectangle((gpu - 0.05, -node - 0.05), shape[inner] - 0.1, 0.65)
            frame.set(fill=False, edgecolor="tab:red", linewidth=1.5)
            ax.add_patch(frame)
        if gpu == 0:
            outer = ", ".join(f"{n} {int(coords[n])}" for n in names if n not in (inner, second))
            ax.text(
                gpus_per_node + 0.1, -node + 0.27, f"node {node}: {outer}", va="center", fontsize=8
            )
    ax.set_xlim(-0.2, gpus_per_node + 3.2)
    ax.set_ylim(-nodes + 0.6, 1.0)
    ax.axis("off")
    mesh = " x ".join(f"{n} {s}" for n, s in shape.items())
    ax.set_title(
        f"{mesh} = {total} GPUs on {nodes} nodes: {inner} groups framed in red, "
        f"{second} index by colour",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
