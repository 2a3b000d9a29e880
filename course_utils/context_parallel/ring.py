"""Ring attention (Liu et al. 2023, arXiv:2310.01889): each rank keeps its queries and passes
the key/value blocks around a ring, so that every query meets every key without any rank
holding the whole sequence or its T x T scores.

**The merge.** Softmax over all keys can be computed block by block. For one query, a block
of keys gives an output ``o_b`` (softmax over that block's keys only) and the log-sum-exp of
its scores ``l_b = log sum_j exp(s_j)``. Two blocks combine as

    l = log(exp(l_1) + exp(l_2)),    o = exp(l_1 - l) o_1 + exp(l_2 - l) o_2,

the exact softmax over both (Milakov and Gimelshein 2018, arXiv:1805.02867; FlashAttention,
arXiv:2205.14135, does the same inside one device). So a rank keeps one output and one lse per
query, in float32, and folds in each block as it arrives.

**The ring.** ``cp`` steps: at step s a rank holds the K/V block of rank ``rank - s``; it sends
that block on to ``rank + 1`` and receives the next from ``rank - 1`` with ``isend``/``irecv``
(posted before the block's arithmetic and waited for after it, so the transfer hides behind
the arithmetic when the block takes longer than the message: **overlap**). Blocks hidden by
the causal mask are skipped (:func:`~course_utils.context_parallel.split.plan`).

**Backward**, written out: each block's probabilities are recomputed from the saved lse
(``p = exp(s - lse)``), so no T x T matrix is kept from forward. dQ is summed locally; dK and
dV belong to the keys' owner, so a block's dK/dV accumulator travels around the ring with it,
each rank adding its queries' share, and arrives home after the last step (as picotron does).

**One block's arithmetic** is :func:`block_forward` and :func:`block_backward`, written out.
On the CPU they run through PyTorch's own flash kernel (the one behind
``F.scaled_dot_product_attention``), which does the same arithmetic tile by tile in cache and,
unlike the public function, returns the lse; at a head width of 8 the written-out version
spends most of its time moving whole score matrices through memory, one pass per operation.
``FUSED = False`` runs the written-out arithmetic everywhere; the tests check both.

Every rank posts its messages in the same order (sends before receives on even ranks, the
reverse on odd ones, so that two ranks that exchange both ways also match on NCCL), so the
messages match without tags. :data:`COMM` counts what this process sent and how long it
waited; :data:`LOG` keeps the last spans (post, block, wait) with their times, and the same
spans are ``record_function`` labels (:data:`SPANS`), so a profiler trace draws the ring as a
timeline per rank.
"""

from __future__ import annotations

import collections
import math
import time
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.profiler import record_function

from course_utils.context_parallel import split

COMM = {"calls": 0, "bytes": 0, "seconds": 0.0}  # ring messages sent by this process, waits
SPANS = {"post": "ring: post", "block": "ring: block", "wait": "ring: wait"}  # trace labels


class Span(NamedTuple):
    """One span of the ring on this rank: ``phase`` "forward" or "backward", ``kind`` a key of
    :data:`SPANS`, the ring ``step``, and its ``start`` and ``stop`` (``time.perf_counter``)."""

    phase: str
    kind: str
    step: int
    start: float
    stop: float


LOG: collections.deque[Span] = collections.deque(maxlen=4096)  # the latest spans, oldest first


@contextmanager
def _span(phase: str, kind: str, step: int):
    label = SPANS[kind] if phase == "forward" else f"{SPANS[kind]} (backward)"
    start = time.perf_counter()
    with record_function(label):
        yield
    LOG.append(Span(phase, kind, step, start, time.perf_counter()))


def _post(send: torch.Tensor, receive: torch.Tensor, group, rank: int, cp: int) -> list:
    """Start sending ``send`` to the next rank and receiving ``receive`` from the previous one."""
    right, left = (rank + 1) % cp, (rank - 1) % cp
    if rank % 2 == 0:  # even ranks send first, odd ones receive first (see the docstring)
        requests = [dist.isend(send, group=group, group_dst=right)]
        requests.append(dist.irecv(receive, group=group, group_src=left))
    else:
        requests = [dist.irecv(receive, group=group, group_src=left)]
        requests.append(dist.isend(send, group=group, group_dst=right))
    COMM["calls"] += 1
    COMM["bytes"] += send.numel() * send.element_size()
    return requests


def _wait(requests: list) -> None:
    start = time.perf_counter()
    for request in requests:
        request.wait()
    COMM["seconds"] += time.perf_counter() - start


# PyTorch's CPU flash kernel, the one ``F.scaled_dot_product_attention`` runs on the CPU: the
# arithmetic of block_forward and block_backward below, tile by tile in cache rather than one
# pass over the whole block per operation, and it returns the lse, which the public function
# keeps to itself. None where this build lacks it.
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)
FUSED = True  # blocks on the CPU through that kernel; False: the arithmetic written out


def _fused(q: torch.Tensor) -> bool:
    return FUSED and q.device.type == "cpu" and _FLASH is not None and _FLASH_BACKWARD is not None


def _hidden(scores: torch.Tensor) -> torch.Tensor:
    """True above the diagonal of a square block: a key after its query."""
    n = scores.shape[-1]
    return torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)


