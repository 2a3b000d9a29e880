"""DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509): context parallelism by all-to-all.

Heads never look at each other, only tokens do. So instead of passing keys around, swap the
split: one all-to-all turns "every head, my tokens" (B, heads, T/cp, d) into "my heads, every
token" (B, heads/cp, T, d); each rank then runs ordinary full attention for its heads, and the
reverse all-to-all brings every token's output home. Forward: one all-to-all for q, k and v
together, one for the output (4 tensors' worth); backward: the same two, reversed.

The gathered tokens arrive in rank order, which for the zigzag split is not sequence order: the
causal mask is built from the gathered positions, not from the tokens' indices. Each rank must
hold whole heads, so ``cp`` must divide the number of heads. :data:`COMM` counts what this
process sent (each all-to-all keeps 1/cp of its tensor at home and sends the rest).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_utils.context_parallel import split

COMM = {"calls": 0, "bytes": 0, "seconds": 0.0}  # all-to-alls of this process, bytes sent


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Part j of ``x`` (its first dimension, one part per rank) to rank j; part j of the result
    from rank j."""
    cp = dist.get_world_size(group)
    out = torch.empty_like(x)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, group=group)
    COMM["calls"] += 1
    COMM["bytes"] += x.numel() // cp * (cp - 1) * x.element_size()
    COMM["seconds"] += time.perf_counter() - start
    return out


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(*lead, heads, T/cp, d), every head of this rank's tokens -> (*lead, heads/cp, T, d),
    this rank's heads of every token (tokens in rank order)."""
    cp = dist.get_world_size(group)
    *lead, heads, t_local, d = x.shape
    n = math.prod(lead)
    send = x.reshape(n, cp, heads // cp, t_local, d).transpose(0, 1).contiguous()  # part j: heads j
    got = _all_to_all(send, group)  # (cp, n, heads/cp, T/cp, d): part j is rank j's tokens
    return got.permute(1, 2, 0, 3, 4).reshape(*lead, heads // cp, cp * t_local, d)


def heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """The reverse of :func:`seq_to_heads`: (*lead, heads/cp, T, d) -> (*lead, heads, T/cp, d)."""
    cp = dist.get_world_size(group)
    *lead, my_heads, seq_len, d = y.shape
    n, t_local = math.prod(lead), seq_len // cp
    send = y.reshape(n, my_heads, cp, t_local, d).permute(2, 0, 1, 3, 4).contiguous()
    got = _all_to_all(send, group)  # (cp, n, heads/cp, T/cp, d): part j is rank j's heads
    return got.transpose(0, 1).reshape(*lead, cp * my_heads, t_local, d)


class SeqToHeads(torch.autograd.Function):
    """:func:`seq_to_heads` forward; its adjoint, :func:`heads_to_seq` of the gradient, backward
    (an all-to-all only moves numbers, so its adjoint moves them back)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    """:func:`heads_to_seq` forward, :func:`seq_to_heads` of the gradient backward."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, ctx.group), None


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, group, causal=True
) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence, by two all-to-alls over the
    group. ``q``, ``k``, ``v``: (B, heads, T_local, head_dim) for the tokens at ``positions``
    (a zigzag or contiguous split: :mod:`.split`). Returns (B, heads, T_local, head_dim), what
    ``scaled_dot_product_attention(..., is_causal=causal)`` over the whole sequence gives at
    these positions."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    if q.shape[1] % cp:
        raise ValueError(
            f"{q.shape[1]} heads do not divide among {cp} context-parallel ranks "
            "(Ulysses gives each rank whole heads)"
        )
    layout = split.layout_of(positions, cp, rank)
    seq_len = cp * q.shape[-2]
    q, k, v = SeqToHeads.apply(torch.stack([q, k, v]), group)  # each (B, heads/cp, T, d)
    mask = None
    if causal:  # the gathered tokens in rank order: the mask follows their positions
        held = [split.positions(seq_len, cp, r, layout) for r in range(cp)]
        gathered = torch.cat(held).to(q.device)
        mask = gathered[:, None] >= gathered[None, :]  # (T, T): True where the key is visible
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return HeadsToSeq.apply(y, group)
