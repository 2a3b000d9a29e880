"""Context parallelism (lesson 10): split a long sequence over ranks, each holding some of its
tokens, and compute attention across them.

**Why.** Everything in a transformer acts on each token alone, except attention: its scores
are a (B, heads, T, T) matrix per layer, so its memory and arithmetic grow as T^2, where the
rest grows as T. At a long enough sequence the scores outgrow a device. Data parallelism does
not help (each rank still holds whole sequences) and neither does tensor parallelism (it splits
heads, and each head's T x T stays whole). Context parallelism gives each of ``cp`` ranks T/cp
tokens: the token-wise layers split for free, and attention is computed block by block, so no
rank ever holds more than a (T/cp) x (T/cp) block of scores.

**The ring** (:mod:`.ring`). Queries stay home; the key/value blocks travel from rank to rank,
and each rank folds every block into its running output with the **log-sum-exp merge**, which
gives exactly the softmax over all keys. Each block's transfer is posted before the previous
block's arithmetic and waited for after it: **overlap**. A block moves 2 B (T/cp) dim numbers
and costs about 4 B (T/cp)^2 dim operations, so the longer the sequence per rank, the more of
the transfer the arithmetic hides.

**Causal balance** (:mod:`.split`). Under a causal mask a query sees only earlier keys. Split
contiguously, the first rank's queries see one block and the last rank's see all ``cp``: the
last rank does ``cp`` times the first's arithmetic, and the step waits for it. The **zigzag**
split gives rank r chunk r and chunk 2 cp - 1 - r of 2 cp: an early chunk and a late one, the
same work on every rank.

**Ulysses** (:mod:`.ulysses`): an all-to-all turns "my tokens, every head" into "every token,
my heads", ordinary attention runs per head, and a second all-to-all turns it back. Bytes each
rank sends per layer forward, for a (B, T/cp, dim) activation:

- ring: the K and V of every other rank, ``(cp - 1) x 2 x B x T/cp x dim``;
- Ulysses: q, k, v and the output, each keeping 1/cp at home, ``4 x (cp - 1)/cp x B x T/cp x dim``.

Equal at ``cp = 2``; beyond it Ulysses sends ``cp / 2`` times less, and its bytes per rank
fall as ``cp`` grows where the ring's approach 2 B T dim. The ring wins where its transfer hides
behind the arithmetic (long blocks), where ``cp`` exceeds the number of heads (Ulysses needs
whole heads per rank), and across nodes (it only talks to neighbours, where an all-to-all
crosses every link and cannot overlap with attention, which waits for it). Large runs combine
them: Ulysses inside a node, the ring across (Fang and Zhao 2024, "USP", arXiv:2405.07719).

The room's face, like the other strategies': :func:`apply` (model, mesh) and
:func:`config_error`. A lesson that writes the ring by hand uses these names and signatures.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from course_utils import models
from course_utils.context_parallel import split
from course_utils.context_parallel.ring import ring_attention
from course_utils.context_parallel.ulysses import ulysses_attention

LAYOUTS = split.LAYOUTS
METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}


class SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward, and all-reduce (sum) of the gradient backward: the adjoint of
    a sum that every rank of the group computes and then uses for the same loss (see
    :func:`apply`)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def pool(h: torch.Tensor, group, seq_len: int) -> torch.Tensor:
    """The mean over the whole sequence of tokens split over ``group``: (B, T_local, dim) ->
    (B, dim), this rank's sum plus every other rank's, divided by ``seq_len``."""
    return SumOverGroup.apply(h.sum(dim=1), group) / seq_len


def apply(
    model: models.Transformer, mesh, layout: str = "zigzag", method: str = "ring"
) -> nn.Module:
    """Context parallel over ``mesh`` (the 1-D context-parallel ``DeviceMesh``), in place: this
    rank keeps the tokens at ``model.positions`` (``layout``: "zigzag" or "contiguous"), every
    block's attention runs over the group (``method``: "ring" or "ulysses"), and ``model.pool``
    averages the tokens over the whole group. Returns the model.

    Why the pool's all-reduce has an all-reduce (a sum) as its adjoint: every rank of the group
    ends with the same pooled vector and computes the same loss, so the group together
    differentiates the sum of ``cp`` identical losses. A parameter a rank uses for its own tokens
    gets ``cp`` times its tokens' share of the gradient (the sum of the ``cp`` losses'
    gradients, by the backward all-reduce); the head, after the pool, gets the whole gradient on
    every rank, also ``cp`` times a ``1/cp`` share. Either way the ranks' gradients add up to
    ``cp`` times one process's, and the data-parallel step, which averages over ``dp x cp``
    ranks, gives exactly one process's gradient. (With the identity as adjoint, as Megatron's
    ``g``, the token path would add up to once the gradient and the head to ``cp`` times: no
    single average fixes both.)"""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    group, rank, cp = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    held = split.positions(model.seq_len, cp, rank, layout)  # on the CPU: the ring's plan reads it
    model.positions = held.to(next(model.parameters()).device)
    model.pool = functools.partial(pool, group=group, seq_len=model.seq_len)
    attend = METHODS[method]
    for block in model.blocks:
        block.attn.attend = functools.partial(
            attend, positions=held, group=group, causal=block.attn.causal
        )
    return model


def config_error(
    model_name: str,
    cp: int,
    nproc: int,
    layout: str = "zigzag",
    method: str = "ring",
    tp: int = 1,
    **sizes,
) -> str | None:
    """The one line that says why ``--cp`` can't split this model's sequence over these ranks,
    or None. ``tp``: the tensor-parallel ranks that split each rank's heads first. The model's
    sequence length and heads come from an instance built with ``sizes`` on the meta device
    (no memory, no arithmetic)."""
    model_class = models.MODELS.get(model_name)
    if model_class is None or not issubclass(model_class, models.Transformer):
        with_attention = [n for n, c in models.MODELS.items() if issubclass(c, models.Transformer)]
        return (
            f"--model {model_name} has no attention to split over context-parallel ranks "
            f"(only {', '.join(with_attention)} have)"
        )
    if cp < 1 or nproc % cp:
        return f"--nproc {nproc} is not a multiple of the context-parallel size {cp}"
    if layout not in LAYOUTS:
        return f"the context-parallel split must be one of {', '.join(LAYOUTS)}, got {layout!r}"
    if method not in METHODS:
        return f"context-parallel attention must be one of {', '.join(METHODS)}, got {method!r}"
    with torch.device("meta"):
        model = model_class(**sizes)
    chunks = 2 * cp if layout == "zigzag" else cp
    if model.seq_len % chunks:
        return (
            f"--model {model_name}'s {model.seq_len} tokens do not divide into {chunks} equal "
            f"chunks (the {layout} split over {cp} context-parallel ranks)"
        )
    if method == "ulysses" and model.heads % (cp * tp):
        among = f"{tp} tensor- x {cp} context-parallel" if tp > 1 else f"{cp} context-parallel"
        return (
            f"--model {model_name}'s {model.heads} heads do not divide among {among} ranks "
            "(Ulysses gives each rank whole heads)"
        )
    return None
