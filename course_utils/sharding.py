"""Sharded data parallel (lesson 07): ZeRO-1/2/3 written by hand, then PyTorch's FSDP2, the bytes
each rank holds, and the formulas they are checked against.

Data parallel keeps a whole copy of the parameters, the gradients and the optimizer state on every
rank. ZeRO (Rajbhandari et al., 2020, arXiv:1910.02054) removes the copies: each of N ranks *owns*
1/N of every parameter (its shard) and keeps only what it needs for that shard.

- **ZeRO-1** shards the optimizer state. After backward, a ``reduce_scatter`` leaves on each rank
  the summed gradient of its shard only; the rank updates its shard (its share of momentum or Adam's
  moments is all it keeps); an ``all_gather`` of the new shards gives everyone the new parameters.
  A reduce-scatter plus an all-gather move exactly the bytes of one ring all-reduce: no extra cost.
- **ZeRO-2** shards the gradients too: each gradient is reduce-scattered the moment backward has
  produced it (a hook), and the whole gradient is dropped. Same communication as ZeRO-1.
- **ZeRO-3** shards the parameters: a layer's parameters are all-gathered just before the layer
  runs and dropped right after; backward gathers them again when it needs them. 1.5x the
  communication of DDP (an all-gather forward, one backward, a reduce-scatter), for 1/N of the state.

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, :func:`fully_sharded`) is ZeRO-3 (or 2,
with ``reshard_after_forward=False``) with parameters as sharded DTensors, prefetching of the next
layer's all-gather and gradients reduce-scattered in buckets. It is ``--parallel fsdp``.

Every optimizer the course uses (SGD with momentum, AdamW) works element by element, so updating
shards is the same arithmetic as updating whole tensors: the tests check the losses step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- the formulas ---------------------------------------------------------------------------------

# Mixed-precision Adam, as in the ZeRO paper: fp16 weights (2 bytes) and gradients (2 bytes) per
# parameter, plus K = 12 bytes of optimizer state (fp32 master weights, momentum and variance).
PARAM_BYTES, GRAD_BYTES, ADAM_STATE_BYTES = 2, 2, 12
ZERO_STAGES = {
    0: "DDP: everything replicated",
    1: "ZeRO-1: optimizer state sharded",
    2: "ZeRO-2 / FSDP SHARD_GRAD_OP: + gradients sharded",
    3: "ZeRO-3 / FSDP FULL_SHARD: + parameters sharded",
}
_SHARDED = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 1), 3: (1, 1, 1)}  # (weights, grads, optimizer)


def _stage(stage: int) -> int:
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {sorted(ZERO_STAGES)}, got {stage}")
    return stage


def memory_per_rank(
    num_params,
    world_size,
    stage: int,
    param_bytes: float = PARAM_BYTES,
    grad_bytes: float = GRAD_BYTES,
    optimizer_bytes: float = ADAM_STATE_BYTES,
):
    """Bytes of model state (weights, gradients, optimizer state) per rank under ZeRO ``stage``.

    The ZeRO paper's Figure 1: stage 0 keeps all of it on every rank; stage 1 divides the optimizer
    state by the world size N, stage 2 the gradients too, stage 3 everything. Activations and
    temporary buffers are not included. Scalars or arrays (broadcast)."""
    psi, n = np.asarray(num_params, dtype=float), np.asarray(world_size, dtype=float)
    if np.any(n < 1):
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    total = 0.0
    for part_bytes, is_sharded in zip(
        (param_bytes, grad_bytes, optimizer_bytes), _SHARDED[_stage(stage)]
    ):
        total = total + psi * part_bytes / (n if is_sharded else 1.0)
    total = np.broadcast_to(total, np.broadcast(psi, n).shape).copy()  # stage 0 ignores n
    return float(total) if total.ndim == 0 else total


def comm_per_rank(num_params, world_size, stage: int, bytes_per_value: float = 4) -> float:
    """Bytes each rank sends per step under ZeRO ``stage`` with ring collectives: an all-reduce
    (stage 0) or a reduce-scatter plus an all-gather (stages 1, 2) each send 2(N-1)/N of the
    gradients' bytes; stage 3 gathers the weights twice (forward, backward): 3(N-1)/N."""
    n = world_size
    passes = 3 if _stage(stage) == 3 else 2
    return passes * (n - 1) / n * num_params * bytes_per_value


