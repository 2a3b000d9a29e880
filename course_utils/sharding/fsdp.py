"""PyTorch's FSDP2 (``fully_shard``, lesson 08): the course's units, a model sharded over a mesh,
and ``--parallel fsdp``'s step in the composing module (:func:`apply`: one unit per block, so that
a rank holds whole only the block it computes). The whole model is gathered back from its
DTensor shards by :func:`course_utils.parallelize.whole_model`."""

from __future__ import annotations

import torch.nn as nn

# --- FSDP2: PyTorch's sharded data parallel ----------------------------------------------------------


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fully_sharded` shards one by one: each is one all-gather before it runs
    (and one reduce-scatter after its backward). A transformer's blocks; otherwise the model's
    children that hold parameters. The root takes what is left (embeddings, the head)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [child for child in model.children() if any(True for _ in child.parameters())]


def grouped_units(model: nn.Module, blocks_per_unit: int) -> list[list[nn.Module]]:
    """:func:`fsdp_units` in consecutive groups of ``blocks_per_unit`` (the last may be shorter),
    each group one unit for :func:`fully_sharded`: a variant the lesson and the benchmark time
    against one unit per block. Fewer units pay fewer collectives and less of FSDP's work per
    unit, and hold more whole at once: with every block in one unit the whole model is gathered
    during the step, as under DDP, and only the optimizer state stays sharded throughout."""
    units = fsdp_units(model)
    return [units[i : i + blocks_per_unit] for i in range(0, len(units), blocks_per_unit)]


def fully_sharded(
    model: nn.Module, mesh=None, reshard_after_forward: bool | None = True, units=None
) -> nn.Module:
    """``model`` sharded in place with FSDP2 (``fully_shard``) over ``mesh`` (default: every
    rank): its parameters become DTensors, 1/N of each on each rank. ``units``: what is gathered
    at once (default :func:`fsdp_units`; a list of modules is one unit); the root takes the rest.
    ``reshard_after_forward``: free a unit's gathered parameters after its forward (ZeRO-3;
    backward gathers them again) or keep them until backward (ZeRO-2: less communication, more
    memory); None: FSDP2's default, True except for the root, whose parameters backward needs
    first. FSDP2 also prefetches: it starts the next unit's all-gather while one computes."""
    from torch.distributed.fsdp import fully_shard

    for unit in fsdp_units(model) if units is None else units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def apply(model: nn.Module, mesh) -> nn.Module:
    """Data parallel by sharding, the composing module's step 3 (:mod:`course_utils.parallelize`):
    ``model`` sharded in place over ``mesh`` (its data-parallel ranks), one FSDP unit per block
    (:func:`fsdp_units`) and the root, each unit's parameters gathered for its forward and freed
    after it (FSDP2's default), so that a rank holds whole only the block it is computing."""
    return fully_sharded(model, mesh, reshard_after_forward=None)
