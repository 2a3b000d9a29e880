"""Two kinds of links (lesson 15): the alpha-beta model of lesson 04 with a fast link inside a node
and a slow one between nodes, and the hierarchical all-reduce that the slow link asks for.

Ranks are numbered node by node, as torchrun numbers them: with ``nodes`` x ``per_node`` ranks,
rank r lives on node ``r // per_node`` as its local rank ``r % per_node``. Each node has one link
to the others, full duplex: it carries ``beta_inter`` bytes/s out and as many in. Ranks of the
same node talk through the node's memory (``intra``), far faster. A hop of ``b`` bytes over a link
costs ``alpha + b / beta`` (:class:`TwoLinks`), and what each node's link carries, out and in
alike, is what the slow link decides. With N = nodes x per_node, M = nodes, P = per_node and B the
bytes to sum:

- **Flat ring** in rank order (:func:`collectives.ring_all_reduce`, gloo's all-reduce): 2(N-1)
  steps; in each, every rank sends a chunk of B/N to the next. On each node one hop of the ring
  leaves it (its last rank to the next node's first) and one arrives, so every step puts B/N on
  each link in each direction: 2(N-1)/N x B in all (1.5 B for 2 x 2). A step ends when its slowest
  hop ends, and the ring cannot run ahead of it (the next step sends what this one received), so
  each of the 2(N-1) steps costs the slow link's ``alpha + B / (N beta_inter)``. No ring order
  does better: a ring that visits two nodes leaves each at least once.
- **Hierarchical**: a reduce-scatter inside the node leaves each rank the node's sum of one
  shard of B/P; the P ranks that hold the same shard (one per node) all-reduce it across the
  nodes, a ring of M on B/P; an all-gather inside the node puts the shards back together. The P
  cross-node rings run at once and share the node's link: each of their 2(M-1) steps puts P
  chunks of B/(PM) on it, B/M. So the link carries 2(M-1)/M x B (B for 2 nodes), the least an
  all-reduce among M nodes can (Patarasuk & Yuan's bound; for 2, plainly: each node must receive
  the other's sum of every element), and the time
  is ``2(P-1) (alpha_intra + B / (P beta_intra)) + 2(M-1) (alpha_inter + B / (M beta_inter))``.
- **2-D mesh** (dp x tp, tp inside the node: each rank holds 1/P of the model, so DDP all-reduces
  B/P over the dp group, one rank per node): the hierarchical's middle phase alone, the same
  2(M-1)/M x B on the link. With tp across the nodes instead, dp's all-reduce stays inside the
  node and nothing of it crosses (tp's activations do: the placement table).

**How much hierarchical can win.** For large messages, where bandwidth rules, flat/hierarchical
is at most the ratio of the bytes each puts on the slow link: (2(N-1)/N) / (2(M-1)/M) = 1.5 for
2 x 2 (1.75 for 2 x 4, towards 2 as P grows), and the intra-node phases only lower it:
``1.5 B/beta_inter`` against ``B/beta_inter + B/beta_intra`` (:meth:`TwoLinks.ratio_bound`). So on
2 nodes of 2 ranks a 16 MB all-reduce cannot be 1.5x faster hierarchically than a ring: it can
only approach 1.5x as the node's inside gets free. Small messages are ruled by the latencies
instead, ``6 alpha_inter`` against ``2 alpha_inter + 2 alpha_intra``: up to 3x where the slow
link's latency dwarfs the node's (on the one-machine cluster both are the kernel's, alike).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from course_utils import collectives
from course_utils.collectives import AlphaBeta

# PyTorch 2.13 renamed the single-tensor collectives (reduce_scatter_tensor,
# all_gather_into_tensor), and the old names warn; older versions have only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

METHODS = ("flat", "hierarchical", "mesh")


def _hop(link: AlphaBeta, nbytes):
    """One message over ``link``: ``alpha + bytes / beta`` seconds."""
    return link.alpha_s + np.asarray(nbytes, float) / link.beta_bytes_per_s


@dataclass(frozen=True)
class TwoLinks:
    """The alpha-beta model with two links: ``intra`` inside a node, ``inter`` between nodes.
    Each is an :class:`~course_utils.collectives.AlphaBeta` whose alpha and beta describe one
    link (a 2-rank all-reduce over it takes ``2 alpha + bytes / beta``); its ``world_size`` is 2.
    Every prediction takes the bytes summed (a number or an array) and the layout."""

    intra: AlphaBeta
    inter: AlphaBeta

    def flat(self, nbytes, nodes: int, per_node: int):
        """Seconds of a ring all-reduce over all ranks in rank order: 2(N-1) steps, each as long
        as its slowest hop."""
        n = nodes * per_node
        if n == 1:
            return np.zeros_like(np.asarray(nbytes, float))
        chunk = np.asarray(nbytes, float) / n
        hops = [_hop(self.intra, chunk)] if per_node > 1 else []
        hops += [_hop(self.inter, chunk)] if nodes > 1 else []
        return 2 * (n - 1) * np.maximum.reduce(hops)

    def hierarchical(self, nbytes, nodes: int, per_node: int):
        """Seconds of reduce-scatter inside the node, all-reduce across, all-gather inside."""
        return self.inside(nbytes, nodes, per_node) + self.mesh(nbytes, nodes, per_node)

    def inside(self, nbytes, nodes: int, per_node: int):
        """Seconds of the hierarchical's two intra-node phases (a ring of P each): P-1 steps of
        B/P to reduce-scatter, P-1 to all-gather; every node runs them at once, on its own."""
        b = np.asarray(nbytes, float)
        if per_node == 1:
            return np.zeros_like(b)
        return 2 * (per_node - 1) * _hop(self.intra, b / per_node)

    def mesh(self, nbytes, nodes: int, per_node: int, dp_across: bool = True):
        """Seconds of DDP's all-reduce on a (dp, tp) mesh whose tp holds 1/tp of ``nbytes`` on
        each rank: dp across the nodes (tp = ``per_node`` inside) when ``dp_across``, else dp
        inside the node (tp = ``nodes`` across)."""
        b = np.asarray(nbytes, float)
        if not dp_across:  # each rank holds B/M and sums it with the P ranks of its node
            steps, hop = 2 * (per_node - 1), _hop(self.intra, b / (nodes * per_node))
            return steps * hop if per_node > 1 else np.zeros_like(b)
        # the P rings of M ranks share the node's link: each step puts P x B/(PM) = B/M on it
        hop = _hop(self.inter, b / nodes)
        return 2 * (nodes - 1) * hop if nodes > 1 else np.zeros_like(b)

    def predict(self, method: str, nbytes, nodes: int, per_node: int):
        """Seconds of ``method`` (one of :data:`METHODS`) on ``nbytes``."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose from {METHODS}")
        return getattr(self, method)(nbytes, nodes, per_node)

    @staticmethod
    def link_bytes(method: str, nbytes, nodes: int, per_node: int, dp_across: bool = True):
        """Bytes each node's link carries in each direction (the module docstring's sums)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose from {METHODS}")
        b, n = np.asarray(nbytes, float), nodes * per_node
        if nodes == 1 or (method == "mesh" and not dp_across):
            return np.zeros_like(b)
        if method == "flat":  # one chunk of B/N out and one in per step, 2(N-1) steps
            return 2 * (n - 1) / n * b
        return 2 * (nodes - 1) / nodes * b  # 2(M-1) steps of P chunks of B/(PM)

    @staticmethod
    def ratio_bound(nodes: int, per_node: int) -> float:
        """The most flat/hierarchical can be for large messages over a slow link: the ratio of
        the bytes each puts on it (latencies can do more for small ones: the module docstring)."""
        if nodes < 2:
            raise ValueError("with one node nothing crosses a link: no bound to give")
        flat, hierarchical = (TwoLinks.link_bytes(m, 1.0, nodes, per_node) for m in METHODS[:2])
        return float(flat / hierarchical)


@dataclass(frozen=True)
class NodeGroups:
    """This rank's two process groups: ``intra``, the ranks of its node, and ``inter``, the ranks
    with its local rank, one on each node."""

    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    nodes: int
    per_node: int


def node_groups(per_node: int) -> NodeGroups:
    """The intra-node and inter-node groups of this rank, for ranks numbered node by node. Every
    rank makes every group, in the same order (``dist.new_group`` is a collective of all ranks),
    and keeps its own two."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if per_node < 1 or world_size % per_node:
        raise ValueError(f"{world_size} ranks do not make nodes of {per_node}")
    nodes = world_size // per_node
    node, local_rank = divmod(rank, per_node)
    intra = [dist.new_group(list(range(i * per_node, (i + 1) * per_node))) for i in range(nodes)]
    inter = [dist.new_group(list(range(j, world_size, per_node))) for j in range(per_node)]
    return NodeGroups(intra[node], inter[local_rank], nodes, per_node)


