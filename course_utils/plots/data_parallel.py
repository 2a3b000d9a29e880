"""Figures of lesson 05: speedup and efficiency, sample orders, DDP's bucket timeline, bars of
repeated measurements, and what a bigger batch does to training."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes
from course_utils.plots.measured import _noisy_legend, _spread_line

__all__ = [
    "speedup",
    "sample_orders",
    "ddp_timeline",
    "spread_bars",
    "large_batch",
    "ddp_timelines",
    "race",
    "same_training",
    "sync_costs",
]


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


def _width(ax, text: str, fontsize: float) -> float:
    """The width of ``text`` in data units of ``ax``'s x axis (as the figure is laid out now)."""
    fig = ax.figure
    get_renderer = getattr(fig.canvas, "get_renderer", None)
    if get_renderer is not None:
        probe = ax.text(0, 0, text, fontsize=fontsize)
        pixels = probe.get_window_extent(get_renderer()).width
        probe.remove()
    else:  # no renderer to ask: about 0.6 em per character
        pixels = max(len(line) for line in text.split("\n")) * 0.6 * fontsize * fig.dpi / 72
    x0, x1 = ax.get_xlim()
    return pixels * (x1 - x0) / max(ax.bbox.width, 1.0)


def _wrap(ax, names: list[str], width: float, fontsize: float) -> str:
    """``names`` joined by commas, broken into lines no wider than ``width`` (data units)."""
    lines: list[str] = []
    for name in names:
        candidate = f"{lines[-1]}, {name}" if lines else name
        if lines and _width(ax, candidate, fontsize) <= width:
            lines[-1] = candidate
        else:
            lines.append(name)
    return ",\n".join(lines)


def ddp_timeline(events: Sequence[dict], backward_s: float, title: str | None = None, ax=None):
    """One backward pass under DDP: when each parameter's gradient was ready (ticks, top row) and
    when each bucket's all-reduce ran (bars, one row per bucket). ``events``: dicts with ``kind``
    ("grad" or "allreduce"), ``name``, ``start``, ``end`` (seconds from the start of backward).

    Gradients ready within 1% of the time axis of each other share one label (a layer's weight
    and bias usually do); a label that would overlap another goes up a level, with a line down to
    its tick; a bucket's list of tensors is wrapped to fit beside its bar."""
    fig, ax = _axes(ax, figsize=(10, 3))
    fontsize, step = 7, 0.4  # label size; height of a level of labels, in rows
    buckets = [e for e in events if e["kind"] == "allreduce"]
    grads = sorted((e for e in events if e["kind"] == "grad"), key=lambda e: e["start"])
    right = max([backward_s] + [e["end"] for e in events]) * 1e3 * 1.45
    pad = 0.01 * right
    # First everything that decides the axes' size, so that text widths can be measured.
    ax.axvspan(0, backward_s * 1e3, color="tab:orange", alpha=0.15, label="backward running")
    ax.barh([], [], color="tab:blue", alpha=0.8, label="all-reduce of a bucket")
    ax.plot([], [], color="tab:orange", linewidth=2, label="a gradient ready")
    ax.set_yticks(
        range(len(buckets) + 1), ["gradients ready"] + [f"bucket {i}" for i in range(len(buckets))]
    )
    ax.set(xlabel="ms since backward started", title=title, xlim=(0, right))
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()

    groups: list[list] = []  # [first ms, last ms, names]: gradients ready at about one time
    for e in grads:
        t = e["start"] * 1e3
        if groups and t - groups[-1][1] <= 0.01 * right:
            groups[-1][1] = t
            groups[-1][2].append(e["name"])
        else:
            groups.append([t, t, [e["name"]]])
    levels: list[float] = []  # the right edge of the last label on each level
    for first, last, names in groups:
        for t in sorted({first, last}):
            ax.plot([t, t], [-0.3, 0.3], color="tab:orange", linewidth=2)
        text = ", ".join(names)
        width = 1.1 * _width(ax, text, fontsize)  # 10% to spare: the layout may still move
        x = max(0.0, min(first, right - width - pad))
        level = next((i for i, edge in enumerate(levels) if edge + pad <= x), len(levels))
        if level == len(levels):
            levels.append(0.0)
        levels[level] = x + width
        y = -0.42 - level * step
        ax.text(x, y, text, fontsize=fontsize, va="bottom", ha="left")
        if level or x != first:  # a leader line from the label down to its tick
            ax.plot([first, first], [y, -0.3], color="tab:orange", linewidth=0.6, alpha=0.7)
    for i, e in enumerate(buckets, start=1):
        width = max((e["end"] - e["start"]) * 1e3, right / 300)
        ax.barh(i, width, left=e["start"] * 1e3, height=0.6, color="tab:blue", alpha=0.8)
        x = e["start"] * 1e3 + width + pad
        names = e["name"].split(", ")
        label = _wrap(ax, names, (right - x - pad) / 1.1, fontsize)
        if label.count("\n") > 2 and len(names) > 2:  # too tall for its row: first, ..., last
            short = [names[0], f"... {len(names) - 2} more ...", names[-1]]
            label = _wrap(ax, short, (right - x - pad) / 1.1, fontsize)
        ax.text(x, i, label, va="center", fontsize=fontsize)
    ax.set_ylim(len(buckets) + 0.6, -0.42 - len(levels) * step - 0.15)
    fig.tight_layout()
    return fig


