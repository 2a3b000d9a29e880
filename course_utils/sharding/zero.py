"""ZeRO-1, 2 and 3 written by hand with two collectives (lesson 08): ``reduce_scatter`` of the
gradients, each rank updating its shard, ``all_gather`` of the parameters; ZeRO-3 gathers a module's
weights just before it runs and again in backward (autograd's saved-tensor hooks).

One small base, :class:`ZeRO` (the shards, the two collectives, the step), and one class per stage
that says what it keeps whole and when it communicates: :class:`ZeRO1`, :class:`ZeRO2` (ZeRO-1
whose reduce-scatters run during backward), :class:`ZeRO3`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from course_utils.sharding.state import nbytes, state_bytes

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
    arithmetic as :class:`ZeRO1`'s step, with :func:`course_utils.loop.train_step`'s
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
    """Data parallel with sharded state, written with two collectives: what every stage shares.

    ``model`` holds the same weights on every rank (the same seed). Each parameter is flattened
    and cut into N pieces of S = ceil(numel / N) values; rank r keeps piece r, its *shard*
    (:meth:`cut`: a view or a copy, by stage), as a leaf tensor in ``self.shards``, and
    ``make_optimizer`` builds the optimizer over the shards only. :meth:`train_step` has
    :func:`course_utils.loop.train_step`'s signature (for ``loop.fit``): call it on each rank's
    slice of the global batch. The stages are the subclasses :class:`ZeRO1`, :class:`ZeRO2` and
    :class:`ZeRO3`: each says what it keeps whole (:meth:`cut`) and when it communicates
    (:meth:`after_backward`, :meth:`after_step`, or hooks that run during the step)."""

    stage = 0  # which ZeRO stage a subclass is

    def __init__(self, model: nn.Module, make_optimizer: Callable, group=None):
        self.model, self.group = model, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = Traffic()
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]  # the model's state_dict names
        self.shards = [self.cut(param).requires_grad_() for _, param in named]
        self.optimizer = make_optimizer(self.shards)

    def cut(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``param`` (each stage decides: a view, or a copy)."""
        raise NotImplementedError

    # the two collectives
    def gather(self, shard: torch.Tensor, shape, numel: int) -> torch.Tensor:
        """The whole tensor from every rank's shard (``all_gather``)."""
        size = math.ceil(numel / self.world)
        shard = padded(shard.detach(), size)  # equal sizes on every rank
        out = torch.empty(size * self.world, dtype=shard.dtype, device=shard.device)
        _all_gather(out, shard, group=self.group)
        self.traffic.add("all_gather", out.numel() * out.element_size(), self.world)
        return out[:numel].view(shape)

    def scatter(self, whole_grad: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """This rank's shard of the gradient averaged over ranks (``reduce_scatter``, then / N);
        its first ``keep`` values (the length of a shard that is a view)."""
        flat = whole_grad.reshape(-1)
        size = math.ceil(flat.numel() / self.world)
        flat = padded(flat, size * self.world)
        out = torch.empty(size, dtype=flat.dtype, device=flat.device)
        _reduce_scatter(out, flat.contiguous(), group=self.group)
        self.traffic.add("reduce_scatter", flat.numel() * flat.element_size(), self.world)
        return out[:keep].div_(self.world)

    # one step
    def train_step(self, model, optimizer, X: torch.Tensor, y: torch.Tensor):
        """Forward and backward on this rank's batch, the stage's communication, and each rank
        updating its shard of every parameter."""
        self.optimizer.zero_grad(set_to_none=True)  # the shards' gradients
        self.model.zero_grad(set_to_none=True)  # the whole gradients (stages 1, 2)
        with record_function("forward"):
            logits = self(X)
            loss = F.cross_entropy(logits, y)
        with record_function("backward"):
            loss.backward()  # ZeRO-2, 3: the shards' gradients are filled during backward
        self.after_backward()  # ZeRO-1: reduce-scatter the whole gradients now
        with record_function("optimizer"):
            self.optimizer.step()  # each rank updates 1/N of every parameter
        self.after_step()  # ZeRO-1, 2: all-gather the new parameters
        return loss.detach(), (logits.argmax(dim=1) == y).sum()

    def after_backward(self) -> None:
        """What the stage does once backward is done (nothing, unless it says otherwise)."""

    def after_step(self) -> None:
        """What the stage does once the optimizer has stepped (nothing, unless it says so)."""

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return self.model(X)


class ZeRO1(ZeRO):
    """ZeRO-1: the optimizer state sharded. Every rank keeps the whole parameters and gradients;
    a shard is a *view* into its parameter, so the optimizer, updating the shard in place,
    updates the parameter. After backward each gradient is reduce-scattered into its shard's
    ``.grad``; after the step every rank's new shard is all-gathered into the parameters."""

    stage = 1

    def __init__(self, model: nn.Module, make_optimizer: Callable, group=None):
        super().__init__(model, make_optimizer, group)
        self.params = list(model.parameters())  # whole, in the order of self.shards

    def cut(self, param: torch.Tensor) -> torch.Tensor:
        return shard_of(param, self.rank, self.world)

    def after_backward(self) -> None:
        for param, shard in zip(self.params, self.shards):
            grad = param.grad.view(-1)
            start = self.rank * math.ceil(grad.numel() / self.world)  # where the shard starts
            mine = grad[start : start + shard.numel()]  # the shard's part of the whole gradient
            shard.grad = mine.copy_(self.scatter(grad, shard.numel()))

    def after_step(self) -> None:
        with torch.no_grad():
            for param, shard in zip(self.params, self.shards):
                param.copy_(self.gather(shard, param.shape, param.numel()))

    def state_bytes(self) -> dict:
        """What this rank holds now: the whole parameters and gradients (the shards are views
        into them) and its share of the optimizer state."""
        return state_bytes(self.params, self.optimizer)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, by the model's names."""
        return {name: param.detach().clone() for name, param in zip(self.names, self.params)}


class ZeRO2(ZeRO1):
    """ZeRO-2: the gradients sharded too. ZeRO-1, except that each whole gradient is
    reduce-scattered the moment backward has produced it (a hook), then dropped: backward never
    holds more than a few whole gradients at once."""

    stage = 2

    def __init__(self, model: nn.Module, make_optimizer: Callable, group=None):
        super().__init__(model, make_optimizer, group)
        for param, shard in zip(self.params, self.shards):
            param.register_post_accumulate_grad_hook(lambda p, s=shard: self.scatter_into(p, s))

    def scatter_into(self, param: torch.Tensor, shard: torch.Tensor) -> None:
        shard.grad = self.scatter(param.grad, shard.numel())
        param.grad = None  # the whole gradient is gone; only the shard's stays

    def after_backward(self) -> None:
        pass  # the hooks reduce-scattered every gradient during backward

    def state_bytes(self) -> dict:
        """ZeRO-1's bytes, with the shards' gradients in place of the whole ones."""
        held = super().state_bytes()
        held["gradients"] += sum(nbytes(shard.grad) for shard in self.shards)
        held["total"] = held["parameters"] + held["gradients"] + held["optimizer"]
        return held


class ZeRO3(ZeRO):
    """ZeRO-3: the parameters sharded too; only the shards stay. A module's weights are gathered
    just before it runs and dropped right after (:meth:`_before`, :meth:`_after`: forward hooks);
    backward gathers again the ones it saved (:meth:`forward_context`); and the all-gather is an
    autograd step whose backward reduce-scatters the gradient to the shard (:class:`_Gather`)."""

    stage = 3

    def __init__(self, model: nn.Module, make_optimizer: Callable, group=None):
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            raise ValueError(
                "ZeRO-3 by hand swaps parameters as module attributes, and nn.RNN keeps its own "
                "list of them: use stage 1 or 2 for the RNN, or FSDP (fully_sharded)"
            )
        super().__init__(model, make_optimizer, group)
        self._gathered: dict[int, tuple] = {}  # storage address -> shard, of the live weights
        self._by_module: dict[nn.Module, list] = {}  # module -> (name, shape, numel, shard)
        self.sizes = []  # (shape, numel) of every parameter, in the order of self.shards
        for full_name, shard in zip(self.names, self.shards):
            module_name, _, name = full_name.rpartition(".")
            module = model.get_submodule(module_name)
            whole = getattr(module, name)
            self.sizes.append((whole.shape, whole.numel()))
            self._by_module.setdefault(module, []).append((name, *self.sizes[-1], shard))
            delattr(module, name)  # the whole tensor is gone; the shard remains
            setattr(module, name, None)
        for module in self._by_module:
            module.register_forward_pre_hook(self._before)
            module.register_forward_hook(self._after)

    def cut(self, param: torch.Tensor) -> torch.Tensor:
        """A copy of this rank's piece, padded with zeros to S values: the whole is dropped."""
        size = math.ceil(param.numel() / self.world)
        flat = padded(param.detach().reshape(-1), size * self.world)
        return flat[self.rank * size : (self.rank + 1) * size].clone()

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
        """What autograd saves for backward is checked as it is saved: a gathered weight (or a
        view of one) is replaced by a note to gather it again, so it can be freed."""

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

    def state_bytes(self) -> dict:
        """What this rank holds now: only the shards, their gradients, its optimizer state."""
        return state_bytes(self.shards, self.optimizer)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, by the model's names (a collective)."""
        return {
            name: self.gather(shard, shape, numel).clone()
            for name, shard, (shape, numel) in zip(self.names, self.shards, self.sizes)
        }


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


ZERO_CLASSES = {1: ZeRO1, 2: ZeRO2, 3: ZeRO3}  # the class of each stage
