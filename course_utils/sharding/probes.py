"""What a rank holds, saves and sends under sharding, measured (lesson 08): the parameters autograd
saves for backward (what ZeRO-3 gathers again), FSDP2's ``Shard(0)`` bytes counted row by row, the
collectives FSDP2 launches in each pass, the pieces a DCP checkpoint stores, and the worker
functions that measure every strategy's bytes on 1, 2 or 4 ranks."""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_utils.sharding.fsdp import fully_sharded
from course_utils.sharding.state import nbytes, state_bytes
from course_utils.sharding.zero import ZERO_CLASSES, ZeRO3

STRATEGIES = {"DDP": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3, "FSDP": 3}  # and their ZeRO stage


def saved_parameters(model: nn.Module, X: torch.Tensor) -> list[str]:
    """The names of the parameters autograd saves for backward in ``model(X)``, once per saving:
    what ZeRO-3 by hand must gather again in backward (a saved-tensor pack hook finds them)."""
    by_storage = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        name = by_storage.get(tensor.untyped_storage().data_ptr())
        if name is not None:
            saved.append(name)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(X)
    return saved


def zero3_sent_per_step(
    model: nn.Module, X: torch.Tensor, world_size: int, bytes_per_value: int = 4
) -> float:
    """Bytes each rank sends per step under :class:`ZeRO3` with ring collectives: an
    all-gather of every tensor in forward, of the saved ones again in backward, a reduce-scatter
    of every gradient; each of (N-1)/N of the tensor padded to N equal pieces."""
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    n = world_size

    def whole(names) -> int:
        return sum(bytes_per_value * math.ceil(sizes[name] / n) * n for name in names)

    return (n - 1) / n * (2 * whole(sizes) + whole(saved_parameters(model, X)))


def fsdp_bytes_on_rank(
    model: nn.Module,
    world_size: int,
    rank: int = 0,
    bytes_per_value: int = 16,
    bytes_per_tensor: int = 4,
) -> int:
    """Model state ``rank`` holds under FSDP2's ``Shard(0)``: each tensor cut along its first
    dimension into chunks of ceil(rows / N) rows (``torch.chunk``), ``bytes_per_value`` per value
    it keeps (float32 AdamW: parameter, gradient, two moments) plus ``bytes_per_tensor`` for every
    tensor (AdamW's step counter, which a rank keeps even for a shard of no rows)."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        chunk = math.ceil(rows / world_size)
        mine = max(0, min(rows, (rank + 1) * chunk) - rank * chunk)
        total += bytes_per_value * mine * (p.numel() // rows) + bytes_per_tensor
    return total


def fsdp_step_collectives(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """One forward and backward of an FSDP2 model under ``CommDebugMode``: the all-gathers and
    reduce-scatters of each pass, and the bytes of whole (gathered, not DTensor) parameters the
    model holds between forward and backward."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    def counts(comm) -> dict[str, int]:
        ops = {str(op): n for op, n in comm.get_comm_counts().items()}
        return {
            what: sum(n for op, n in ops.items() if key in op)
            for what, key in (("all-gathers", "allgather"), ("reduce-scatters", "reduce_scatter"))
        }

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CommDebugMode's module hooks warn about inputs
        with CommDebugMode() as comm:
            loss = F.cross_entropy(model(X), y)
            forward = counts(comm)
            whole = sum(nbytes(p) for p in model.parameters() if not isinstance(p, DTensor))
            loss.backward()
            both = counts(comm)
    backward = {what: n - forward[what] for what, n in both.items()}
    return {"forward": forward, "backward": backward, "whole_between": whole}


def dcp_pieces(folder: str | Path, name: str) -> list[tuple[str, tuple, str]]:
    """How a DCP checkpoint in ``folder`` stores the tensor ``name``: one row per saved piece,
    (its rows ``"first..last"``, its shape, the file that holds it), from the metadata."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    where = {
        tuple(index.offset): place.relative_path
        for index, place in meta.storage_data.items()
        if index.fqn == name
    }
    return [
        (
            f"{chunk.offsets[0]}..{chunk.offsets[0] + chunk.sizes[0] - 1}",
            tuple(chunk.sizes),
            where[tuple(chunk.offsets)],
        )
        for chunk in meta.state_dict_metadata[name].chunks
    ]


# --- worker functions (run them with course_utils.launch.run) -------------------------------------


def held_by_strategy(batch_size: int, lr: float = 1e-3, model_name: str = "transformer") -> dict:
    """In a worker: what this rank holds after one AdamW step of each of :data:`STRATEGIES` on its
    slice of the global batch (``state_bytes``), and the activations that slice saves."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from course_utils import data, loop, models
    from course_utils.pipeline.stages import saved_bytes

    rank, world_size = dist.get_rank(), dist.get_world_size()
    X_all, y_all = data.mnist("train")
    X, y = next(data.batches(X_all, y_all, batch_size, 1, 0, rank, world_size))  # my slice
    X = models.prepare_input(model_name, X)
    make_optimizer = partial(models.make_optimizer, lr=lr, kind="adamw")
    activations = saved_bytes(models.build(model_name, seed=0), X)
    held = {}
    for name in STRATEGIES:
        model = models.build(model_name, seed=0)
        if name in ("DDP", "FSDP"):
            if name == "FSDP":
                fully_sharded(model, init_device_mesh("cpu", (world_size,)))
            optimizer = make_optimizer(model)
            loop.train_step(
                DistributedDataParallel(model) if name == "DDP" else model, optimizer, X, y
            )
            held[name] = state_bytes(model.parameters(), optimizer)
        else:
            zero = ZERO_CLASSES[STRATEGIES[name]](model, make_optimizer)
            zero.train_step(model, zero.optimizer, X, y)
            held[name] = zero.state_bytes()
        held[name]["activations"] = activations
    return held


def watch_zero3(batch_size: int = 8, lr: float = 0.05) -> dict:
    """In a worker: the CNN under :class:`ZeRO3`, one forward and backward, watched: the
    shape of ``conv1``'s weight while conv1 runs and while ``fc`` runs, the collectives of each
    pass, the shards, and the whole parameters the model still holds after backward."""
    from course_utils import data, models

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = models.build("cnn", seed=0)
    zero = ZeRO3(model, partial(models.make_optimizer, lr=lr, kind="sgd"))
    seen = {}
    model.conv1.register_forward_pre_hook(  # runs after ZeRO's own pre-hook: gathered
        lambda module, args: seen.update(conv1_running=tuple(module.weight.shape))
    )
    model.fc.register_forward_pre_hook(  # conv1 ran long ago
        lambda module, args: seen.update(conv1_while_fc_runs=model.conv1.weight)
    )
    X_all, y_all = data.mnist("train")
    X, y = X_all[rank:batch_size:world_size], y_all[rank:batch_size:world_size]
    loss = F.cross_entropy(zero(X), y)
    forward = dict(zero.traffic.calls)
    loss.backward()  # backward gathers the saved weights again
    return seen | {
        "forward": forward,
        "backward": {kind: n - forward[kind] for kind, n in zero.traffic.calls.items()},
        "shards": {name: tuple(s.shape) for name, s in zip(zero.names, zero.shards)},
        "shard_grads": all(s.grad is not None for s in zero.shards),
        "whole_left": sum(p.numel() for p in model.parameters()),
    }