def spread_bars(
    labels: Sequence,
    series: dict[str, Sequence],
    ylabel: str,
    xlabel: str | None = None,
    title: str | None = None,
    missing: str = "none",
    fmt: str | None = None,
    ax=None,
):
    """Bars side by side for each label, one colour per series. A value may be a number, a
    :class:`course_utils.measure.Spread` (its median, with a min-max error bar, and hatched when
    its repeats are more than 20% apart), or None: no bar, the word ``missing`` in its place.
    ``fmt`` (e.g. ``"{:.1f}%"``) writes each median above its bar, so that a bar too small to see
    still says its value."""
    fig, ax = _axes(ax, figsize=(8, 3.5))
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    top = max(
        [getattr(v, "high", v) for values in series.values() for v in values if v is not None]
        + [0.0]
    )
    any_noisy = False
    for i, (name, values) in enumerate(series.items()):
        at = x + (i - (len(series) - 1) / 2) * width
        medians = [float(v) if v is not None else 0.0 for v in values]
        bars = ax.bar(at, medians, width, label=name)
        for xi, v, bar in zip(at, values, bars.patches):
            if v is None:
                ax.text(xi, 0.02 * top, missing, rotation=90, ha="center", va="bottom", fontsize=8)
                continue
            if hasattr(v, "low") and v.high > v.low:
                ax.errorbar(xi, v.median, yerr=[[v.median - v.low], [v.high - v.median]],
                            fmt="none", ecolor="black", capsize=3)  # fmt: skip
                if v.noisy:
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
                    any_noisy = True
            if fmt is not None:
                y = max(float(v), getattr(v, "high", float(v))) + 0.01 * top
                ax.text(xi, y, fmt.format(float(v)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(label) for label in labels])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(0, 1.15 * top if top > 0 else 1)
    ax.grid(alpha=0.3, axis="y")
    handles, names = ax.get_legend_handles_labels()
    # a series' key shows its colour only (its first bar may be hatched as noisy)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=h.patches[0].get_facecolor())
               if hasattr(h, "patches") and h.patches else h for h in handles]  # fmt: skip
    if any_noisy:
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="0.6", hatch="//", edgecolor="white"))
        names.append("noisy: repeats > 20% apart")
    ax.legend(handles, names, fontsize=8)
    fig.tight_layout()
    return fig


