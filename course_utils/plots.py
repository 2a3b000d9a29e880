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
    series: dict[str, Sequence[float]],
    xlabel: str,
    title: str | None = None,
    proportional: bool = True,
    anchor: int = 0,
    log: bool = False,
    ax=None,
):
    """Milliseconds per step against a size (sequence length, batch), one line per series of
    seconds; with ``proportional``, a dashed line through point ``anchor`` of the first series
    shows what "time proportional to the size" would look like (lesson 02)."""
    fig, ax = _axes(ax)
    xs = np.asarray(xs, dtype=float)
    for label, seconds in series.items():
        ax.plot(xs, 1e3 * np.asarray(seconds), marker="o", label=label)
    if proportional and series:
        anchor_ms = 1e3 * float(next(iter(series.values()))[anchor])
        reference = anchor_ms * xs / xs[anchor]
        ax.plot(xs, reference, "k--", alpha=0.6, label=f"proportional to {xlabel}")
    if log:  # on log axes, label every measured size (on linear ones they would crowd)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set(xlabel=xlabel, ylabel="ms per step", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def images(
    images,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    cmap: str = "gray",
    signed: bool = False,
    title: str | None = None,
    size: float = 2.0,
):
    """A row (or grid) of images (N, H, W), each with its own title; with ``signed``, a blue-white-red
    colormap centred on 0 for images with negative values (filter kernels, edge maps)."""
    images = [np.asarray(im, dtype=float) for im in images]
    n = len(images)
    ncols = ncols or n
    nrows = int(np.ceil(n / ncols))
    figsize = (size * ncols, size * nrows + 0.4)  # + room for the titles
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
            ax.set_title(titles[i], fontsize=9)
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


def measurements(
    points: Sequence[dict],
    x: str,
    y: str,
    by: str | None = None,
    xlabel: str | None = None,
    ylabel: str = "samples / s",
    title: str | None = None,
    logx: bool = True,
    ax=None,
):
    """Measured points (dicts, e.g. a widget's results) as ``y`` against ``x``, one line per value
    of ``by``, points sorted along x; works with any subset of the settings measured so far."""
    fig, ax = _axes(ax)
    groups: dict = {}
    for p in points:
        groups.setdefault(p[by] if by else None, []).append((p[x], p[y]))
    for key in sorted(groups, key=lambda k: (k is None, k)):
        xs, ys = zip(*sorted(groups[key]))
        ax.plot(xs, ys, marker="o", label=f"{by} = {key}" if by else None)
    all_xs = sorted({p[x] for p in points})
    if logx and all_xs and min(all_xs) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_xs, [str(v) for v in all_xs])
    ax.set(xlabel=xlabel or x, ylabel=ylabel, title=title)
    if points:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if by and points:
        ax.legend()
    fig.tight_layout()
    return fig


# --- lesson 03: kinds of parallelism, memory models, scaling laws, timings ---------------------


