"""Figures of lesson 04: collectives before/after, the ring's steps, bandwidth with its spread,
the cost of a step's communication, and the ring's cost against the number of ranks."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np

from course_utils import measure
from course_utils.plots.core import _axes
from course_utils.plots.measured import _spread_line

__all__ = [
    "collective_diagram",
    "ring_steps",
    "bandwidth",
    "step_costs",
    "ring_scaling",
    "gradient_sync_costs",
]


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


def _as_spread(value) -> tuple[float, float, float, bool]:
    """(median, low, high, noisy) of a number, a :class:`course_utils.measure.Spread`, or a
    sequence of repeated measurements."""
    if hasattr(value, "median"):
        return value.median, value.low, value.high, value.noisy
    if np.ndim(value) == 0:
        v = float(value)
        return v, v, v, False
    s = measure.spread(value)
    return s.median, s.low, s.high, s.noisy


class _Plain(mticker.Formatter):
    """Log-axis labels as plain numbers ("0.2", "6", "40") rather than 2 x 10^-1; minor ticks
    get a label (2 and 5 only) when the axis spans under three decades."""

    def __init__(self, minor: bool):
        self.minor = minor

    def __call__(self, x, pos=None):
        if x <= 0:
            return ""
        if self.minor:
            low, high = sorted(self.axis.get_view_interval())
            digit = round(x / 10 ** np.floor(np.log10(x)))
            if low <= 0 or np.log10(high / low) > 3 or digit not in (2, 5):
                return ""
        return f"{x:g}"


def _plain_log_ticks(axis) -> None:
    axis.set_major_formatter(_Plain(minor=False))
    axis.set_minor_formatter(_Plain(minor=True))


def bandwidth(sizes, seconds, model=None, ax=None, rate: bool = False, title: str | None = None):
    """All-reduce time against message size on log-log axes: measured points (one series, or a
    dict ``{label: values}``) and, when given, a model's line (anything with ``predict(bytes)``,
    e.g. a fitted ``cu.collectives.AlphaBeta``). With ``rate``, bytes per second instead of time.

    A value may be a number of seconds, a :class:`course_utils.measure.Spread` or the list of a
    size's repeats: then the point is the median, with a bar from the fastest to the slowest
    repeat, drawn hollow when they are more than 20% apart (noisy)."""
    fig, ax = _axes(ax)
    sizes = np.asarray(sizes, dtype=float)
    series = seconds if isinstance(seconds, dict) else {"measured": seconds}
    any_noisy = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dodge = 2.0 ** (0.12 * (np.arange(len(series)) - (len(series) - 1) / 2))  # side by side
    for k, (label, values) in enumerate(series.items()):
        points = []
        for size, value in zip(sizes, values):
            median, low, high, noisy = _as_spread(value)
            if rate:  # the fastest repeat is the highest rate
                median, low, high = size / median / 1e9, size / high / 1e9, size / low / 1e9
            else:
                median, low, high = 1e3 * median, 1e3 * low, 1e3 * high
            points.append((median, low, high, noisy))
            any_noisy |= noisy
        color = colors[k % len(colors)]
        _spread_line(ax, sizes * dodge[k], points, label=label, ls="none", color=color)
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
    _plain_log_ticks(ax.yaxis)
    ticks = [s for s in sizes if np.log2(s) % 2 == 0] or list(sizes)
    ax.set_xticks(ticks, [_bytes_label(s) for s in ticks])
    ax.set_xticks([], minor=True)
    ylabel = "size / time, GB/s" if rate else "time per all-reduce, ms"
    ax.set(xlabel="tensor size", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if any_noisy:
        handles.append(plt.Line2D([], [], marker="o", mfc="white", mec="gray", ls="none", ms=9))
        labels.append("noisy: repeats > 20% apart")
    # below the axes, where it hides no point
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    return fig


def step_costs(
    labels: Sequence[str],
    measured: dict[str, Sequence],
    model: dict[str, Sequence[float]] | None = None,
    ylabel: str = "ms per step",
    title: str | None = None,
    ax=None,
):
    """Grouped bars of times on a log scale (so that a 0.2 ms all-reduce stays visible next to a
    30 ms step): one group per label, one bar per series of ``measured`` (seconds: numbers,
    :class:`course_utils.measure.Spread` s or lists of repeats), the bar at the median with a
    fastest-slowest error bar, hatched when the repeats are more than 20% apart. ``model``:
    predicted seconds for some of the series, drawn as a black diamond on their bars."""
    fig, ax = _axes(ax, figsize=(9, 4.2))
    x = np.arange(len(labels))
    width = 0.8 / max(len(measured), 1)
    any_noisy, handles, names = False, [], []  # the legend's plain patches (a bar may be hatched)
    for i, (name, values) in enumerate(measured.items()):
        spreads = [_as_spread(v) for v in values]
        ms = np.array([[1e3 * s[0], 1e3 * s[1], 1e3 * s[2]] for s in spreads])
        noisy = [s[3] for s in spreads]
        any_noisy |= any(noisy)
        xs = x + (i - (len(measured) - 1) / 2) * width
        bars = ax.bar(xs, ms[:, 0], width)
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor=bars[0].get_facecolor()))
        names.append(name)
        for bar, loud in zip(bars, noisy):
            if loud:
                bar.set_hatch("//")
                bar.set_edgecolor("white")
        yerr = [ms[:, 0] - ms[:, 1], ms[:, 2] - ms[:, 0]]
        ax.errorbar(xs, ms[:, 0], yerr=yerr, fmt="none", ecolor="black", capsize=3, lw=1)
        if model and name in model:
            ax.plot(xs, 1e3 * np.asarray(model[name], dtype=float), "kD", ms=6)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xticks(x, [str(label) for label in labels])
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y", which="both")
    if model:
        handles.append(plt.Line2D([], [], marker="D", color="black", ls="none", ms=6))
        names.append("alpha-beta model's prediction")
    if any_noisy:
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="gray", hatch="//", edgecolor="white"))
        names.append("noisy: repeats > 20% apart")
    handles.append(plt.Line2D([], [], color="black", marker="_", ms=8, lw=1))
    names.append("bar: fastest to slowest repeat")
    ax.legend(handles, names, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def ring_scaling(
    world_sizes: Sequence[int], nbytes: float, model, title: str | None = None, ax=None
):
    """The alpha-beta model's ring all-reduce of ``nbytes`` against the number of ranks, split
    into its latency part, ``2(N-1) alpha``, and its bandwidth part, ``2(N-1)/N x bytes / beta``
    (``model``: a fitted ``cu.collectives.AlphaBeta``); a dotted line marks where they cross."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    n = np.asarray(world_sizes, dtype=float)
    latency = 2 * (n - 1) * model.alpha_s
    transfer = 2 * (n - 1) / n * nbytes / model.beta_bytes_per_s
    ax.plot(n, 1e3 * (latency + transfer), "o-", color="black", lw=2.5, label="total")
    ax.plot(n, 1e3 * latency, "s--", color="tab:orange", label="latency part, 2(N-1) alpha")
    ax.plot(n, 1e3 * transfer, "^--", color="tab:blue", label="bandwidth part, 2(N-1)/N S / beta")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xticks(n, [f"{v:g}" for v in n])
    ax.set_xticks([], minor=True)
    if model.alpha_s > 0:  # latency = bandwidth at N = bytes / (alpha beta)
        cross = nbytes / (model.alpha_s * model.beta_bytes_per_s)
        if n.min() < cross < n.max():
            ax.axvline(cross, color="gray", ls=":", label=f"the parts are equal at N = {cross:.3g}")
    ax.set(xlabel="ranks N", ylabel="ms per all-reduce", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bytes_label(nbytes: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def gradient_sync_costs(
    sync: dict[str, dict], tensor_bytes: dict[str, Sequence[int]], model, ax=None
):
    """Lesson 04's data-parallel step on 2 workers: for each model in ``sync`` (name ->
    ``{"compute_s", "per_tensor_s", "bucket_s"}``, each a spread or a list of seconds), the
    compute of a step beside the all-reduce of its gradients tensor by tensor and in one bucket,
    with the alpha-beta ``model``'s predictions (from ``tensor_bytes``: name -> each gradient
    tensor's bytes) as diamonds. :func:`step_costs` draws it."""
    names = list(sync)
    total = {n: sum(tensor_bytes[n]) for n in names}
    series = {
        "compute (forward + backward + optimizer)": "compute_s",
        "all-reduce per tensor": "per_tensor_s",
        "all-reduce in one bucket": "bucket_s",
    }
    return step_costs(
        [f"{n.upper()} ({total[n] / 1024:,.0f} KB of gradients)" for n in names],
        {label: [sync[n][key] for n in names] for label, key in series.items()},
        model={
            "all-reduce per tensor": [
                float(sum(model.predict(b) for b in tensor_bytes[n])) for n in names
            ],
            "all-reduce in one bucket": [float(model.predict(total[n])) for n in names],
        },
        title="One data-parallel step on 2 workers: computing vs synchronising the gradients",
        ax=ax,
    )