def large_batch(runs: Sequence[dict], reference: float | None = None, title: str | None = None):
    """Test accuracy (left) and learning rate (right) against the global batch, one line per
    ``recipe``, for runs that all saw the same number of samples. ``runs``: dicts with
    ``recipe``, ``batch_size``, ``lr``, ``accuracy``, ``steps`` and optionally ``diverged`` (drawn
    as a red cross). ``reference``: an accuracy to draw as a dotted line (the base batch's)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    recipes: dict = {}
    for r in runs:
        recipes.setdefault(r["recipe"], []).append(r)
    for recipe, rs in recipes.items():
        rs = sorted(rs, key=lambda r: r["batch_size"])
        xs = [r["batch_size"] for r in rs]
        (line,) = axes[0].plot(xs, [100 * r["accuracy"] for r in rs], marker="o", label=recipe)
        axes[1].plot(xs, [r["lr"] for r in rs], marker="o", color=line.get_color(), label=recipe)
        for r in rs:
            if r.get("diverged"):
                for ax, y in ((axes[0], 100 * r["accuracy"]), (axes[1], r["lr"])):
                    ax.plot(r["batch_size"], y, "x", color="tab:red", ms=11, mew=2.5)
    if any(r.get("diverged") for r in runs):
        axes[0].plot([], [], "x", color="tab:red", ms=9, mew=2.5, label="diverged")
    if reference is not None:
        axes[0].axhline(100 * reference, color="gray", ls=":", label="the base batch's accuracy")
    steps = {r["batch_size"]: r["steps"] for r in runs}
    ticks = sorted(steps)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{b}\n{steps[b]} steps" for b in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set(xlabel="global batch", ylabel="test accuracy, %", ylim=(0, 100))
    axes[1].set_yscale("log")
    axes[1].set(xlabel="global batch", ylabel="learning rate (after warmup)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def ddp_timelines(watched: dict):
    """:func:`ddp_timeline` of several runs of :func:`course_utils.ddp.watch_backward`, one row
    each: ``watched`` maps a ``bucket_cap_mb`` (None: DDP's default) to a rank's result."""
    fig, axes = plt.subplots(len(watched), 1, figsize=(11, 3.25 * len(watched)), squeeze=False)
    for ax, (cap, result) in zip(axes[:, 0], watched.items()):
        buckets = sum(e["kind"] == "allreduce" for e in result["events"])
        size = "default (25 MB)" if cap is None else f"{cap} MB"
        title = f"bucket_cap_mb={size}: {buckets} bucket{'s' if buckets > 1 else ''}"
        ddp_timeline(result["events"], result["backward_s"], title=title, ax=ax)
    fig.tight_layout()
    return fig


def race(
    results: dict[str, dict], batch_sizes: Sequence[int], workers: Sequence[int], target: float
):
    """Lesson 05's race to a target accuracy (:func:`course_utils.large_batch.race`): throughput
    (left) and training seconds to ``target`` (right), bars per global batch, one colour per
    number of workers; a setting that never reached the target says so in place of its bar."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"global batch {b}" for b in batch_sizes]

    def series(key: str) -> dict:
        out = {}
        for n in workers:
            name = f"{n} worker{'s' if n > 1 else ''}"
            out[name] = [results[f"{name}, batch {b}"][key] for b in batch_sizes]
        return out

    spread_bars(labels, series("samples_per_s"), "training samples / s",
                title="throughput: higher is better", fmt="{:,.0f}", ax=axes[0])  # fmt: skip
    spread_bars(labels, series("seconds"), f"seconds of training to {target:.1%}",
                title="time to the target: lower is better", missing="not reached",
                fmt="{:.1f} s", ax=axes[1])  # fmt: skip
    fig.tight_layout()
    return fig


def same_training(single: Sequence[float], parallel: Sequence[float]):
    """Lesson 05, section 2: the per-step training loss of one process with the whole batch and of
    2 workers with half each (dashed, on top: both show where they coincide)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(single)), single, marker="o", ms=3, label="1 process, batch 64")
    ax.plot(range(len(parallel)), parallel, "--x", label="2 workers x 32, gradients averaged")
    ax.set(xlabel="step", ylabel="training loss", title="The same training, one process or two")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sync_costs(comm: dict[str, dict], batch_size: int):
    """Lesson 05, section 8: the share of a 2-worker DDP step spent synchronising, measured (a
    synced step minus a ``no_sync`` step) beside the alpha-beta model's, per model, from
    :func:`course_utils.scaling_runs.sync_costs`."""
    return spread_bars(
        [name.upper() for name in comm],
        {
            "measured: DDP step - no_sync step": [c["measured"] for c in comm.values()],
            "alpha-beta model: t(S) / step": [c["predicted"] for c in comm.values()],
        },
        ylabel="% of a training step",
        fmt="{:.1f}%",
        title=f"Communication share of a DDP step, 2 workers, global batch {batch_size}",
    )