def _box(ax, x, y, w, h, text, color="#dbe9f6", fontsize=9, **kwargs):
    """A labelled rounded box with its lower-left corner at (x, y), in data coordinates."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color,
            edgecolor="black",
            linewidth=1,
            **kwargs,
        )
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, text=None, color="black", style="-|>"):
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops=dict(arrowstyle=style, color=color, linewidth=1.2, shrinkA=2, shrinkB=2),
    )
    if text:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        ax.text(mid[0] + 0.1, mid[1], text, ha="left", va="center", fontsize=8, color=color)


_WORKER_COLORS = ("#cfe8cf", "#fde2c4", "#e3d7f0", "#f6d0d0")


def _data_parallel(ax) -> None:
    ax.set_title("data parallelism: split the batch\n(lessons 04, 05)", fontsize=10)
    for i in range(8):  # the global batch: 8 samples, 4 per worker
        worker = i // 4
        _box(ax, 0.2 + 0.55 * i, 4.3, 0.45, 0.5, f"x{i}", _WORKER_COLORS[worker], fontsize=7)
    ax.text(2.4, 5.05, "one global batch", ha="center", fontsize=8)
    for w in range(2):
        x0 = 0.3 + 2.3 * w
        _arrow(ax, (1.1 + 2.2 * w, 4.25), (x0 + 0.9, 3.55))
        _box(
            ax,
            x0,
            1.5,
            1.8,
            2.0,
            f"worker {w}\nfull copy\nof the model\n(same weights)",
            _WORKER_COLORS[w],
        )
        _arrow(ax, (x0 + 0.9, 1.45), (x0 + 0.9, 0.85), text=f"grads g{w}")
    _box(
        ax,
        0.3,
        0.0,
        4.1,
        0.8,
        "all-reduce: average g0 and g1,\nevery copy takes the same step",
        "#eeeeee",
        fontsize=8,
    )


def _task_parallel(ax) -> None:
    ax.set_title(
        "task parallelism: independent jobs\n(this lesson; model parallel: 06, 07)", fontsize=10
    )
    lrs = ("lr 0.003", "lr 0.01", "lr 0.03", "lr 0.1")
    for i, lr in enumerate(lrs):  # a queue of independent tasks, dealt round-robin
        _box(ax, 0.2 + 1.1 * i, 4.3, 0.95, 0.5, lr, _WORKER_COLORS[i % 2], fontsize=7)
    ax.text(2.4, 5.05, "4 training runs (a sweep)", ha="center", fontsize=8)
    for w in range(2):
        x0 = 0.3 + 2.3 * w
        for i in range(w, 4, 2):
            _arrow(ax, (0.67 + 1.1 * i, 4.25), (x0 + 0.9, 3.55))
        mine = ", ".join(lrs[i].split()[1] for i in range(w, 4, 2))
        _box(
            ax,
            x0,
            1.5,
            1.8,
            2.0,
            f"worker {w}\ntrains lr\n{mine}\none after the other",
            _WORKER_COLORS[w],
        )
        _arrow(ax, (x0 + 0.9, 1.45), (x0 + 0.9, 0.85), text="result")
    _box(
        ax,
        0.3,
        0.0,
        4.1,
        0.8,
        "no communication until the end:\ncollect the results",
        "#eeeeee",
        fontsize=8,
    )


def _pipeline_parallel(ax) -> None:
    ax.set_title("pipeline parallelism: split the layers\n(lesson 06)", fontsize=10)
    num_stages, num_microbatches = 3, 4
    for s in range(num_stages):  # a Gantt chart of the forward passes: stage s, time slot t
        y = 3.6 - 1.1 * s
        ax.text(
            -0.1,
            y + 0.35,
            f"stage {s}\nlayers {3 * s}-{3 * s + 2}",
            ha="right",
            va="center",
            fontsize=7,
        )
        for m in range(num_microbatches):
            _box(
                ax,
                0.15 + 0.75 * (s + m),
                y,
                0.65,
                0.7,
                f"F{m}",
                _WORKER_COLORS[m % len(_WORKER_COLORS)],
                fontsize=8,
            )
        for t in range(num_stages + num_microbatches - 1):  # idle slots: the "bubble"
            if not 0 <= t - s < num_microbatches:
                ax.add_patch(
                    plt.Rectangle(
                        (0.15 + 0.75 * t, y),
                        0.65,
                        0.7,
                        fill=False,
                        hatch="///",
                        edgecolor="0.7",
                        linewidth=0,
                    )
                )
    _arrow(ax, (0.15, 0.35), (4.8, 0.35))
    ax.text(2.5, 0.45, "time", ha="center", va="bottom", fontsize=8)
    ax.text(
        2.5,
        -0.25,
        "microbatches F0..F3 flow stage to stage;\nhatched: idle (the bubble)",
        ha="center",
        va="top",
        fontsize=8,
    )


def parallelism(kind: str, ax=None):
    """A diagram of one kind of parallelism: ``"data"``, ``"task"`` or ``"pipeline"`` (lesson 03)."""
    draw = {"data": _data_parallel, "task": _task_parallel, "pipeline": _pipeline_parallel}
    if kind not in draw:
        raise ValueError(f"kind must be one of {sorted(draw)}, got {kind!r}")
    fig, ax = _axes(ax, figsize=(5, 4.2))
    draw[kind](ax)
    ax.set_xlim(-1.1 if kind == "pipeline" else 0, 5.0)
    ax.set_ylim(-1.0 if kind == "pipeline" else -0.1, 5.4)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def parallelism_overview(kinds: Sequence[str] = ("data", "task", "pipeline")):
    """The diagrams of :func:`parallelism` side by side."""
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.6))
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        parallelism(kind, ax=ax)
    fig.tight_layout()
    return fig


def memory_models(axes=None):
    """Parallel vs distributed computing: threads sharing one memory, processes passing messages."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    fig = axes[0].figure
    ax = axes[0]
    ax.set_title("shared memory: threads in one process, one machine", fontsize=10)
    _box(
        ax,
        0.3,
        3.2,
        4.4,
        0.9,
        "one memory: every thread reads\nand writes the same tensors",
        "#eeeeee",
        fontsize=8,
    )
    for t in range(3):
        _box(ax, 0.3 + 1.55 * t, 0.8, 1.3, 1.0, f"thread {t}\n(a core)", _WORKER_COLORS[t])
        _arrow(ax, (0.95 + 1.55 * t, 1.85), (0.95 + 1.55 * t, 3.15), style="<|-|>")
    ax.text(
        2.5,
        0.2,
        "cheap to share, but threads must not race;\nin Python, the GIL",
        ha="center",
        va="center",
        fontsize=8,
    )
    ax = axes[1]
    ax.set_title("message passing: processes, one machine or many", fontsize=10)
    for w in range(2):
        x0 = 0.3 + 2.6 * w
        _box(ax, x0, 1.9, 1.8, 0.8, f"memory of\nprocess {w}", "#eeeeee", fontsize=8)
        _box(ax, x0, 0.8, 1.8, 0.9, f"process {w}\n(a GPU or cores)", _WORKER_COLORS[w])
    _arrow(ax, (2.15, 1.25), (2.85, 1.25), style="<|-|>")
    ax.text(
        2.5,
        3.3,
        "send / receive / all-reduce\nover a link: gloo (TCP, shared memory),\n"
        "NCCL (NVLink, InfiniBand)",
        ha="center",
        va="center",
        fontsize=8,
    )
    _arrow(ax, (2.5, 2.85), (2.5, 1.5), style="-")
    ax.text(
        2.5,
        0.2,
        "nothing shared: data moves only as messages,\nwhich cost time (lesson 04)",
        ha="center",
        va="center",
        fontsize=8,
    )
    for ax in axes:
        ax.set_xlim(0, 5)
        ax.set_ylim(-0.2, 4.3)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    return fig


