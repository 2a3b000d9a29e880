"""Cutting the course's models into pipeline stages, and balancing the stages by measured time.

A model is first cut into *units*, the smallest pieces a stage can hold, each a module that takes
one tensor and returns one tensor (what travels between stages):

- CNN: ``conv1 block | conv2 ch 0-15 + pool | conv2 ch 16-63 + pool | fc``. ``conv2`` has ~94%
  of the CNN's multiply-adds, so cutting only between layers could never give two balanced
  stages; its output channels are independent, so it is cut in two slices of channels, each on
  its own unit. The first slice passes its input along with its (pooled) result, so that the
  second can compute its own channels (same arithmetic as the whole layer). The cut is after
  :data:`CONV2_CUT` channels, not half-way: the first stage also holds conv1's block, whose
  single-channel convolution and 28 x 28 pooling cost a CPU far more than their arithmetic.
- RNN: ``nn.RNN | fc``. The recurrent layer is one layer deep and its 28 time steps share one set
  of weights, so there is no honest cut inside it: two stages, very unbalanced (see lesson 06).
- Transformer: ``tokens | block 0 | ... | block 3 | norm + head``: identical blocks, the case
  pipelines are made for (the tokens and the head are small, and go with the first and last).

Every rank builds the full model from the same seed and keeps its own stage's units; parameters
keep their full-model names (``origin``), so gradients and weights can be put back together.
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_utils import data, loop, models
from course_utils.pipeline.schedules import Event, simulate


class CNNBlock1(nn.Module):
    """conv1 + ReLU + pool: (B, 1, 28, 28) -> (B, 32, 14, 14)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv1, self.pool = model.conv1, model.pool  # shared with the full model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.conv1(x)))


class Conv2Slice(nn.Module):
    """Output channels ``lo:hi`` of the CNN's conv2, with their ReLU and pool (both act on each
    channel alone, so pooling each slice's channels gives the pooled layer's channels).

    What travels between slices is one flat tensor per sample: conv2's input (32 x 14 x 14)
    followed by the pooled channels computed so far (``lo`` x 7 x 7). The first slice takes the
    input as an image, (B, 32, 14, 14); the last returns the pooled 64 channels, flat: (B, 3136).
    Each slice pools its own channels before sending them, so a boundary carries 7 x 7 maps, not
    14 x 14 ones, and the stages share the pooling."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        super().__init__()
        conv = model.conv2
        self.in_channels, self.lo, self.last = conv.in_channels, lo, hi == conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach()[lo:hi].clone())  # (hi-lo, 32, 5, 5)
        self.bias = nn.Parameter(conv.bias.detach()[lo:hi].clone())
        self.padding, self.pool = conv.padding, model.pool
        self.origin = {"weight": ("conv2.weight", lo), "bias": ("conv2.bias", lo)}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.lo == 0:  # conv2's input, (B, 32, 14, 14)
            x, done = z, None
        else:  # flat: the input's 32 x 14 x 14 values, then lo pooled 7 x 7 maps
            size = z.size(1) - self.lo * 7 * 7
            flat, done = torch.split(z, [size, z.size(1) - size], dim=1)
            x = flat.view(z.size(0), self.in_channels, 14, 14)
        new = F.conv2d(x, self.weight, self.bias, padding=self.padding)  # (B, hi - lo, 14, 14)
        new = self.pool(F.relu(new)).flatten(1)  # (B, (hi - lo) x 7 x 7)
        out = new if done is None else torch.cat([done, new], dim=1)  # (B, hi x 7 x 7)
        return out if self.last else torch.cat([x.flatten(1), out], dim=1)


class RNNBody(nn.Module):
    """The recurrent layer, keeping the last time step: (B, T, 28) -> (B, hidden_size)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.rnn, self.hidden_size = model.rnn, model.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.zeros(self.rnn.num_layers, x.size(0), self.hidden_size, device=x.device)
        out, _ = self.rnn(x, h0)  # (B, T, hidden_size)
        return out[:, -1, :]


class Head(nn.Module):
    """The output layer: flatten, then fc: (B, ...) -> (B, 10) logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.fc = model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Tokens(nn.Module):
    """The transformer's patches, embedded, with their positions: (B, 1, 28, 28) -> (B, T, dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = [model]  # a list: not registered, its parameters are listed below
        self.embed, self.pos = model.embed, model.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[0].tokens(x)


