"""PyTorch's FSDP2 (``fully_shard``): the course's units, a whole model's state gathered from its
shards, and ``--parallel fsdp``'s role in a run (lesson 08)."""

from __future__ import annotations

import torch
import torch.nn as nn

# --- FSDP2: PyTorch's sharded data parallel ----------------------------------------------------------


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fully_sharded` shards one by one: each is one all-gather before it runs
    (and one reduce-scatter after its backward). A transformer's blocks; otherwise the model's
    children that hold parameters. The root takes what is left (embeddings, the head)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [child for child in model.children() if any(True for _ in child.parameters())]


# The command line's smallest unit: every unit costs its collectives' fixed latency and FSDP's own
# bookkeeping on every step (measured on a 2-core CPU with gloo: about 5 ms per unit and step, for
# 0.3-1 ms of messages), so small blocks are sharded together (like FSDP1's size-based policy).
MIN_UNIT_PARAMS = 1_000_000


def grouped_units(model: nn.Module, min_params: int = MIN_UNIT_PARAMS) -> list[list[nn.Module]]:
    """:func:`fsdp_units` joined, in order, into groups of at least ``min_params`` parameters;
    a last group short of it is left to the root. The course's transformer (0.2M parameters)
    is then one unit, the root: one all-gather and one reduce-scatter per step."""
    groups, current, size = [], [], 0
    for unit in fsdp_units(model):
        current.append(unit)
        size += sum(p.numel() for p in unit.parameters())
        if size >= min_params:
            groups.append(current)
            current, size = [], 0
    return groups


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
    mesh = init_device_mesh(me.device.type, (me.world_size,))
    fully_sharded(model, mesh, reshard_after_forward=None, units=grouped_units(model))
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