def scaling_laws(
    ps: Sequence[float] = (0.5, 0.75, 0.9, 0.95, 0.99),
    max_workers: int = 64,
    measured: dict[str, tuple[float, float]] | None = None,
    axes=None,
):
    """Amdahl's speedup (left) and Gustafson's scaled speedup (right) against workers, one line per
    parallel fraction p; ``measured`` adds points ``{"label": (workers, speedup)}`` to both."""
    from course_utils import scaling

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    fig = axes[0].figure
    workers = np.arange(1, max_workers + 1)
    for ax, law, title in (
        (axes[0], scaling.amdahl, "Amdahl: fixed problem, speedup = 1 / ((1-p) + p/N)"),
        (axes[1], scaling.gustafson, "Gustafson: problem grows with N, (1-p) + p·N"),
    ):
        ax.plot(workers, workers, "k:", label="ideal: N")
        for p in ps:
            line = ax.plot(workers, law(p, workers), label=f"p = {p:g}")[0]
            if law is scaling.amdahl and p < 1:
                ax.axhline(
                    scaling.max_speedup(p),
                    color=line.get_color(),
                    linestyle="--",
                    alpha=0.4,
                    linewidth=0.8,
                )
        for label, (n, speedup) in (measured or {}).items():
            ax.plot([n], [speedup], "o", markersize=8, markeredgecolor="black", label=label)
        ax.set(xlabel="workers N", ylabel="speedup", title=title)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top = max(
        scaling.max_speedup(max(p for p in ps if p < 1) if any(p < 1 for p in ps) else 0.0), 2.0
    )
    axes[0].set_ylim(0, min(max_workers, top) * 1.1)
    axes[1].set_ylim(0, max_workers * 1.05)
    fig.tight_layout()
    return fig


