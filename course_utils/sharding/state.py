"""The model state a rank holds, measured from its tensors (lesson 08): at rest, between two steps
(:func:`state_bytes`, every strategy's ``state_bytes`` in a run's results), and at its peak during
a step (:class:`PeakState`, ``peak_state_bytes``). Sharding is judged by the second: a rank must
fit what it holds at its fullest moment, not what it keeps between steps."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.nn as nn

PARTS = ("parameters", "gradients", "optimizer")  # the model state, in the order it is counted


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
        "optimizer": sum(nbytes(v) for v in _optimizer_state(optimizer)),
    }
    held["total"] = sum(held.values())
    return held


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


class PeakState:
    """The model state alive on this rank at the fullest moment of its first ``steps`` training
    steps (the second is the first with optimizer state): parameters, gradients and optimizer
    state, in bytes (:attr:`bytes`). After those steps it removes its hooks, so the steps it does
    not watch cost nothing; ``with PeakState(...)`` removes them at the end of the block too.

    It looks each time a gradient has been accumulated (a hook on every parameter a module runs
    with) and after the optimizer's step: the moments the state grows. (Backward holds what
    forward holds, FSDP's gathered units included, and gradients besides: forward needs no look.)
    Each look sums the *storages* (allocations, each counted once however many views share it; one
    that FSDP freed counts 0) reachable from:

    - every parameter registered in the modules and every tensor the optimizer updates: FSDP's
      shards always, and a unit's gathered parameters while they are gathered (FSDP swaps them
      in before the unit runs and frees their storage after);
    - their gradients (FSDP's whole gradients of a unit too, until they are reduce-scattered);
    - the optimizer's state.

    What is not reachable from the model is not counted: DDP's gradient buckets (a second copy of
    the gradients), FSDP's communication buffers (a unit's all-gather in flight, prefetched before
    the unit runs, and a reduce-scatter's input), and the activations
    (:func:`course_utils.pipeline.stages.saved_bytes` counts those). :attr:`bytes` holds the parts
    of the look with the largest total."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2):
        self.module, self.optimizer, self.steps_left = module, optimizer, steps
        self.bytes = dict.fromkeys((*PARTS, "total"), 0)
        self._params: dict[int, weakref.ref] = {}  # every parameter seen, by id
        self._hooked: dict[int, weakref.ref] = {}  # the ones whose gradients are watched
        self._local: dict[int, tuple] = {}  # DTensors' local tensors (to_local is slow), by id
        self._optimizer_bytes = self._storage_bytes(_optimizer_state(optimizer), set())
        self._handles = [optimizer.register_step_post_hook(self._after_step)]
        for param in [p for group in optimizer.param_groups for p in group["params"]]:
            self._params[id(param)] = _entry_of(self._params, param)  # counted, not hooked
        for sub in module.modules():  # the parameters a module computes with, when it runs
            self._handles.append(sub.register_forward_pre_hook(self._watch_registered))

    def look(self) -> dict:
        """The model state alive now, by part; the largest so far is kept in :attr:`bytes`."""
        params = [ref() for ref in list(self._params.values())]
        params = [p for p in params if p is not None]
        counted: set[int] = set()  # storages already counted, by address
        now = {
            "parameters": self._storage_bytes(params, counted),
            "gradients": self._storage_bytes([p.grad for p in params], counted),
            "optimizer": self._optimizer_bytes,  # changes only in the optimizer's step
        }
        now["total"] = sum(now.values())
        if now["total"] > self.bytes["total"]:
            self.bytes = now
        return now

    def remove(self) -> None:
        """Stop watching: remove every hook (again: nothing happens)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> PeakState:
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()

    def _storage_bytes(self, tensors, counted: set[int]) -> int:
        """Bytes of the storages of ``tensors`` not in ``counted`` (then added to it)."""
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = self._local_of(t).untyped_storage()
            if storage.data_ptr() not in counted:
                counted.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def _local_of(self, tensor: torch.Tensor) -> torch.Tensor:
        if not hasattr(tensor, "to_local"):
            return tensor
        if id(tensor) not in self._local:  # kept while the DTensor lives
            self._local[id(tensor)] = (_entry_of(self._local, tensor), tensor.to_local())
        return self._local[id(tensor)][1]

    def _watch_registered(self, module: nn.Module, args) -> None:
        """Hook the gradients of the parameters ``module`` runs with (FSDP's gathered ones, swapped
        in by its own hook just before: they are the ones backward accumulates into)."""
        for param in module.parameters(recurse=False):
            if id(param) in self._hooked:
                continue
            if id(param) not in self._params:
                self._params[id(param)] = _entry_of(self._params, param)
            self._hooked[id(param)] = _entry_of(self._hooked, param)
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._on_gradient))

    def _on_gradient(self, param: torch.Tensor) -> None:
        self.look()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_bytes = self._storage_bytes(_optimizer_state(optimizer), set())
        self.look()
        self.steps_left -= 1
        if self.steps_left <= 0:
            self.remove()


def _entry_of(table: dict, obj) -> weakref.ref:
    """A weak reference to ``obj`` that removes ``table[id(obj)]`` when ``obj`` dies (an id can be
    reused by a later object; tensors can't be weak keys: their ``==`` compares values)."""
    key = id(obj)
    return weakref.ref(obj, lambda _: table.pop(key, None))