class TransformerBlock(nn.Module):
    """Block ``i`` of the transformer: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, model: nn.Module, i: int):
        super().__init__()
        self.block = model.blocks[i]
        self.origin = {n: (f"blocks.{i}.{n[6:]}", 0) for n, _ in self.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class TransformerHead(nn.Module):
    """The final norm, the mean over tokens, the linear head: (B, T, dim) -> (B, 10)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).mean(dim=1))


# conv2's output channels on the first of its two units. Measured with one thread per stage
# (lesson 06 times the cuts 16, 32 and 48): conv1's block costs about a third of the CNN's step,
# so the stage that holds it takes fewer of conv2's channels; and CPU convolution kernels work
# on blocks of 16 channels (8 without AVX-512), so a cut in between (24, say) costs more than
# either neighbour. After 16 channels the 2 stages came out within 10-16% of each other.
CONV2_CUT = 16


def units(name: str, model: nn.Module) -> list[nn.Module]:
    """The smallest pieces ``model`` (``"cnn"``, ``"rnn"`` or ``"transformer"``) can be cut into,
    in order. The CNN's conv2 is cut after :data:`CONV2_CUT` output channels."""
    if name == "cnn":
        n = model.conv2.out_channels
        return [
            CNNBlock1(model),
            Conv2Slice(model, 0, CONV2_CUT),
            Conv2Slice(model, CONV2_CUT, n),
            Head(model),
        ]
    if name == "rnn":
        return [RNNBody(model), Head(model)]
    if name == "transformer":
        blocks = [TransformerBlock(model, i) for i in range(len(model.blocks))]
        return [Tokens(model), *blocks, TransformerHead(model)]
    raise ValueError(f"unknown model {name!r}")


def unit_names(name: str, depth: int = 4) -> list[str]:
    """Names of the units of :func:`units`, for printing."""
    if name == "cnn":
        cut = CONV2_CUT
        return ["conv1 block", f"conv2 ch 0-{cut - 1} + pool", f"conv2 ch {cut}-63 + pool", "fc"]
    if name == "transformer":
        return ["tokens", *(f"block {i}" for i in range(depth)), "norm + head"]
    return ["nn.RNN", "fc"]


UNIT_NAMES = {name: unit_names(name) for name in ("cnn", "rnn", "transformer")}


def max_stages(name: str) -> int:
    """How many pipeline stages ``name`` can be cut into (one unit each)."""
    return len(UNIT_NAMES[name])