def scaling_law_curves(laws: dict, measured: dict[str, tuple[float, float]] | None = None, ax=None):
    """One parallel fraction, both laws on one axes: ``laws`` is :func:`course_utils.scaling.laws`'
    output (workers, amdahl, gustafson, limit); ``measured`` adds points ``{"label": (N, S)}``."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    workers = np.asarray(laws["workers"])
    n_max = int(workers[-1])
    amdahl_n, gustafson_n = float(laws["amdahl"][-1]), float(laws["gustafson"][-1])
    ax.plot(workers, workers, "k:", label="ideal: N")
    ax.plot(
        workers,
        laws["gustafson"],
        color="tab:green",
        marker=".",
        label=f"Gustafson (problem grows): {gustafson_n:.1f}× at N={n_max}",
    )
    ax.plot(
        workers,
        laws["amdahl"],
        color="tab:blue",
        marker=".",
        label=f"Amdahl (fixed problem): {amdahl_n:.2f}× at N={n_max}",
    )
    if np.isfinite(laws["limit"]):
        ax.axhline(
            laws["limit"],
            color="tab:blue",
            linestyle="--",
            alpha=0.6,
            label=f"Amdahl's ceiling 1/(1-p) = {laws['limit']:.1f}×",
        )
    for label, (n, speedup) in (measured or {}).items():
        ax.plot([n], [speedup], "o", markersize=9, markeredgecolor="black", label=label)
    ax.set(
        xlabel="workers N",
        ylabel="speedup",
        xlim=(1, max(n_max, 2)),
        ylim=(0, max(n_max, 2) * 1.05),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


# --- pipeline parallelism (lesson 06) ----------------------------------------------------------


def _field(event, name: str):
    return event[name] if isinstance(event, dict) else getattr(event, name)


def gantt(
    events: Sequence,
    title: str | None = None,
    unit: str = "ms",
    num_stages: int | None = None,
    ax=None,
):
    """A pipeline timeline: one row per stage, a bar per forward (blue) and backward (orange) of
    each microbatch, its number inside; idle time is the white space (the bubble). ``events``:
    objects or dicts with stage, kind ("F"/"B"), microbatch, start, end (seconds, or slots with
    ``unit="slot"``)."""
    fig, ax = _axes(ax, figsize=(9, 2.6))
    scale = {"ms": 1e3, "s": 1.0, "slot": 1.0}[unit]
    stages = [_field(e, "stage") for e in events]
    num_stages = num_stages or (max(stages) + 1 if stages else 1)
    end = max((_field(e, "end") for e in events), default=1.0) * scale
    colors = {"F": "tab:blue", "B": "tab:orange"}
    for e in events:
        start, width = _field(e, "start") * scale, (_field(e, "end") - _field(e, "start")) * scale
        kind, stage = _field(e, "kind"), _field(e, "stage")
        ax.barh(
            stage, width, left=start, height=0.8, color=colors.get(kind, "gray"), edgecolor="white"
        )
        if width > end / 60:  # label bars wide enough to read
            ax.text(
                start + width / 2,
                stage,
                str(_field(e, "microbatch")),
                ha="center",
                va="center",
                fontsize=8,
                color="white",
            )
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
    ax.set_ylim(num_stages - 0.5, -0.5)  # stage 0 on top, as data flows downwards
    ax.set_xlim(0, end * 1.01)
    ax.set(xlabel="time slot" if unit == "slot" else f"time ({unit})", title=title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["forward", "backward"], loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def bubble(
    microbatches: Sequence[int],
    formula: dict[str, Sequence[float]],
    simulated: dict[str, Sequence[float]] | None = None,
    measured: dict[str, Sequence[float]] | None = None,
    title: str | None = "Pipeline bubble",
    ax=None,
):
    """Idle fraction against the number of microbatches: the formula as lines, the simulation as
    open circles, measurements as crosses; one colour per key (e.g. "p = 2") in all three.
    A measured series may hold None where nothing was measured."""
    fig, ax = _axes(ax)
    for k, (label, values) in enumerate(formula.items()):
        color = f"C{k}"
        ax.plot(microbatches, values, color=color, label=f"{label}: (p-1)/(m+p-1)")
        if simulated and label in simulated:
            ax.plot(
                microbatches,
                simulated[label],
                "o",
                mfc="none",
                color=color,
                ms=9,
                label=f"{label}: simulated",
            )
        if measured and label in measured:
            pts = [(m, v) for m, v in zip(microbatches, measured[label]) if v is not None]
            if pts:
                ax.plot(*zip(*pts), "x", color=color, ms=9, mew=2, label=f"{label}: measured")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(microbatches), [str(m) for m in microbatches])
    ax.set(xlabel="microbatches m", ylabel="idle share of stage time", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- lesson 04: communication ------------------------------------------------------------------


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


# --- lesson 05: data parallel ------------------------------------------------------------------


def speedup(
    points: Sequence[dict],
    by: str | None = "label",
    cores: int | None = None,
    title: str | None = None,
    axes=None,
):
    """Speedup (left) and scaling efficiency (right) against the number of workers, with the ideal
    lines (speedup N, efficiency 1). ``points``: dicts with ``nproc`` and ``speedup`` (and
    ``efficiency``, default speedup / nproc), one line per value of ``by``. With ``cores``, the
    worker counts above it are shaded: those runs oversubscribe the machine."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    fig = axes[0].figure
    groups: dict = {}
    for p in points:
        eff = p.get("efficiency", p["speedup"] / p["nproc"])
        groups.setdefault(p[by] if by else None, []).append((p["nproc"], p["speedup"], eff))
    all_n = sorted({p["nproc"] for p in points} | {1})
    n_max = max(all_n + [2])
    grid = np.arange(1, n_max + 1)
    axes[0].plot(grid, grid, "k--", alpha=0.7, label="ideal: N times faster")
    axes[1].plot(grid, np.ones_like(grid), "k--", alpha=0.7, label="ideal: 100%")
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        ns, speedups, effs = zip(*sorted(groups[key]))
        label = str(key) if by and key is not None else None
        axes[0].plot(ns, speedups, marker="o", label=label)
        axes[1].plot(ns, 100 * np.asarray(effs), marker="o", label=label)
    axes[1].lines[0].set_ydata(100 * np.ones_like(grid))
    top = max([s for _, s, _ in sum(groups.values(), [])] + [n_max]) * 1.1
    axes[0].set(xlabel="workers N", ylabel="speedup over 1 worker", ylim=(0, top))
    axes[1].set(xlabel="workers N", ylabel="scaling efficiency, % (speedup / N)")
    axes[1].set_ylim(0, max(110, 100 * max([e for *_, e in sum(groups.values(), [])] + [1]) * 1.1))
    for ax in axes:
        if cores is not None and n_max > cores:
            ax.axvspan(cores + 0.5, n_max + 0.5, color="0.85", alpha=0.6, label="oversubscribed")
        ax.set_xticks(grid)
        ax.set_xlim(0.5, n_max + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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


def speedup_bars(
    labels: Sequence[str],
    seconds: Sequence[float],
    title: str | None = None,
    baseline: int = 0,
    ax=None,
):
    """Wall-clock times as bars, in ms or s (whichever reads better), each labelled with its time and
    its speedup over bar ``baseline`` (lesson 03)."""
    fig, ax = _axes(ax, figsize=(6, 3.6))
    seconds = np.asarray(seconds, dtype=float)
    scale, unit = (1e3, "ms") if seconds.max() < 1 else (1.0, "s")
    values = seconds * scale
    colors = [_WORKER_COLORS[i % len(_WORKER_COLORS)] for i in range(len(labels))]
    bars = ax.bar(labels, values, color=colors, edgecolor="black")
    for bar, value, s in zip(bars, values, seconds):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            value,
            f"{value:.3g} {unit}\n{seconds[baseline] / s:.2f}×",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel=f"{unit} (lower is faster)", title=title, ylim=(0, values.max() * 1.3))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


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
