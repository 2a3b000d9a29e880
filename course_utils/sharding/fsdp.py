"""PyTorch's FSDP2 (``fully_shard``, lesson 08): the course's units, a model sharded over a mesh,
and ``--parallel fsdp``'s step in the composing module (:func:`apply`: one unit per block, so that
a rank holds whole only the block it computes). The whole model is gathered back from its
DTensor shards by :func:`course_utils.parallelize.whole_model`."""

from __future__ import annotations

import torch.nn as nn

from course_utils.precision import fsdp_policy

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
    model: nn.Module,
    mesh=None,
    reshard_after_forward: bool | None = True,
    units=None,
    mp_policy=None,
) -> nn.Module:
    """``model`` sharded in place with FSDP2 (``fully_shard``) over ``mesh`` (default: every
    rank): its parameters become DTensors, 1/N of each on each rank. ``units``: what is gathered
    at once (default :func:`fsdp_units`; a list of modules is one unit); the root takes the rest.
    ``reshard_after_forward``: free a unit's gathered parameters after its forward (ZeRO-3;
    backward gathers them again) or keep them until backward (ZeRO-2: less communication, more
    memory); None: FSDP2's default, True except for the root, whose parameters backward needs
    first. FSDP2 also prefetches: it starts the next unit's all-gather while one computes.
    ``mp_policy``: a ``MixedPrecisionPolicy`` (:func:`course_utils.precision.fsdp_policy`), or
    None for float32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"reshard_after_forward": reshard_after_forward}
    options["mp_policy"] = mp_policy or MixedPrecisionPolicy()
    for unit in fsdp_units(model) if units is None else units:
        fully_shard(unit, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def hybrid_mesh(mesh, replicate: int):
    """``mesh`` (1-D, the data-parallel ranks) as HSDP's 2-D mesh ("replicate", "shard"):
    ``replicate`` groups of ``size / replicate`` consecutive ranks, each group holding the model
    in shards, the groups copies of one another. Consecutive ranks are the neighbours of one node
    under torchrun, so a shard group's all-gathers and reduce-scatters stay on the node's fast
    link, and only the all-reduce of each shard's gradient between the groups crosses the slow
    one: ``1 / shard`` of the gradient's ring on that link, against FSDP's gathers of every
    parameter over all ranks (twice, forward and backward) and its reduce-scatters."""
    size = mesh.size()
    if replicate < 1 or size % replicate:
        raise ValueError(f"{size} data-parallel ranks do not make {replicate} replica groups")
    return mesh._unflatten(0, (replicate, size // replicate), ("replicate", "shard"))


def apply(model: nn.Module, mesh, replicate: int = 1, precision: str = "fp32") -> nn.Module:
    """Data parallel by sharding, the composing module's step 5 (:mod:`course_utils.parallelize`):
    ``model`` sharded in place over ``mesh`` (its data-parallel ranks), one FSDP unit per block
    (:func:`fsdp_units`) and the root, each unit's parameters gathered for its forward and freed
    after it (FSDP2's default), so that a rank holds whole only the block it is computing.
    ``replicate`` > 1 is HSDP (``--replicate``): the shards span ``size / replicate`` consecutive
    ranks and are replicated over ``replicate`` groups (:func:`hybrid_mesh`; FSDP2 on a 2-D mesh
    shards along its second dimension and all-reduces the gradients' shards along the first).
    ``precision`` (``--precision``): under bf16, parameters gathered in bfloat16 and gradients
    reduced in float32 (:func:`course_utils.precision.fsdp_policy`)."""
    if replicate > 1:
        mesh = hybrid_mesh(mesh, replicate)
    policy = fsdp_policy(precision)
    return fully_sharded(model, mesh, reshard_after_forward=None, mp_policy=policy)
