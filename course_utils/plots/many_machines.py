"""Figures of lesson 14 (many machines): the one-machine cluster as a diagram, DDP's step time
at each link rate against the models, the bytes crossing a link over time, and an elastic job's
timeline when a node is lost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_utils.cluster import Cluster
from course_utils.plots.core import _axes
from course_utils.plots.diagrams import WORKER_COLORS, _box

__all__ = ["cluster_diagram", "step_times", "link_traffic", "elastic_timeline"]

MB = 1e6
MODEL_MARKERS = ("D", "s", "^", "v")
PHASE_COLORS = {  # an agent's phases; a job's phase begins with its workers' start-up
    "agents start and meet": "0.85",
    "job on all nodes": "tab:blue",
    "job on fewer nodes": "tab:green",
    "waiting to rejoin": "tab:orange",
}


def cluster_diagram(nodes: int = 2, workers_per_node: int = 1, rate: str | None = "1gbit", ax=None):
    """The cluster of :mod:`course_utils.cluster`: each node a network namespace (host name,
    its link ``eth0`` with its address, workers, loopback), each link a veth pair to a port of
    the bridge in the switch's namespace, a token bucket of ``rate`` on both ends."""
    fig, ax = _axes(ax, figsize=(1.0 + 3.0 * nodes, 4.8))
    width = 3.0 * nodes
    ax.add_patch(plt.Rectangle((0.2, 3.7), width - 0.4, 0.9, facecolor="#eeeeee", ec="black"))
    ax.text(width / 2, 4.4, "switch (a namespace of its own): bridge br0", ha="center", fontsize=9)
    bucket = f"token bucket {rate}" if rate else "no rate limit"
    for node in range(nodes):
        x = 3.0 * node + 0.2
        ax.add_patch(plt.Rectangle((x, 0.0), 2.6, 2.75, facecolor="#f4f8fc", ec="black", lw=1.2))
        ax.text(x + 0.1, 2.55, f"{Cluster.hostname(node)} (a namespace)", fontsize=9, va="center")
        _box(ax, x + 1.3, 1.85, 1.1, 0.5, f"eth0 {Cluster.address(node)}", "#dbe9f6", fontsize=7)
        _box(ax, x + 1.45, 3.75, 0.8, 0.35, f"port {Cluster.hostname(node)}", "white", fontsize=7)
        ax.plot([x + 1.85, x + 1.85], [2.37, 3.73], color="black", lw=2)
        ax.text(x + 1.75, 3.2, f"veth pair\n{bucket}\neach way", fontsize=7, color="tab:red",
                va="center", ha="right")  # fmt: skip
        for w in range(workers_per_node):
            rank = node * workers_per_node + w
            left, size = x + 0.15 + w * 2.3 / workers_per_node, 2.3 / workers_per_node - 0.1
            color = WORKER_COLORS[rank % len(WORKER_COLORS)]
            _box(ax, left, 0.95, size, 0.6, f"worker, rank {rank}", color, fontsize=8)
        _box(ax, x + 0.15, 0.15, 2.3, 0.5, "lo 127.0.0.1 (inside the node)", "#fff7d6", fontsize=7)
    ax.set_xlim(0, width)
    ax.set_ylim(-0.1, 4.7)
    ax.axis("off")
    ax.set_title(f"A cluster on one machine: {nodes} nodes joined by a switch", fontsize=10)
    fig.tight_layout()
    return fig