def hierarchical_all_reduce(tensor: torch.Tensor, groups: NodeGroups) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place, like ``dist.all_reduce``, in three collectives:
    reduce-scatter inside the node, all-reduce of this rank's shard across the nodes, all-gather
    inside the node. The tensor is padded with zeros to a multiple of ``per_node``."""
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = work.view(-1)
    shard = -(-flat.numel() // groups.per_node)  # ceil: every rank's shard is the same size
    padding = shard * groups.per_node - flat.numel()
    full = torch.cat([flat, flat.new_zeros(padding)]) if padding else flat  # (per_node * shard,)
    mine = full.new_empty(shard)
    _reduce_scatter(mine, full, group=groups.intra)  # the node's sum of shard local_rank
    dist.all_reduce(mine, group=groups.inter)  # ... summed over the nodes
    _all_gather(full, mine, group=groups.intra)  # every shard, from the ranks of the node
    if padding:
        flat.copy_(full[: flat.numel()])
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def timed(
    calls: dict[str, Callable[[torch.Tensor], object]],
    sizes_bytes: Sequence[int],
    repeats: int = 5,
    warmup: int = 1,
) -> list[dict]:
    """Time each call on a float32 tensor of each size, on every rank; the calls alternate in each
    repeat (A B A B ...), each after a barrier, and a repeat's time is the slowest rank's. Returns,
    the same on every rank, ``{"op", "bytes", "seconds"}`` (the median), ``"min_seconds"`` and
    ``"samples"`` per (call, size), as :func:`collectives.bandwidth_probe` does."""
    times = torch.zeros(len(calls), len(sizes_bytes), repeats, dtype=torch.float64)
    for j, nbytes in enumerate(sizes_bytes):
        tensor = torch.zeros(max(1, int(nbytes) // collectives.FLOAT32_BYTES))  # sums stay 0
        for _ in range(warmup):
            for call in calls.values():
                call(tensor)
        for k in range(repeats):
            for i, call in enumerate(calls.values()):
                dist.barrier()
                start = time.perf_counter()
                call(tensor)
                times[i, j, k] = time.perf_counter() - start
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    samples = times.tolist()
    return [
        {
            "op": name,
            "bytes": max(1, int(nbytes) // collectives.FLOAT32_BYTES) * collectives.FLOAT32_BYTES,
            "seconds": statistics.median(samples[i][j]),
            "min_seconds": min(samples[i][j]),
            "samples": samples[i][j],
        }
        for i, name in enumerate(calls)
        for j, nbytes in enumerate(sizes_bytes)
    ]


def all_reduces(groups: NodeGroups) -> dict[str, Callable[[torch.Tensor], object]]:
    """The all-reduces to compare, as :func:`timed` calls: gloo's over all ranks, the ring by hand
    (both flat), the hierarchical one, and the mesh's (1/``per_node`` of the tensor, inter only)."""
    shard = lambda t: t[: -(-t.numel() // groups.per_node)]  # noqa: E731
    return {
        "gloo": dist.all_reduce,
        "ring": collectives.ring_all_reduce,
        "hierarchical": lambda t: hierarchical_all_reduce(t, groups),
        "mesh": lambda t: dist.all_reduce(shard(t), group=groups.inter),
    }


def time_links(
    sizes_bytes: Sequence[int], per_node: int, repeats: int = 5, warmup: int = 1
) -> list[dict]:
    """On every rank: 2-rank all-reduces between the first two ranks of every node, all nodes at
    once (op "intra": as the hierarchical's intra-node phases run, and on a one-machine cluster
    the nodes share its cores), then between rank 0 and rank ``per_node``, the first of the next
    node, alone (op "inter"), by :func:`timed`; the rows :func:`fit_two_links` fits."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if per_node < 2 or world_size < 2 * per_node:
        raise ValueError("fitting both links needs 2 ranks on a node and at least 2 nodes")
    firsts = range(0, world_size, per_node)
    intra = {first: dist.new_group([first, first + 1]) for first in firsts}  # same order on all
    inter = dist.new_group([0, per_node])
    mine = intra.get(rank - rank % per_node) if rank % per_node < 2 else None

    def on_intra(tensor: torch.Tensor) -> None:
        if mine is not None:
            dist.all_reduce(tensor, group=mine)

    def on_inter(tensor: torch.Tensor) -> None:
        if rank in (0, per_node):
            dist.all_reduce(tensor, group=inter)

    return timed({"intra": on_intra, "inter": on_inter}, sizes_bytes, repeats, warmup)


def fit_two_links(timings: Sequence[dict]) -> TwoLinks:
    """Both links' (alpha, beta) from :func:`time_links`'s rows, each by lesson 04's least squares
    (:func:`collectives.fit_alpha_beta` of a 2-rank all-reduce: ``2 alpha + bytes / beta``)."""

    def fit(op: str) -> AlphaBeta:
        rows = [r for r in timings if r["op"] == op]
        if len(rows) < 2:
            raise ValueError(f"fitting the {op} link needs at least two sizes, got {len(rows)}")
        return collectives.fit_alpha_beta(
            [r["bytes"] for r in rows], [r["seconds"] for r in rows], 2
        )

    return TwoLinks(intra=fit("intra"), inter=fit("inter"))
