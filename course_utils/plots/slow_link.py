"""Figures of lesson 15 (across a slow link): both links' fits, the all-reduces over message sizes
against the two-link model, the decision guide's predicted communication per layout, the layouts
measured on the cluster against their collectives, and DDP's compression hooks on the link."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.plots.core import _axes

__all__ = ["two_links", "all_reduce_sizes", "layout_times", "placement_runs", "compression_runs"]

MB = 1e6
METHOD_MODEL = {"gloo": "flat", "ring": "flat", "hierarchical": "hierarchical", "mesh": "mesh"}
COLORS = {"gloo": "tab:blue", "ring": "tab:cyan", "hierarchical": "tab:green", "mesh": "tab:purple"}


def _points(ax, rows: Sequence[dict], label: str, color: str, marker: str = "o") -> None:
    """Measured rows (``bytes``, ``seconds`` the median, ``samples``) as points, min-max bars."""
    xs = np.array([r["bytes"] for r in rows], float) / MB
    med = np.array([1e3 * r["seconds"] for r in rows])
    low = med - [1e3 * min(r["samples"]) for r in rows]
    high = [1e3 * max(r["samples"]) for r in rows] - med
    ax.errorbar(xs, med, yerr=[low, high], fmt=marker, color=color, capsize=3, label=label)


def _megabytes(ax, sizes: Sequence[float]) -> None:
    """A log x axis of MB with a tick at each size measured."""
    ax.set_xscale("log")
    ax.set_xticks([s / MB for s in sizes], [f"{s / MB:.3g}" for s in sizes])
    ax.minorticks_off()


def two_links(rows: Sequence[dict] | None, model, sizes: Sequence[float], ax=None):
    """A 2-rank all-reduce over each link against its bytes: measured (``rows`` of
    :func:`course_utils.topology.time_links`, None: predictions only) and the fitted (or assumed)
    ``model`` (a :class:`~course_utils.topology.TwoLinks`), ``2 alpha + bytes / beta``."""
    fig, ax = _axes(ax, figsize=(6.5, 4.2))
    grid = np.geomspace(min(sizes), max(sizes), 50)
    for op, link, color in (
        ("intra", model.intra, "tab:orange"),
        ("inter", model.inter, "tab:red"),
    ):
        where = "inside a node" if op == "intra" else "across nodes"
        if rows is not None:
            _points(ax, [r for r in rows if r["op"] == op], f"{where}, measured", color)
        line = 1e3 * (2 * link.alpha_s + grid / link.beta_bytes_per_s)
        fit = f"beta {link.beta_bytes_per_s / MB:.3g} MB/s, alpha {1e6 * link.alpha_s:.3g} us"
        ax.plot(grid / MB, line, "--", color=color, label=f"{where}, model: {fit}")
    _megabytes(ax, sizes)
    ax.set(yscale="log", xlabel="MB summed", ylabel="ms per all-reduce (2 ranks)")
    what = "measured and fitted" if rows is not None else "assumed (no cluster): predictions"
    ax.set_title(f"Two links, {what}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def all_reduce_sizes(
    timings: Sequence[dict] | None, model, sizes: Sequence[float], nodes: int, per_node: int,
    ax=None,
):  # fmt: skip
    """Each all-reduce's time against the bytes summed: measured (``timings`` of
    :func:`course_utils.topology.timed`, None: predictions only) as points, the two-link
    ``model``'s prediction for it as a dashed line."""
    fig, ax = _axes(ax, figsize=(7, 4.4))
    grid = np.geomspace(min(sizes), max(sizes), 50)
    shown = sorted({r["op"] for r in timings}) if timings else ["gloo", "hierarchical", "mesh"]
    for op in shown:
        if timings:
            mine = [r for r in timings if r["op"] == op]
            _points(ax, mine, f"{op}, measured", COLORS[op], "s" if op == "ring" else "o")
        if op != "ring":  # the same model line as gloo's
            predicted = 1e3 * model.predict(METHOD_MODEL[op], grid, nodes, per_node)
            name = f"model: {METHOD_MODEL[op]}"
            ax.plot(grid / MB, predicted, "--", color=COLORS[op], label=name)
    _megabytes(ax, sizes)
    ax.set(yscale="log", xlabel="MB summed", ylabel="ms per all-reduce")
    what = "measured and predicted" if timings else "predicted only (no cluster)"
    ax.set_title(f"All-reduce on {nodes} nodes x {per_node} ranks, {what}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def layout_times(rows: Sequence[dict], title: str = "", ax=None):
    """The decision guide (:func:`course_utils.slow_link.layouts`): each layout's predicted
    communication per step, inside the nodes and across them, stacked; fastest on top."""
    fig, ax = _axes(ax, figsize=(7.5, 0.6 * len(rows) + 1.4))
    ys = np.arange(len(rows))
    inside = np.array([r["inside"] for r in rows])
    across = np.array([r["across"] for r in rows])
    ax.barh(ys, inside, color="tab:orange", label="inside the nodes")
    ax.barh(ys, across, left=inside, color="tab:red", label="across the slow link")
    ax.set_yticks(ys, [r["layout"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds of communication per step (predicted, no overlap)")
    ax.set_title(title or "Where to put each axis: predicted communication per step", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _two_panels(ax, figsize: tuple[float, float]):
    """A figure of two panels side by side, or ``ax`` and a twin of it when the caller gives one:
    ``(figure, left, right)``."""
    if ax is None:
        fig, (left, right) = plt.subplots(1, 2, figsize=figsize)
        return fig, left, right
    return ax.figure, ax, ax.twinx()


def _bar_panel(panel) -> None:
    """A panel of bars and markers: from 0 up, a light grid across, a small legend."""
    panel.set_ylim(bottom=0)
    panel.grid(alpha=0.3, axis="y")
    panel.legend(fontsize=7)


def placement_runs(
    runs: Mapping[str, dict] | None, predicted: Mapping[str, Mapping[str, float]], steps: int,
    rate: str | None = None, ax=None,
):  # fmt: skip
    """Each layout on the cluster (:func:`course_utils.slow_link.placement_sweep`), two panels:
    node 1's bytes on its link per step, averaged over the ``steps`` of a run (measured bars; the
    model's as markers: ``predicted["bytes"]`` by gloo's collectives, ``predicted["nccl"]`` with
    ring reduce-scatters), and the step (measured bars; ``predicted["link_s"]``, the link's
    share alone, as markers), the link at ``rate`` (named in the title). Markers only where
    ``runs`` is None."""
    fig, left, right = _two_panels(ax, (10.5, 4))
    layouts = list(predicted["bytes"])
    xs = np.arange(len(layouts))
    if runs:
        sent = [runs[k]["sent"][1] / steps / MB for k in layouts]
        left.bar(xs, sent, 0.6, color="0.75", edgecolor="black", label="measured (node 1)")
        step = [1e3 * runs[k]["step_s"] for k in layouts]
        right.bar(xs, step, 0.6, color="0.75", edgecolor="black", label="measured step")
    for key, marker, label in (("bytes", "D", "model: gloo's collectives"),
                               ("nccl", "o", "model: ring reduce-scatters (NCCL)")):  # fmt: skip
        ys = [predicted[key][k] / MB for k in layouts]
        left.plot(xs, ys, marker, color="tab:red", mfc="none" if key == "nccl" else None,
                  linestyle="none", label=label)  # fmt: skip
    link_ms = [1e3 * predicted["link_s"][k] for k in layouts]
    right.plot(xs, link_ms, "D", color="tab:red", label="the link's share alone (model)")
    left.set(ylabel="MB per step on the link", title="Bytes on the slow link")
    right.set(ylabel="ms per step", title="Step time")
    for panel in (left, right):
        panel.set_xticks(xs, layouts)
        _bar_panel(panel)
    what = "measured and predicted" if runs else "predicted only (no cluster)"
    at = f", link at {rate}" if rate else ""
    fig.suptitle(f"The transformer on 2 nodes x 2 workers{at}, each layout: {what}", fontsize=10)
    fig.tight_layout()
    return fig


def compression_runs(
    runs: Mapping[str, Mapping[str, dict]] | None, predicted: Mapping[str, Mapping[str, float]],
    steps: int, ax=None,
):  # fmt: skip
    """DDP's hooks across the link, two panels: node 1's bytes per step on the link, averaged
    over the ``steps`` of a run (measured bars, the predicted payloads as markers) and the step time at each rate (measured bars,
    one group per hook; none where ``runs`` is None). ``predicted``: ``{"bytes": {hook: bytes
    per step, the run's average}, rate: {hook: seconds}}``."""
    fig, left, right = _two_panels(ax, (11, 4.2))
    hooks = list(predicted["bytes"])
    xs = np.arange(len(hooks))
    rates = [r for r in predicted if r != "bytes"]
    if runs:
        first = runs[rates[0]]
        left.bar(xs, [first[h]["sent"][1] / steps / 1e3 for h in hooks], 0.6, color="0.75",
                 edgecolor="black", label="measured (node 1)")  # fmt: skip
    left.plot(xs, [predicted["bytes"][h] / 1e3 for h in hooks], "D", color="tab:red",
              label="payloads on the wire, run average (predicted)")  # fmt: skip
    left.set_xticks(xs, hooks, fontsize=8)
    left.set(ylabel="kB per step on the link", title="Bytes on the link")
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        offset = (i - (len(rates) - 1) / 2) * width
        ys = [1e3 * predicted[rate][h] for h in hooks]
        right.plot(xs + offset, ys, "D", color=f"C{i}", mec="black", label=f"{rate}: predicted")
        if runs and rate in runs:
            got = [1e3 * runs[rate][h]["step_s"] if h in runs[rate] else 0 for h in hooks]
            right.bar(xs + offset, got, width, color=f"C{i}", alpha=0.5, label=f"{rate}: measured")
    right.set_xticks(xs, hooks, fontsize=8)
    right.set(ylabel="ms per step", title="Step time at each link rate")
    for panel in (left, right):
        _bar_panel(panel)
    fig.suptitle("DDP across 2 nodes with each --compress hook", fontsize=10)
    fig.tight_layout()
    return fig
