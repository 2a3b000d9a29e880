"""Tensor parallelism (lesson 09): split the layers themselves, so that each rank holds a slice of
every weight matrix and computes a slice of every product.

Megatron-LM's recipe (Shoeybi et al. 2019, arXiv:1909.08053) for a transformer block:

- an MLP is ``fc2(gelu(fc1(x)))``. Split ``fc1`` by output columns (**column parallel**: rank r
  computes hidden units r*H/T .. (r+1)*H/T, GELU acts on each unit alone) and ``fc2`` by input rows
  (**row parallel**: rank r multiplies its hidden units by its rows of ``fc2``, giving a partial
  sum of the output). One all-reduce adds the partial sums.
- attention splits the same way, by heads: q, k, v column parallel (each rank computes some heads,
  whole), the output projection row parallel, one all-reduce.

Two conjugate operators make the gradients right: ``f`` (:class:`CopyToParallel`) is the identity
going forward and an all-reduce going backward (every rank used the whole input, so its gradient is
the sum of every rank's part); ``g`` (:class:`ReduceFromParallel`) is an all-reduce going forward
and the identity going backward. Per block and step: 2 all-reduces forward, 2 backward, each of the
activations' size, B x T x dim numbers: communication grows with the activations, computation with
dim squared, so tensor parallelism pays for wide layers on fast links (inside one node).

Then the same with PyTorch's DTensor: :func:`plan` for ``parallelize_module``
(``ColwiseParallel``, ``RowwiseParallel``, and ``SequenceParallel`` for the norms) on a
``DeviceMesh``: :func:`apply`, the room's face (:mod:`course_utils.parallelize` lays out the mesh,
1-D or data x tensor parallel, and applies the axes in order). Lesson 09 writes the operators, the
layers and the blocks by hand under these names and signatures;
``tests/test_tensor_parallel_figures.py`` checks that they give the same outputs and gradients.
:mod:`course_utils.tp_timing` measures steps split and whole, for the lesson's sweep.
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_utils import models

# --- by hand: Megatron's two operators and the two split linear layers ------------------------

COMM = {"calls": 0, "bytes": 0, "seconds": 0.0}  # all-reduces of f and g in this process


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    start = time.perf_counter()
    dist.all_reduce(x, group=group)
    COMM["calls"] += 1
    COMM["bytes"] += x.numel() * x.element_size()
    COMM["seconds"] += time.perf_counter() - start
    return x


class CopyToParallel(torch.autograd.Function):
    """Megatron's ``f``: identity forward; all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # a copy: autograd may hand the same gradient to other branches
        return _all_reduce(grad.contiguous().clone(), ctx.group), None


