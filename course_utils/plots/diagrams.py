"""Diagrams of lesson 03: the kinds of parallelism (data, task, pipeline) and the two memory
models (threads sharing memory, processes passing messages)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes

__all__ = ["parallelism", "parallelism_overview", "memory_models", "WORKER_COLORS"]


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


WORKER_COLORS = ("#cfe8cf", "#fde2c4", "#e3d7f0", "#f6d0d0")


def _workers(ax, texts: Sequence[str], results: Sequence[str], footer: str) -> list[float]:
    """Two worker boxes side by side, each sending its result down to a footer box (the step
    that joins them); returns the x of each worker's top centre, for the arrows that feed it."""
    for w, (text, result) in enumerate(zip(texts, results)):
        x0 = 0.3 + 2.3 * w
        _box(ax, x0, 1.5, 1.8, 2.0, text, WORKER_COLORS[w])
        _arrow(ax, (x0 + 0.9, 1.45), (x0 + 0.9, 0.85), text=result)
    _box(ax, 0.3, 0.0, 4.1, 0.8, footer, "#eeeeee", fontsize=8)
    return [0.3 + 2.3 * w + 0.9 for w in range(len(texts))]


def _data_parallel(ax) -> None:
    ax.set_title("data parallelism: split the batch\n(lessons 04, 05)", fontsize=10)
    for i in range(8):  # the global batch: 8 samples, 4 per worker
        worker = i // 4
        _box(ax, 0.2 + 0.55 * i, 4.3, 0.45, 0.5, f"x{i}", WORKER_COLORS[worker], fontsize=7)
    ax.text(2.4, 5.05, "one global batch", ha="center", fontsize=8)
    tops = _workers(
        ax,
        [f"worker {w}\nfull copy\nof the model\n(same weights)" for w in range(2)],
        ["grads g0", "grads g1"],
        "all-reduce: average g0 and g1,\nevery copy takes the same step",
    )
    for w, top in enumerate(tops):
        _arrow(ax, (1.1 + 2.2 * w, 4.25), (top, 3.55))


def _task_parallel(ax) -> None:
    ax.set_title(
        "task parallelism: independent jobs\n(this lesson; model parallel: 06, 08)", fontsize=10
    )
    lrs = ("lr 0.003", "lr 0.01", "lr 0.03", "lr 0.1")
    for i, lr in enumerate(lrs):  # a queue of independent tasks, dealt round-robin
        _box(ax, 0.2 + 1.1 * i, 4.3, 0.95, 0.5, lr, WORKER_COLORS[i % 2], fontsize=7)
    ax.text(2.4, 5.05, "4 training runs (a sweep)", ha="center", fontsize=8)
    mine = [", ".join(lrs[i].split()[1] for i in range(w, 4, 2)) for w in range(2)]
    tops = _workers(
        ax,
        [f"worker {w}\ntrains lr\n{mine[w]}\none after the other" for w in range(2)],
        ["result", "result"],
        "no communication until the end:\ncollect the results",
    )
    for w, top in enumerate(tops):
        for i in range(w, 4, 2):
            _arrow(ax, (0.67 + 1.1 * i, 4.25), (top, 3.55))


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
                WORKER_COLORS[m % len(WORKER_COLORS)],
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
    """Parallel vs distributed computing: threads sharing one memory (parallel, not distributed),
    processes passing messages (parallel and distributed), each panel's title saying which."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    fig = axes[0].figure
    ax = axes[0]
    ax.set_title(
        "shared memory: threads in one process, one machine\n(parallel, not distributed)",
        fontsize=10,
    )
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
        _box(ax, 0.3 + 1.55 * t, 0.8, 1.3, 1.0, f"thread {t}\n(a core)", WORKER_COLORS[t])
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
    ax.set_title(
        "message passing: processes, one machine or many\n(parallel and distributed)", fontsize=10
    )
    for w in range(2):
        x0 = 0.3 + 2.6 * w
        _box(ax, x0, 1.9, 1.8, 0.8, f"memory of\nprocess {w}", "#eeeeee", fontsize=8)
        _box(ax, x0, 0.8, 1.8, 0.9, f"process {w}\n(a GPU or cores)", WORKER_COLORS[w])
    _arrow(ax, (2.15, 1.25), (2.85, 1.25), style="<|-|>")
    ax.text(
        2.5,
        3.3,
        "send / receive / all-reduce\nover a link: gloo (TCP; ibverbs, uv),\n"
        "NCCL (NVLink, PCIe, InfiniBand)",
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
