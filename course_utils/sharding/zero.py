"""ZeRO-1, 2 and 3 written by hand with two collectives (lesson 08): ``reduce_scatter`` of the
gradients, each rank updating its shard, ``all_gather`` of the parameters; ZeRO-3 gathers a module's
weights just before it runs and again in backward (autograd's saved-tensor hooks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from course_utils.sharding.formulas import _stage, nbytes, state_bytes

# PyTorch 2.13 renamed the two single-tensor collectives (the old names warn); older versions
# have only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# --- ZeRO-1 by hand, as lesson 08 writes it --------------------------------------------------------


def padded(flat: torch.Tensor, size: int) -> torch.Tensor:
    """``flat`` with zeros appended up to ``size`` values: the collectives want equal pieces."""
    return F.pad(flat, (0, size - flat.numel()))


def shard_of(param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``rank``'s 1/N of ``param``, flattened: values r*S .. (r+1)*S - 1, S = ceil(numel / N)
    (shorter at the end, or empty). A view into the parameter: updating the shard in place
    updates the parameter."""
    size = math.ceil(param.numel() / world_size)
    return param.detach().reshape(-1)[rank * size : (rank + 1) * size]  # (S,)


def zero1_step(model: nn.Module, optimizer, X: torch.Tensor, y: torch.Tensor, shards: list):
    """One ZeRO-1 step on this rank's slice (X, y) of the global batch: backward as in DDP, a
    reduce-scatter of each gradient into its shard's ``.grad`` (averaged), the optimizer over the
    shards (:func:`shard_of`), an all-gather of the new shards into the parameters. The same
    arithmetic as :meth:`ZeRO.train_step` at stage 1, with :func:`course_utils.loop.train_step`'s
    signature plus ``shards``."""
    world_size = dist.get_world_size()
    optimizer.zero_grad(set_to_none=True)  # the shards' gradients
    model.zero_grad(set_to_none=True)  # the whole gradients
    logits = model(X)  # (B / N, classes)
    loss = F.cross_entropy(logits, y)
    loss.backward()  # whole gradients of this rank's slice, as in DDP
    for param, shard in zip(model.parameters(), shards):
        size = math.ceil(param.numel() / world_size)
        mine = torch.empty(size, dtype=param.dtype, device=param.device)  # (S,)
        _reduce_scatter(mine, padded(param.grad.reshape(-1), size * world_size))
        shard.grad = mine[: shard.numel()] / world_size  # the global batch's gradient, my piece
    optimizer.step()  # the shards only: its state is 1/N of the model's
    with torch.no_grad():
        for param, shard in zip(model.parameters(), shards):
            size = math.ceil(param.numel() / world_size)
            whole = torch.empty(size * world_size, dtype=param.dtype, device=param.device)
            _all_gather(whole, padded(shard, size))  # every rank's new piece, (N * S,)
            param.copy_(whole[: param.numel()].view_as(param))
    return loss.detach(), (logits.argmax(dim=1) == y).sum()


# --- ZeRO by hand, stages 1 to 3 -------------------------------------------------------------------


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
        if self.stage < 3:
            return shard_of(param, self.rank, self.world)
        size = math.ceil(param.numel() / self.world)
        flat = padded(param.detach().reshape(-1), size * self.world)
        return flat[self.rank * size : (self.rank + 1) * size].clone()

    def gather(self, shard: torch.Tensor, shape, numel: int) -> torch.Tensor:
        """The whole tensor from every rank's shard (``all_gather``)."""
        size = math.ceil(numel / self.world)
        shard = F.pad(shard.detach(), (0, size - shard.numel()))  # equal sizes on every rank
        out = torch.empty(size * self.world, dtype=shard.dtype, device=shard.device)
        _all_gather(out, shard, group=self.group)
        self.traffic.add("all_gather", out.numel() * out.element_size(), self.world)
        return out[:numel].view(shape)

    def scatter(self, whole_grad: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """This rank's shard of the gradient averaged over ranks (``reduce_scatter``, then / N);
        its first ``keep`` values (the length of a view shard)."""
        flat = whole_grad.reshape(-1)
        size = math.ceil(flat.numel() / self.world)
        flat = F.pad(flat, (0, size * self.world - flat.numel()))
        out = torch.empty(size, dtype=flat.dtype, device=flat.device)
        _reduce_scatter(out, flat.contiguous(), group=self.group)
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
        with record_function("forward"):
            logits = self(X)
            loss = F.cross_entropy(logits, y)
        with record_function("backward"):
            loss.backward()  # stage 2 and 3: shards' gradients are filled during backward
        if self.stage == 1:  # ZeRO-1 keeps whole gradients, and reduce-scatters them now
            for module, name, *_, shard in self.owned:
                grad = module._parameters[name].grad.view(-1)
                start = self.rank * math.ceil(grad.numel() / self.world)  # where the shard starts
                mine = grad[start : start + shard.numel()]  # the shard's part
                shard.grad = mine.copy_(self.scatter(grad, shard.numel()))
        with record_function("optimizer"):
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