def step_times(
    rates: Sequence[str], measured: Mapping | None, models: Mapping[str, Mapping[str, float]],
    ax=None,
):  # fmt: skip
    """DDP's step time (ms) at each link rate: measured (bars at the median, min-max whiskers;
    none where ``measured`` is None, predictions only) and each model's prediction (markers),
    ``models``: ``{name: {rate: seconds}}``."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    xs = np.arange(len(rates))
    if measured is not None:
        spreads = [measured[rate] for rate in rates]
        medians = np.array([1e3 * s.median for s in spreads])
        errors = [
            medians - [1e3 * s.low for s in spreads],
            [1e3 * s.high for s in spreads] - medians,
        ]
        ax.bar(xs, medians, 0.5, color="0.75", edgecolor="black", label="measured (median)")
        ax.errorbar(xs, medians, yerr=errors, fmt="none", ecolor="black", capsize=4)
    for i, (name, predicted) in enumerate(models.items()):
        ys = [1e3 * predicted[rate] for rate in rates]
        marker = MODEL_MARKERS[i % len(MODEL_MARKERS)]
        ax.plot(xs, ys, marker, ms=9, linestyle="none", label=name)
    ax.set_xticks(xs, [str(rate) for rate in rates])
    ax.set(xlabel="link rate", ylabel="ms per step")
    what = "measured and predicted" if measured is not None else "predicted only (no cluster)"
    ax.set_title(f"DDP across 2 nodes: step time at each link rate, {what}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def link_traffic(
    traces: Mapping[str, Sequence[tuple[float, float]]], rates: Mapping[str, float], ax=None
):
    """Bytes a node's link has sent (MB) during a run against the time (s) since it began to
    carry the gradients (its first 2%), one line per link rate (``traces``: ``{rate: [(seconds,
    bytes), ...]}``), and dotted beside each the slope the rate allows (``rates``: ``{rate:
    bytes per second}``; a rate left out is unlimited)."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    done = 0.0  # when the last link finished sending
    for name, trace in traces.items():
        t, sent = (np.asarray(v, dtype=float) for v in zip(*trace))
        first = np.flatnonzero(sent > 0.02 * sent[-1])[0]
        t = t - t[first]
        done = max(done, t[np.flatnonzero(sent >= sent[-1])[0]])
        (line,) = ax.plot(t, sent / MB, label=f"{name}: bytes sent")
        if name in rates:
            ends = np.array([0.0, (sent[-1] - sent[first]) / rates[name]])
            ax.plot(ends, (sent[first] + ends * rates[name]) / MB, ":", lw=2.5,
                    color=line.get_color(), label=f"{name}: the rate's slope")  # fmt: skip
    ax.set(xlabel="seconds since the link began to carry gradients", ylabel="MB sent by node 1")
    ax.set_title("The gradients crossing the link, as they go", fontsize=10)
    ax.set_xlim(-0.05 * done, 1.15 * done)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _phases(events: Sequence[dict], node: int, end: float) -> list[tuple[float, float, str]]:
    """One node's lane: (start, stop, phase) from its events, until it is killed or finishes."""
    mine = [e for e in events if e["node"] == node]
    spans, start, phase = [], 0.0, "agents start and meet"
    most = max((e.get("nodes", 0) for e in events if e["event"] == "rendezvous"), default=0)
    for e in mine:
        if e["event"] == "rendezvous":
            spans.append((start, e["t"], phase))
            full = e["nodes"] >= most
            start, phase = e["t"], "job on all nodes" if full else "job on fewer nodes"
        elif e["event"] in ("failed", "killed", "finished"):
            spans.append((start, e["t"], phase))
            start, phase = e["t"], "waiting to rejoin" if e["event"] == "failed" else None
            if phase is None:
                return [s for s in spans if s[1] > s[0]]
    spans.append((start, end, phase))
    return [s for s in spans if s[1] > s[0]]


def elastic_timeline(events: Sequence[dict], nodes: int = 2, ax=None):
    """An elastic job's timeline (:func:`course_utils.many_machines.timeline`): per node, its
    start-up, its training with all nodes or fewer, its wait to rejoin after a failure; a cross
    where a node was killed, a tick per checkpoint (with its step)."""
    fig, ax = _axes(ax, figsize=(10, 1.8 + 0.7 * nodes))
    end = max(e["t"] for e in events)
    for node in range(nodes):
        for start, stop, phase in _phases(events, node, end):
            ax.barh(node, stop - start, left=start, height=0.5, color=PHASE_COLORS[phase], lw=0)
    labelled = -end  # where the last checkpoint's step was written: labels keep apart
    for e in events:
        if e["event"] == "killed":
            ax.plot(e["t"], e["node"], "X", color="tab:red", ms=13, mec="black")
        elif e["event"] == "checkpoint":
            ax.plot([e["t"]] * 2, [e["node"] - 0.3, e["node"] + 0.3], color="black", lw=1.5)
            if e["t"] - labelled > 0.04 * end:
                labelled = e["t"]
                ax.text(e["t"], e["node"] - 0.34, str(e["step"]), ha="center", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    handles += [
        plt.Line2D([], [], marker="X", color="tab:red", mec="black", ls="none", ms=10),
        plt.Line2D([], [], color="black", lw=1.5),
    ]
    names = [*PHASE_COLORS, "node killed", "checkpoint (its step)"]
    ax.legend(handles, names, ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    ax.set_yticks(range(nodes), [f"node{n}" for n in range(nodes)])
    ax.set_ylim(nodes - 0.5, -0.6)
    ax.set_xlabel("seconds since the agents started")
    ax.set_title("A node lost mid-run: what each torchrun agent did", fontsize=10)
    fig.tight_layout()
    return fig