# --- the bytes a rank holds ------------------------------------------------------------------------


def nbytes(tensor: torch.Tensor | None) -> int:
    """Bytes this rank holds for ``tensor``: its local shard for a DTensor, 0 for None."""
    if tensor is None:
        return 0
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def state_bytes(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Parameters, gradients and optimizer state this rank holds now, in bytes (measured from the
    tensors themselves: shards count as shards; gradients count when they exist)."""
    params = list(params)
    held = {
        "parameters": sum(nbytes(p) for p in params),
        "gradients": sum(nbytes(p.grad) for p in params),
        "optimizer": sum(
            nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    held["total"] = sum(held.values())
    return held


# --- ZeRO by hand ----------------------------------------------------------------------------------


class Traffic:
    """What the collectives of a :class:`ZeRO` run moved: calls and bytes each rank sent (ring
    algorithms: an all-gather or a reduce-scatter of S bytes in total sends (N-1)/N x S)."""

    def __init__(self):
        self.calls = {"all_gather": 0, "reduce_scatter": 0}
        self.bytes_sent = 0

    def add(self, kind: str, total_bytes: int, world: int) -> None:
        self.calls[kind] += 1
        self.bytes_sent += total_bytes * (world - 1) // world


class ZeRO:
    """Data parallel with sharded state, stage 1, 2 or 3, written with two collectives.

    ``model`` holds the same weights on every rank (the same seed). Each parameter is flattened,
    padded to a multiple of N, and cut into N equal shards; rank r keeps shard r as a leaf tensor
    (``self.shards``) and ``make_optimizer`` builds the optimizer over the shards only. Call
    :meth:`train_step` (it has :func:`course_utils.loop.train_step`'s signature, for ``loop.fit``)
    on each rank's slice of the global batch."""

    def __init__(self, model: nn.Module, stage: int, make_optimizer: Callable, group=None):
        self.model, self.stage, self.group = model, _stage(stage), group
        if stage == 0:
            raise ValueError("stage 0 is plain data parallel: use course_utils.ddp")
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = Traffic()
        self.owned = []  # (module, name, shape, numel, shard): every parameter of the model
        self.names = []  # their names in the model's state_dict
        for prefix, module in model.named_modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    shard = self._cut(param).requires_grad_()
                    self.owned.append((module, name, param.shape, param.numel(), shard))
                    self.names.append(f"{prefix}.{name}" if prefix else name)
        self.shards = [shard for *_, shard in self.owned]
        self.optimizer = make_optimizer(self.shards)
        if stage == 2:  # drop each whole gradient as soon as its shard is reduce-scattered
            for module, name, *_, shard in self.owned:
                module._parameters[name].register_post_accumulate_grad_hook(
                    lambda p, s=shard: self._scatter_into(p, s)
                )
        if stage == 3:
            self._shard_parameters()

    # the two collectives
    def _cut(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's 1/N of ``param``, flattened (rank r: values r*S .. (r+1)*S - 1, where
        S = ceil(numel / N); the last shards may be shorter, or empty). Stages 1 and 2 keep the
        whole parameter, so the shard is a *view* into it: the optimizer updates it in place.
        Stage 3 keeps only the shard: a copy, padded with zeros to S."""
        flat, size = param.detach().reshape(-1), math.ceil(param.numel() / self.world)
        if self.stage < 3:
            return flat[self.rank * size : (self.rank + 1) * size]
        flat = F.pad(flat, (0, size * self.world - flat.numel()))
        return flat[self.rank * size : (self.rank + 1) * size].clone()

    def gather(self, shard: torch.Tensor, shape, numel: int) -> torch.Tensor:
        """The whole tensor from every rank's shard (``all_gather``)."""
        size = math.ceil(numel / self.world)
        shard = F.pad(shard.detach(), (0, size - shard.numel()))  # equal sizes on every rank
        out = torch.empty(size * self.world, dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(out, shard, group=self.group)
        self.traffic.add("all_gather", out.numel() * out.element_size(), self.world)
        return out[:numel].view(shape)

    def scatter(self, whole_grad: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """This rank's shard of the gradient averaged over ranks (``reduce_scatter``, then / N);
        its first ``keep`` values (the length of a view shard)."""
        flat = whole_grad.reshape(-1)
        size = math.ceil(flat.numel() / self.world)
        flat = F.pad(flat, (0, size * self.world - flat.numel()))
        out = torch.empty(size, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, flat.contiguous(), group=self.group)
        self.traffic.add("reduce_scatter", flat.numel() * flat.element_size(), self.world)
        return out[:keep].div_(self.world)

    def _scatter_into(self, param: torch.Tensor, shard: torch.Tensor) -> None:
        shard.grad = self.scatter(param.grad, shard.numel())
        param.grad = None  # ZeRO-2: the whole gradient is gone; only the shard's stays

    # one step
    def train_step(self, model, optimizer, X: torch.Tensor, y: torch.Tensor):
        """Forward and backward on this rank's batch, then each rank updates its shard and the
        new parameters are gathered (stages 1, 2; stage 3 gathers them in the next forward)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        logits = self(X)
        loss = F.cross_entropy(logits, y)
        loss.backward()  # stage 2 and 3: shards' gradients are filled during backward
        if self.stage == 1:  # ZeRO-1 keeps whole gradients, and reduce-scatters them now
            for module, name, *_, shard in self.owned:
                grad = module._parameters[name].grad.view(-1)
                mine = grad[self.rank * shard.numel() :][: shard.numel()]  # the shard's part
                shard.grad = mine.copy_(self.scatter(grad, shard.numel()))
        self.optimizer.step()  # each rank updates 1/N of every parameter
        if self.stage < 3:  # every rank's updated shard, to every rank
            with torch.no_grad():
                for module, name, shape, numel, shard in self.owned:
                    module._parameters[name].copy_(self.gather(shard, shape, numel))
        return loss.detach(), (logits.argmax(dim=1) == y).sum()

    def state_bytes(self) -> dict:
        """What this rank holds now: the whole parameters (stages 1, 2; the shards are views into
        them) or only the shards (stage 3); whole gradients (stage 1) or the shards' gradients;
        its share of the optimizer state."""
        whole = [module._parameters[name] for module, name, *_ in self.owned if self.stage < 3]
        held = state_bytes(whole or self.shards, self.optimizer)
        held["gradients"] += sum(nbytes(s.grad) for s in self.shards) if self.stage == 2 else 0
        held["total"] = held["parameters"] + held["gradients"] + held["optimizer"]
        return held

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, by the model's names (a collective at stage 3)."""
        out = {}
        for full_name, (module, name, shape, numel, shard) in zip(self.names, self.owned):
            if self.stage < 3:
                out[full_name] = module._parameters[name].detach().clone()
            else:
                out[full_name] = self.gather(shard, shape, numel).clone()
        return out

    # ZeRO-3: gather a module's parameters just before it runs, drop them after
    def _shard_parameters(self) -> None:
        if any(isinstance(m, nn.RNNBase) for m in self.model.modules()):
            raise ValueError(
                "ZeRO-3 by hand swaps parameters as module attributes, and nn.RNN keeps its own "
                "list of them: use stage 1 or 2 for the RNN, or FSDP (fully_sharded)"
            )
        self._gathered: dict[int, tuple] = {}  # storage address -> shard, of the live weights
        by_module: dict[nn.Module, list] = {}
        for module, name, shape, numel, shard in self.owned:
            del module._parameters[name]  # the whole tensor is gone; the shard remains
            setattr(module, name, None)
            by_module.setdefault(module, []).append((name, shape, numel, shard))
        self._by_module = by_module
        for module in by_module:
            module.register_forward_pre_hook(self._before)
            module.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        for name, shape, numel, shard in self._by_module[module]:
            whole = _Gather.apply(shard, self, shape, numel)
            self._gathered[whole.untyped_storage().data_ptr()] = (shard, shape, numel)
            setattr(module, name, whole)

    def _after(self, module, args, output) -> None:
        for name, *_ in self._by_module[module]:
            whole = getattr(module, name)
            self._gathered.pop(whole.untyped_storage().data_ptr(), None)
            setattr(module, name, None)  # nothing keeps the whole weight: backward re-gathers

    def forward_context(self):
        """Stage 3: what autograd saves for backward is checked as it is saved: a gathered weight
        (or a view of one) is replaced by a note to gather it again, so it can be freed."""
        if self.stage < 3:
            from contextlib import nullcontext

            return nullcontext()

        def pack(tensor):
            found = self._gathered.get(tensor.untyped_storage().data_ptr())
            if found is None:
                return tensor  # an activation: kept as is
            return ("gather again", found, tensor.size(), tensor.stride(), tensor.storage_offset())

        def unpack(saved):
            if not isinstance(saved, tuple):
                return saved
            _, (shard, shape, numel), size, stride, offset = saved
            with torch.no_grad():
                return self.gather(shard, shape, numel).as_strided(size, stride, offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        with self.forward_context():
            return self.model(X)


class _Gather(torch.autograd.Function):
    """ZeRO-3's all-gather as an autograd step: forward, the whole weight from the shards;
    backward, the whole weight's gradient reduce-scattered back to this rank's shard."""

    @staticmethod
    def forward(ctx, shard, zero: ZeRO, shape, numel):
        ctx.zero = zero
        return zero.gather(shard, shape, numel)

    @staticmethod
    def backward(ctx, grad):
        return ctx.zero.scatter(grad.contiguous()), None, None, None


# --- FSDP2: PyTorch's sharded data parallel ----------------------------------------------------------


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fully_sharded` shards one by one: each is one all-gather before it runs
    (and one reduce-scatter after its backward). A transformer's blocks; otherwise the model's
    children that hold parameters. The root takes what is left (embeddings, the head)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [child for child in model.children() if any(True for _ in child.parameters())]


def fully_sharded(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """``model`` sharded in place with FSDP2 (``fully_shard``) over ``mesh`` (default: every
    rank): its parameters become DTensors, 1/N of each on each rank. ``reshard_after_forward``:
    free a unit's gathered parameters after its forward (ZeRO-3; backward gathers them again) or
    keep them until backward (ZeRO-2: less communication, more memory). FSDP2 also prefetches: it
    starts the next unit's all-gather while the current one computes."""
    from torch.distributed.fsdp import fully_shard

    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole parameters on the CPU, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in state.items()}


def role(cfg, me):
    """``--parallel fsdp``: this rank's :class:`course_utils.loop.Role` (the model sharded over
    every rank, which each read their slice of the global batch, like DDP) and a function that
    gathers the whole trained model (a collective; the model on the main rank, None elsewhere)."""
    from torch.distributed.device_mesh import init_device_mesh

    from course_utils import collectives, loop, models

    model = models.build(cfg.model, seed=cfg.seed).to(me.device)  # same weights on every rank
    fully_sharded(model, init_device_mesh(me.device.type, (me.world_size,)))
    optimizer = loop.make_optimizer(model, cfg.lr, cfg.optimizer)  # over the shards
    part = loop.Role(
        model,
        optimizer,
        model=model,
        data_rank=me.rank,
        data_world_size=me.world_size,
        reduce=collectives.all_reduce_sum,
        is_main=me.is_main,
        params=[(name, 0, param) for name, param in model.named_parameters()],
        sharded=True,  # checkpoints: torch.distributed.checkpoint, one file per rank
    )

    def trained() -> nn.Module | None:
        state = full_state_dict(model)
        if not me.is_main:
            return None
        whole = models.build(cfg.model)
        whole.load_state_dict(state)
        return whole

    return part, trained