def balance(costs: list[float], num_stages: int) -> list[int]:
    """Units per stage (contiguous, each at least one) minimising the slowest stage's cost."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"{n} units can't make {num_stages} stages")
    best = None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *cuts, n]
        slowest = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        if best is None or slowest < best[0]:
            best = (slowest, [b - a for a, b in itertools.pairwise(bounds)])
    return best[1]


def plan(costs: list[tuple[float, float]], num_stages: int) -> list[int]:
    """Units per stage from per-unit (forward, backward) costs: :func:`balance` of their sums.
    (Where the CNN's conv2 is cut between its two units is fixed: :data:`CONV2_CUT`.)"""
    return balance([f + b for f, b in costs], num_stages)


def split(name: str, model: nn.Module, sizes: list[int]) -> list[nn.Sequential]:
    """The stages: ``sizes[s]`` consecutive units each (see :func:`balance` and :func:`plan`)."""
    pieces = units(name, model)
    if sum(sizes) != len(pieces) or min(sizes) < 1:
        raise ValueError(f"sizes {sizes} do not cover the {len(pieces)} units of the {name}")
    bounds = [0, *itertools.accumulate(sizes)]
    return [nn.Sequential(*pieces[a:b]) for a, b in itertools.pairwise(bounds)]


def even_sizes(name: str, num_stages: int) -> list[int]:
    """A split that needs no measurement: units dealt out as evenly as their count allows."""
    n = max_stages(name)
    return [n // num_stages + (s < n % num_stages) for s in range(num_stages)]


def unit_costs(
    pieces: list[nn.Module], X: torch.Tensor, y: torch.Tensor, repeats: int = 3
) -> list[tuple[float, float]]:
    """Measured seconds of (forward, backward) of each unit on the batch ``(X, y)``, each the
    median of ``repeats`` after one warm-up. Gradients it leaves behind are cleared."""
    runs = []  # one list of (forward, backward) per repeat
    for _ in range(repeats + 1):
        inputs, outputs, times, h = [], [], [], X
        for k, unit in enumerate(pieces):
            h_in = h.detach().requires_grad_(k > 0)  # as a stage receives it
            start = time.perf_counter()
            h = unit(h_in)
            times.append([time.perf_counter() - start, 0.0])
            inputs.append(h_in)
            outputs.append(h)
        grad = None
        for k in reversed(range(len(pieces))):
            start = time.perf_counter()
            if k == len(pieces) - 1:
                F.cross_entropy(outputs[k], y).backward()
            else:
                outputs[k].backward(grad)
            times[k][1] = time.perf_counter() - start
            grad = inputs[k].grad
        runs.append(times)
    for unit in pieces:
        unit.zero_grad(set_to_none=True)
    runs = runs[1:]  # the first was a warm-up
    return [
        tuple(statistics.median(run[k][j] for run in runs) for j in range(2))
        for k in range(len(pieces))
    ]


def stage_costs(
    costs: list[tuple[float, float]], sizes: list[int]
) -> tuple[list[float], list[float]]:
    """Per-stage (forwards, backwards) from per-unit costs and the units per stage."""
    bounds = [0, *itertools.accumulate(sizes)]
    fwd = [sum(c[0] for c in costs[a:b]) for a, b in itertools.pairwise(bounds)]
    bwd = [sum(c[1] for c in costs[a:b]) for a, b in itertools.pairwise(bounds)]
    return fwd, bwd


def measured_unit_costs(
    name: str, microbatch_size: int, threads: int = 1, repeats: int = 2, seed: int = 0
) -> list[tuple[float, float]]:
    """:func:`unit_costs` of ``name``'s units on a microbatch of the training set, measured in
    this process with ``threads`` torch threads (as one stage would run)."""
    X, y = data.mnist("train", limit=microbatch_size)
    pieces = units(name, models.build(name, seed=seed))
    with loop.num_threads(threads):
        return unit_costs(pieces, models.prepare_input(name, X), y, repeats=repeats)


def simulate_plan(
    costs: list[tuple[float, float]], schedule: str, num_stages: int, num_microbatches: int
) -> list[Event]:
    """The step a real run would take, on paper: stages planned from per-unit costs as
    :func:`plan` plans them, then the schedule simulated with those stages' costs."""
    forward, backward = stage_costs(costs, plan(costs, num_stages))
    return simulate(schedule, num_stages, num_microbatches, forward, backward)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps from ``module(x)`` until its backward, parameters excluded: the
    activations one microbatch holds on this stage while it is in flight."""
    params = {p.data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_())
    return sum(storages.values())


def boundary_shapes(stages: list[nn.Module], sample: torch.Tensor) -> list[tuple[int, ...]]:
    """Shape of one sample's output of each stage (what it sends on), from a 1-sample forward."""
    shapes, h = [], sample[:1]
    with torch.no_grad():
        for stage in stages:
            h = stage(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes


def param_origins(stage: nn.Module) -> list[tuple[str, int, nn.Parameter]]:
    """Each parameter of a stage with its place in the whole model: (full-model name, first row,
    parameter). A slice of conv2 starts at its first output channel; other units hold whole
    layers, named as in the full model."""
    found = []
    for unit in _leaves(stage):
        origin = getattr(unit, "origin", {})
        for local, param in unit.named_parameters():
            full, row = origin.get(local, (local, 0))
            found.append((full, row, param))
    return found


def full_pieces(stage: nn.Module, grads: bool = False) -> list[tuple[str, int, torch.Tensor]]:
    """This stage's parameters (or gradients) as (full-model name, first row, tensor): what
    :func:`course_utils.checkpoint.assemble` joins, gathered from every stage, into whole tensors."""
    pieces = []
    for full, row, param in param_origins(stage):
        tensor = param.grad if grads else param.data
        if tensor is not None:
            pieces.append((full, row, tensor.detach().cpu().clone()))
    return pieces


def _leaves(module: nn.Module):
    """The units inside nested Sequential/ModuleList containers (a stage, or a rank's stages)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        for child in module.children():
            yield from _leaves(child)
    else:
        yield module