class ReduceFromParallel(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward (sum the partial products); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """Rank ``rank``'s share of ``linear``'s output features (rows of its weight): (in) -> (out/T)."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int):
        super().__init__()
        rows = block_of(linear.out_features, rank, world_size)
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())  # (out/T, in)
        self.bias = nn.Parameter(linear.bias.detach()[rows].clone())  # (out/T,)
        self.split = {"weight": 0, "bias": 0}  # the dimension each parameter is cut along

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Rank ``rank``'s share of ``linear``'s input features (columns of its weight): (in/T) -> a
    partial (out); ``g`` sums the partials, then the bias is added once."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int, group=None):
        super().__init__()
        cols = block_of(linear.in_features, rank, world_size)
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())  # (out, in/T)
        self.bias = nn.Parameter(linear.bias.detach().clone())  # whole, on every rank
        self.group = group
        self.split = {"weight": 1}  # the bias is whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ReduceFromParallel.apply(F.linear(x, self.weight), self.group) + self.bias


def block_of(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s block of ``n`` features: ``rank * n / N`` .. ``(rank + 1) * n / N``."""
    if n % world_size:
        raise ValueError(f"{n} features do not divide among {world_size} ranks")
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


class ParallelMLP(nn.Module):
    """``f`` -> fc1 column parallel -> GELU -> fc2 row parallel (``g`` inside): one all-reduce
    forward, one backward."""

    def __init__(self, mlp: models.MLP, rank: int, world_size: int, group=None):
        super().__init__()
        self.group = group
        self.fc1 = ColumnParallelLinear(mlp.fc1, rank, world_size)
        self.fc2 = RowParallelLinear(mlp.fc2, rank, world_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = CopyToParallel.apply(x, self.group)
        return self.fc2(F.gelu(self.fc1(x)))  # (B, T, hidden / world_size) in between


class ParallelAttention(nn.Module):
    """Attention split by heads: q, k, v column parallel (this rank's heads, whole), the output
    projection row parallel. The heads never talk to each other, so nothing else is sent."""

    def __init__(self, attn: models.Attention, rank: int, world_size: int, group=None):
        super().__init__()
        self.group, self.head_dim = group, attn.head_dim
        self.q, self.k, self.v = (
            ColumnParallelLinear(layer, rank, world_size) for layer in (attn.q, attn.k, attn.v)
        )
        self.out = RowParallelLinear(attn.out, rank, world_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = CopyToParallel.apply(x, self.group)
        q, k, v = (
            f(x).view(B, T, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads / world_size, T, head_dim)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


def parallelize_by_hand(model: models.Transformer, group=None) -> models.Transformer:
    """Replace every block's attention and MLP by this rank's tensor-parallel share (in place).
    The embedding, the norms and the head stay whole on every rank (they are small)."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if model.heads % world_size:
        raise ValueError(f"{model.heads} heads do not divide among {world_size} ranks")
    for block in model.blocks:
        block.attn = ParallelAttention(block.attn, rank, world_size, group)
        block.mlp = ParallelMLP(block.mlp, rank, world_size, group)
    return model


def gather_by_hand(model: nn.Module, group=None, grads: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's parameters (or gradients) on every rank: each split one all-gathered
    and joined along the dimension it was cut along (a collective: every rank calls it)."""
    world_size = dist.get_world_size(group)
    out = {}
    for name, param in model.named_parameters():
        tensor = (param.grad if grads else param).detach().contiguous()
        owner, _, local = name.rpartition(".")
        dim = getattr(model.get_submodule(owner), "split", {}).get(local)
        if dim is None:  # whole on every rank
            out[name] = tensor.clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor, group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


# --- with DTensor: the plan, applied to a mesh ---------------------------------------------------


def plan(model: models.Transformer, sequence_parallel: bool = False) -> dict:
    """``parallelize_module``'s plan for the course's transformer: Megatron's split of every
    block; with ``sequence_parallel``, the norms (and the residual stream between blocks) split
    along the sequence, so that each rank normalises only its tokens (Korthikanti et al. 2022,
    arXiv:2205.05198): the all-reduces become reduce-scatters and all-gathers, same bytes.

    With ``sequence_parallel``, each rank's norm weights and biases see only its tokens: their
    gradients are partial sums, ``Partial(sum)`` DTensors, that must be all-reduced over the
    tensor-parallel group. DTensor's optimizer step does it (one all-reduce per norm parameter);
    code that reads ``grad.to_local()`` must all-reduce them itself, as Megatron-LM does."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    out = Shard(1) if sequence_parallel else Replicate()
    layout = {}
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        layout |= {f"{b}.attn.{x}": ColwiseParallel() for x in ("q", "k", "v")}
        layout |= {f"{b}.mlp.fc1": ColwiseParallel()}
        layout |= {f"{b}.attn.out": RowwiseParallel(output_layouts=out)}
        layout |= {f"{b}.mlp.fc2": RowwiseParallel(output_layouts=out)}
        if sequence_parallel:
            gather = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
            layout |= {f"{b}.norm1": SequenceParallel(), f"{b}.norm2": SequenceParallel()}
            layout |= {f"{b}.attn": gather, f"{b}.mlp": gather}
    if sequence_parallel:  # the residual stream enters sharded by tokens, leaves whole
        layout["blocks.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
        layout["norm"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    return layout


PLANNED = ("transformer", "pixels")  # the models :func:`plan` splits: blocks of Attention and MLP


def config_error(model_name: str, tp: int, nproc: int, **sizes) -> str | None:
    """The one line that says why ``--tp`` can't split this model over these ranks, or None."""
    if model_name not in PLANNED:
        return (
            f"--model {model_name} has no tensor-parallel plan (only {' and '.join(PLANNED)} have)"
        )
    if tp < 1 or nproc % tp:
        return f"--nproc {nproc} is not a multiple of the tensor-parallel size {tp}"
    defaults = inspect.signature(models.MODELS[model_name]).parameters  # its sizes, by name
    dim, heads, hidden = (sizes.get(k, defaults[k].default) for k in ("dim", "heads", "hidden"))
    for what, n in (("heads", heads), ("width", dim), ("MLP width", hidden)):
        if n % tp:
            return (
                f"the transformer's {what} ({n}) does not divide among {tp} tensor-parallel ranks"
            )
    return None


def apply(model: models.Transformer, mesh, sequence_parallel: bool = False) -> nn.Module:
    """Tensor parallel, the composing module's step 1 (:mod:`course_utils.parallelize`):
    ``model`` split in place over ``mesh`` (its tensor-parallel ranks) by :func:`plan`, each rank
    keeping its slices of every block's attention and MLP as DTensors."""
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(model, mesh, plan(model, sequence_parallel))