def block_forward(q, k, v, diagonal: bool, scale: float):
    """Softmax attention of queries ``q`` over one block of keys, causal within the block when
    ``diagonal`` (queries and keys the same chunk): (output, lse per query)."""
    if _fused(q):
        return _FLASH(q, k, v, is_causal=diagonal, scale=scale)
    scores = q @ k.transpose(-2, -1) * scale  # (B, heads, rows, cols)
    if diagonal:
        scores = scores.masked_fill(_hidden(scores), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, heads, rows)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def block_backward(dout, q, k, v, out, lse, diagonal: bool, scale: float):
    """One block's share of (dq, dk, dv). ``out`` and ``lse`` are the queries' merged ones, over
    every block: ``p = exp(s - lse)`` is then this block's columns of the whole softmax, and
    ``sum_j p_ij dp_ij = dout_i . out_i`` runs over all of them."""
    if _fused(q):
        return _FLASH_BACKWARD(dout, q, k, v, out, lse, 0.0, diagonal, scale=scale)
    scores = q @ k.transpose(-2, -1) * scale
    if diagonal:
        scores = scores.masked_fill(_hidden(scores), float("-inf"))
    p = torch.exp(scores - lse.unsqueeze(-1))  # (B, heads, rows, cols)
    dp = dout @ v.transpose(-2, -1)
    ds = p * (dp - (dout * out).sum(dim=-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ dout


def _merge(out, lse, rows, block_out, block_lse) -> None:
    """Fold one block's (output, lse) into the running ones at ``rows``, in place."""
    old = lse[..., rows]
    new = torch.logaddexp(old, block_lse)
    out[..., rows, :] = (
        torch.exp(old - new).unsqueeze(-1) * out[..., rows, :]
        + torch.exp(block_lse - new).unsqueeze(-1) * block_out
    )
    lse[..., rows] = new


class _Layout(NamedTuple):
    """Where the ring runs: the group, this rank, its size, the split, and whether causal."""

    group: object
    rank: int
    cp: int
    seq_len: int
    layout: str
    causal: bool

    def plan(self, owner: int) -> tuple[split.Piece, ...]:
        return split.plan(self.seq_len, self.cp, self.rank, owner, self.layout, self.causal)


class RingAttention(torch.autograd.Function):
    """Ring attention with its backward written out (see the module's docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, positions, group, causal):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        layout = split.layout_of(positions, cp, rank)  # so every rank's positions are known
        ring = _Layout(group, rank, cp, cp * q.shape[-2], layout, causal)
        acc = torch.promote_types(q.dtype, torch.float32)  # merge in float32 (or better)
        scale = 1.0 / math.sqrt(q.shape[-1])
        qa = q.to(acc)
        out = torch.zeros_like(qa)  # (B, heads, T_local, head_dim)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # one message per hop: (2, B, heads, T_local, d)
        for step in range(cp):
            owner, requests = (rank - step) % cp, []
            if step + 1 < cp:
                with _span("forward", "post", step):
                    incoming = torch.empty_like(kv)
                    requests = _post(kv, incoming, group, rank, cp)
            with _span("forward", "block", step):
                ka, va = kv[0].to(acc), kv[1].to(acc)
                for rows, cols, diagonal in ring.plan(owner):
                    block_out, block_lse = block_forward(
                        qa[..., rows, :], ka[..., cols, :], va[..., cols, :], diagonal, scale
                    )
                    _merge(out, lse, rows, block_out, block_lse)
            if requests:
                with _span("forward", "wait", step):
                    _wait(requests)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        cp, rank, group = ring.cp, ring.rank, ring.group
        acc = out.dtype
        qa, dout = q.to(acc), grad_out.to(acc)
        dq = torch.zeros_like(qa)
        kv = torch.stack([k, v]).contiguous()
        dkv, arriving, dkv_requests = None, None, []  # the accumulator of the block held now
        for step in range(cp):
            owner, kv_requests = (rank - step) % cp, []
            if step + 1 < cp:
                with _span("backward", "post", step):
                    incoming = torch.empty_like(kv)
                    kv_requests = _post(kv, incoming, group, rank, cp)
            with _span("backward", "block", step):
                ka, va = kv[0].to(acc), kv[1].to(acc)
                mine = torch.zeros((2, *ka.shape), dtype=acc, device=q.device)  # dK, dV here
                for rows, cols, diagonal in ring.plan(owner):
                    dq_block, dk_block, dv_block = block_backward(
                        dout[..., rows, :],
                        qa[..., rows, :],
                        ka[..., cols, :],
                        va[..., cols, :],
                        out[..., rows, :],
                        lse[..., rows],
                        diagonal,
                        scale,
                    )
                    dq[..., rows, :] += dq_block
                    mine[0][..., cols, :] += dk_block
                    mine[1][..., cols, :] += dv_block
            if dkv_requests:  # the accumulator of this block, from the previous rank
                with _span("backward", "wait", step):
                    _wait(dkv_requests)
                mine += arriving
            dkv = mine
            if cp > 1:  # pass it on: the next rank adds its share (the last hop brings it home)
                with _span("backward", "post", step):
                    arriving = torch.empty_like(dkv)
                    dkv_requests = _post(dkv, arriving, group, rank, cp)
            if kv_requests:
                with _span("backward", "wait", step):
                    _wait(kv_requests)
                kv = incoming
        if dkv_requests:
            with _span("backward", "wait", cp):
                _wait(dkv_requests)
            dkv = arriving  # this rank's own keys, every rank's queries added
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, group, causal=True
) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence, by a ring of the group's ranks.
    ``q``, ``k``, ``v``: (B, heads, T_local, head_dim) for the tokens at ``positions`` (this
    rank's global positions, a zigzag or contiguous split: :mod:`.split`). Returns (B, heads,
    T_local, head_dim): what ``scaled_dot_product_attention(..., is_causal=causal)`` over the
    whole sequence gives at these positions."""
    return RingAttention.apply(q, k, v, positions, group, causal)
