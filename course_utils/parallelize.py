"""Where the parallel axes meet: how a run lays out its ranks, and a model parallelized axis by
axis. The only module that imports more than one strategy (docs/architecture.md).

Each strategy is a room of the package with one job: :mod:`~course_utils.tensor_parallel` splits
layers, :mod:`~course_utils.sharding` shards a model's state (FSDP2), :mod:`~course_utils.ddp`
replicates it, :mod:`~course_utils.pipeline` cuts it into stages. This module decides which of
them a run uses and in which order:

- :class:`Axes` holds how many ranks go along each axis (``dp`` x ``tp`` x ``pp``), checks them
  once (:meth:`Axes.error`), and lays the ranks out as a ``DeviceMesh`` with named dimensions
  (:meth:`Axes.mesh`);
- :func:`parallelize` applies the axes to a model, always in this order:

  1. **tensor parallel** (``tensor_parallel.apply`` over ``mesh["tp"]``): the layers become
     DTensor slices;
  2. **activation checkpointing** (:func:`checkpoint_activations`): each block keeps only its
     input and recomputes the rest in backward;
  3. **data parallel** over ``mesh["dp"]``: ``sharding.apply`` (FSDP2, one unit per block) or
     ``ddp.apply`` (a replica per rank).

  The order is not a matter of taste. FSDP shards whatever parameters it finds, so the tensor-
  parallel slices must exist first (FSDP then shards each slice again: a 2-D layout). FSDP's
  hooks wrap each block from the outside, so they must see the checkpointed blocks: gathering a
  block's weights then serves both its forward and its recomputation. Data parallel goes last
  because it only needs the gradients, whatever produced them.
- :func:`role` is one rank's part in a run of the command line: the model built, parallelized,
  and described to the loop (:class:`course_utils.loop.Role`). A pipeline rank holds stages, not
  the model: the pipeline room builds its own role (``pipeline.role``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from course_utils import ddp, launch, loop, models, pipeline, sharding, tensor_parallel

DATA_PARALLEL = {"ddp": ddp.apply, "fsdp": sharding.apply}  # how the dp ranks hold the model


@dataclass(frozen=True)
class Axes:
    """How many ranks a run puts along each axis; ``dp * tp * pp`` is the number of workers.
    ``data``: how the ``dp`` ranks hold the model, "ddp" (a replica each) or "fsdp" (a shard
    each)."""

    dp: int = 1  # data parallel: ranks that each read their slice of the global batch
    tp: int = 1  # tensor parallel: ranks that each hold a slice of every layer
    pp: int = 1  # pipeline parallel: ranks that each hold consecutive layers (a stage)
    data: str = "ddp"

    @classmethod
    def of(cls, cfg) -> Axes:
        """The axes of a :class:`~course_utils.config.RunConfig`: ``--parallel tp`` and
        ``pipeline`` put every worker on one axis; ``ddp`` and ``fsdp`` put ``--tp`` ranks on
        the tensor axis and the rest on the data axis (``nproc = dp x tp``)."""
        if cfg.parallel == "pipeline":
            return cls(pp=cfg.nproc)
        if cfg.parallel == "tp":
            return cls(tp=cfg.nproc)
        data = cfg.parallel if cfg.parallel in DATA_PARALLEL else "ddp"
        return cls(dp=max(cfg.nproc // max(cfg.tp, 1), 1), tp=cfg.tp, data=data)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def error(self, cfg) -> str | None:
        """Why these axes can't run ``cfg`` (one line), or None: the layout first, then each
        axis's own room (the model must have a plan for it, the batch must divide)."""
        if cfg.tp < 1 or cfg.nproc % cfg.tp:
            return f"--nproc {cfg.nproc} is not a multiple of the tensor-parallel size {cfg.tp}"
        if self.dp > 1 and cfg.batch_size % self.dp:
            return (
                f"--batch-size {cfg.batch_size} does not divide among {self.dp} data-parallel "
                f"replicas (use a multiple of {self.dp})"
            )
        if self.tp > 1 or cfg.parallel == "tp":
            error = tensor_parallel.config_error(cfg.model, self.tp, cfg.nproc)
            if error:
                return error
        if self.pp > 1 or cfg.parallel == "pipeline":
            return pipeline.config_error(
                cfg.model, cfg.nproc, cfg.batch_size, cfg.microbatches, cfg.schedule
            )
        return None

    def mesh(self, device_type: str = "cpu"):
        """The ranks as a ``DeviceMesh`` named ("dp", "tp"): consecutive ranks share a tensor-
        parallel group (the neighbours of one node, on the fastest link), ranks with the same
        tensor-parallel index a data-parallel group. None without a process group (one
        process); a pipeline's stages talk over the default group."""
        if not dist.is_initialized() or self.pp > 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Activation checkpointing, in place: each of the model's blocks (or each child that holds
    parameters) keeps only its input from forward and recomputes its activations in backward
    (``torch.utils.checkpoint``): memory for one block's activations at a time, for a second
    forward. The parameters keep their names (checkpoints and plans still find them)."""
    blocks = model.blocks if hasattr(model, "blocks") else sharding.fsdp_units(model)
    for block in blocks:
        forward = block.forward  # the block's own forward (bound), run again in backward

        def recomputed(*args, forward=forward, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed
    return model


def parallelize(model: nn.Module, axes: Axes, mesh, recompute: bool = False) -> nn.Module:
    """``model`` with every axis applied, in the order the module's docstring gives: tensor
    parallel, activation checkpointing (``recompute``), data parallel. Returns what the loop
    trains: the model itself (sharded or split in place), or its DDP wrapper."""
    if axes.tp > 1:
        tensor_parallel.apply(model, mesh["tp"])  # 1. the layers become slices
    if recompute:
        checkpoint_activations(model)  # 2. blocks recompute their activations
    if axes.dp > 1 or (axes.data == "fsdp" and mesh is not None):
        model = DATA_PARALLEL[axes.data](model, mesh["dp"])  # 3. replicas or shards
    return model


def role(cfg, me: launch.Worker) -> tuple[loop.Role, Callable[[], nn.Module | None]]:
    """This rank's part in a run of the command line, and a function that returns the whole
    trained model on the main rank (None elsewhere; a collective every rank calls)."""
    axes = Axes.of(cfg)
    if axes.pp > 1 or cfg.parallel == "pipeline":
        return pipeline.role(cfg, me)  # this rank holds a stage: the pipeline room builds it
    mesh = axes.mesh(me.device.type)
    model = models.build(cfg.model, seed=cfg.seed).to(me.device)  # same weights on every rank
    trained_module = parallelize(model, axes, mesh)
    optimizer = models.make_optimizer(model, cfg.lr, cfg.optimizer)  # over this rank's tensors
    data_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    group = mesh["dp"].get_group() if mesh is not None else None
    part = loop.Role(
        trained_module,
        optimizer,
        model=model,
        data_rank=data_rank,
        data_world_size=axes.dp,
        # the loss of the global batch: summed over one copy of each replica (a tensor-parallel
        # group computes one replica's loss on every rank)
        reduce=(lambda stats: _sum_over(stats, group)) if mesh is not None else None,
        is_main=me.is_main,
        params=[(name, 0, param) for name, param in model.named_parameters()],
        sharded=axes.data == "fsdp" and mesh is not None,  # checkpoints: one file per rank (DCP)
        info={"mesh": {"dp": axes.dp, "tp": axes.tp}} if axes.tp > 1 else {},
    )
    return part, lambda: whole_model(model, cfg.model, me.is_main)


def _sum_over(stats: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(stats, group=group)
    return stats


def whole_model(model: nn.Module, name: str, is_main: bool) -> nn.Module | None:
    """A plain copy of ``model`` (the course's model ``name``) with its whole trained weights,
    on the main rank; None elsewhere. Slices and shards (DTensors) are gathered first: a
    collective every rank calls, in the state's order."""
    state = {}
    for key, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[key] = tensor.detach().cpu()
    if not is_main:
        return None
    whole = models.build(name)
    whole.load_state_dict(state)
    return whole
