"""Where the parallel axes meet: how a run lays out its ranks, and a model parallelized axis by
axis. The only module that imports more than one strategy (docs/architecture.md).

Each strategy is a room of the package with one job: :mod:`~course_utils.tensor_parallel` splits
layers, :mod:`~course_utils.context_parallel` splits every sequence (ring attention),
:mod:`~course_utils.expert_parallel` spreads a mixture of experts, :mod:`~course_utils.sharding`
shards a model's state (FSDP2), :mod:`~course_utils.ddp` replicates it,
:mod:`~course_utils.pipeline` cuts it into stages. This module decides which of them a run uses
and in which order:

- :class:`Axes` holds how many ranks go along each axis (``dp`` x ``ep`` x ``cp`` x ``tp``, or
  ``pp``), checks them once (:meth:`Axes.error`), and lays the ranks out as a ``DeviceMesh``
  with named dimensions (:meth:`Axes.mesh`): tensor parallel on consecutive ranks (inside a node
  under torchrun), or, with ``--tp-outer``, on ranks far apart (across the nodes);
- :func:`parallelize` applies the axes to a model, always in this order:

  1. **tensor parallel** (``tensor_parallel.apply`` over ``mesh["tp"]``): the layers become
     DTensor slices;
  2. **context parallel** (``context_parallel.apply`` over ``mesh["cp"]``): each rank keeps some
     of every sequence's tokens, and attention meets the others' around a ring;
  3. **expert parallel** (``expert_parallel.apply`` over ``mesh["dp", "ep"]``): each rank keeps
     some experts, and tokens travel to them by all-to-all;
  4. **activation checkpointing** (:func:`checkpoint_activations`): each block keeps only its
     input and recomputes the rest in backward;
  5. **data parallel** over every rank that holds the same parameters, ``dp x ep x cp``
     (:func:`replicas`): ``sharding.apply`` (FSDP2, one unit per block) or ``ddp.apply`` (a
     replica per rank; with ``--replicate R``, HSDP: shards over groups of consecutive ranks,
     replicated over R groups). Each expert is replicated over ``dp`` only: its room averages it.

  The order is not a matter of taste. FSDP shards whatever parameters it finds, so the tensor-
  parallel slices must exist first (FSDP then shards each slice again: a 2-D layout). Context and
  expert parallelism change what a block computes, not which parameters it holds: they come
  before the wrappers that hook the blocks. FSDP's hooks wrap each block from the outside, so
  they must see the checkpointed blocks: gathering a block's weights then serves both its
  forward and its recomputation. Data parallel goes last because it only needs the gradients,
  whatever produced them. Context-parallel ranks read the same images (different tokens of
  them) and expert-parallel ranks different images: both average their gradients like replicas.
- :func:`role` is one rank's part in a run of the command line: the model built, parallelized,
  and described to the loop (:class:`course_utils.loop.Role`). A pipeline rank holds stages, not
  the model: the pipeline room builds its own role (``pipeline.role``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from course_utils import (
    context_parallel,
    ddp,
    expert_parallel,
    launch,
    loop,
    models,
    pipeline,
    precision,
    sharding,
    tensor_parallel,
)

DATA_PARALLEL = {"ddp": ddp.apply, "fsdp": sharding.apply}  # how the dp ranks hold the model


@dataclass(frozen=True)
class Axes:
    """How many ranks a run puts along each axis; ``dp * ep * cp * tp * pp`` is the number of
    workers. ``data``: how the replicas hold the model, "ddp" (a copy each) or "fsdp" (a shard
    each)."""

    dp: int = 1  # data parallel: ranks that each read their slice of the global batch
    tp: int = 1  # tensor parallel: ranks that each hold a slice of every layer
    pp: int = 1  # pipeline parallel: ranks that each hold consecutive layers (a stage)
    cp: int = 1  # context parallel: ranks that each hold some tokens of every sequence
    ep: int = 1  # expert parallel: ranks that each hold some experts (and read their own slice)
    data: str = "ddp"
    replicate: int = 1  # HSDP (data "fsdp"): groups that each hold the model in dp / R shards
    tp_outer: bool = False  # the tensor-parallel ranks lie dp x ep x cp apart (Axes.mesh)

    DIMS = ("dp", "ep", "cp", "tp")  # the mesh's dimensions, outermost first

    @classmethod
    def of(cls, cfg) -> Axes:
        """The axes of a :class:`~course_utils.config.RunConfig`: ``--parallel tp`` and
        ``pipeline`` put every worker on one axis; the others put ``--tp``, ``--cp`` and
        ``--ep`` ranks on theirs and the rest on the data axis (``nproc = dp x ep x cp x tp``)."""
        if cfg.parallel == "pipeline":
            return cls(pp=cfg.nproc, tp_outer=cfg.tp_outer)
        if cfg.parallel == "tp":
            return cls(tp=cfg.nproc, tp_outer=cfg.tp_outer)
        data = cfg.parallel if cfg.parallel in DATA_PARALLEL else "ddp"
        inner = max(cfg.tp, 1) * max(cfg.cp, 1) * max(cfg.ep, 1)
        dp = max(cfg.nproc // inner, 1)
        sizes = dict(dp=dp, tp=cfg.tp, cp=cfg.cp, ep=cfg.ep, replicate=cfg.replicate)
        return cls(**sizes, data=data, tp_outer=cfg.tp_outer)

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.cp * self.tp * self.pp

    @property
    def data_ranks(self) -> int:
        """Ranks that read different images: the replicas and the expert-parallel ranks."""
        return self.dp * self.ep

    def error(self, cfg) -> str | None:
        """Why these axes can't run ``cfg`` (one line), or None: the layout first, then each
        axis's own room (the model must have a plan for it, the batch must divide)."""
        inner = {"tensor": cfg.tp, "context": cfg.cp, "expert": cfg.ep}
        for axis, n in inner.items():
            if n < 1:
                return f"--{axis[0]}p must be at least 1, got {n}"
        if cfg.nproc % (cfg.tp * cfg.cp * cfg.ep):
            sizes = [f"{axis}-parallel size {n}" for axis, n in inner.items() if n > 1]
            product = " x ".join(sizes) + (
                f" = {cfg.tp * cfg.cp * cfg.ep}" if len(sizes) > 1 else ""
            )
            return f"--nproc {cfg.nproc} is not a multiple of the {product}"
        if self.tp_outer and (self.tp == 1 or self.pp > 1):
            return (
                "--tp-outer places the tensor-parallel ranks: it needs --parallel ddp or fsdp "
                "with --tp 2 or more"
            )
        if self.tp_outer and self.dp * self.ep * self.cp == 1:
            return "--tp-outer: every rank is on the tensor-parallel axis, none to put inside it"
        if self.ep > 1 and (self.cp > 1 or self.tp > 1 or self.data == "fsdp"):
            return (
                "--ep composes with --parallel none or ddp only (not with --cp, --tp or fsdp): "
                "run expert parallelism over data-parallel replicas"
            )
        if self.data_ranks > 1 and cfg.batch_size % self.data_ranks:
            what = "data-parallel replicas" if self.ep == 1 else "data ranks (dp x ep)"
            return (
                f"--batch-size {cfg.batch_size} does not divide among {self.data_ranks} {what} "
                f"(use a multiple of {self.data_ranks})"
            )
        if self.replicate != 1:
            error = self._hybrid_error()
            if error:
                return error
        if self.tp > 1 or cfg.parallel == "tp":
            error = tensor_parallel.config_error(cfg.model, self.tp, cfg.nproc)
            if error:
                return error
        if self.cp > 1:
            error = context_parallel.config_error(cfg.model, self.cp, cfg.nproc, tp=self.tp)
            if error:
                return error
        if self.ep > 1:
            error = expert_parallel.config_error(cfg.model, self.ep, cfg.nproc)
            if error:
                return error
        if self.pp > 1 or cfg.parallel == "pipeline":
            return pipeline.config_error(
                cfg.model, cfg.nproc, cfg.batch_size, cfg.microbatches, cfg.schedule
            )
        return None

    def _hybrid_error(self) -> str | None:
        """Why ``--replicate`` can't run (one line), or None: HSDP needs FSDP's shards, and
        groups of equal size among the ranks that hold the same parameters."""
        if self.replicate < 1:
            return f"--replicate must be at least 1, got {self.replicate}"
        if self.data != "fsdp":
            return "--replicate is for --parallel fsdp (HSDP: replicas of a sharded model)"
        groups = self.dp * self.cp
        if groups % self.replicate:
            return (
                f"--replicate {self.replicate} does not divide the {groups} data-parallel ranks "
                "into groups of equal size (each group holds the model in shards)"
            )
        return None

    def mesh(self, device_type: str = "cpu"):
        """The ranks as a ``DeviceMesh`` named ("dp", "ep", "cp", "tp"): consecutive ranks share
        a tensor-parallel group (the neighbours of one node, on the fastest link), then a
        context-parallel ring, then an expert-parallel all-to-all; ranks with the same inner
        indices form a data-parallel group. None without a process group (one process); a
        pipeline's stages talk over the default group.

        With ``tp_outer`` the ranks are counted the other way round, tensor parallel outermost:
        the ``dp x ep x cp`` ranks of one tensor-parallel index are consecutive (one node's,
        under torchrun with that many per node) and a tensor-parallel group's ranks lie that far
        apart (one per node: its activations' all-reduces cross the link, the gradients' stay
        inside). The dimensions keep their names and order, so every strategy, and
        :func:`replicas` and :func:`data_ranks`, read this mesh as they read the other."""
        if not dist.is_initialized() or self.pp > 1:
            return None
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        shape = (self.dp, self.ep, self.cp, self.tp)
        if not self.tp_outer:
            return init_device_mesh(device_type, shape, mesh_dim_names=self.DIMS)
        ranks = torch.arange(self.world_size).reshape(self.tp, *shape[:-1])  # tp outermost
        return DeviceMesh(device_type, ranks.permute(1, 2, 3, 0), mesh_dim_names=self.DIMS)


def replicas(mesh):
    """The ranks that hold the same parameters and average their gradients, as one 1-D mesh:
    every rank of ``mesh`` with the same tensor-parallel index (``dp x ep x cp``)."""
    return mesh["dp", "ep", "cp"]._flatten("replicas")


def data_ranks(mesh):
    """The ranks that read different images, as one 1-D mesh (``dp x ep``): a metric summed
    over them is the global batch's."""
    return mesh["dp", "ep"]._flatten("data")


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


def parallelize(
    model: nn.Module,
    axes: Axes,
    mesh,
    recompute: bool = False,
    compress: str = "none",
    precision: str = "fp32",
) -> nn.Module:
    """``model`` with every axis applied, in the order the module's docstring gives: tensor,
    context and expert parallel, activation checkpointing (``recompute``), data parallel
    (``compress``: how DDP's gradients travel, ``--compress``; ``precision``: FSDP's gathered
    parameters in bfloat16 with ``bf16``, ``--precision``). Returns what the loop trains:
    the model itself (sharded or split in place), or its DDP wrapper."""
    if axes.tp > 1:
        tensor_parallel.apply(model, mesh["tp"])  # 1. the layers become slices
    if axes.cp > 1:
        context_parallel.apply(model, mesh["cp"])  # 2. each rank keeps some tokens
    if axes.ep > 1:
        expert_parallel.apply(model, mesh["dp", "ep"])  # 3. each rank keeps some experts
    if recompute:
        checkpoint_activations(model)  # 4. blocks recompute their activations
    if axes.ep > 1:  # 5. replicas, each expert averaged by its own room
        return ddp.apply(model, replicas(mesh), skip=expert_parallel.expert_parameters(model))
    if axes.dp * axes.cp > 1 or (axes.data == "fsdp" and mesh is not None):
        extra = {"compress": compress} if axes.data == "ddp" else {"replicate": axes.replicate}
        extra |= {"precision": precision} if axes.data == "fsdp" else {}
        model = DATA_PARALLEL[axes.data](model, replicas(mesh), **extra)  # 5. replicas or shards
    return model


def role(cfg, me: launch.Worker) -> tuple[loop.Role, Callable[[], nn.Module | None]]:
    """This rank's part in a run of the command line, and a function that returns the whole
    trained model on the main rank (None elsewhere; a collective every rank calls)."""
    axes = Axes.of(cfg)
    if axes.pp > 1 or cfg.parallel == "pipeline":
        return pipeline.role(cfg, me)  # this rank holds a stage: the pipeline room builds it
    mesh = axes.mesh(me.device.type)
    model = models.build(cfg.model, seed=cfg.seed).to(me.device)  # same weights on every rank
    trained_module = parallelize(model, axes, mesh, compress=cfg.compress, precision=cfg.precision)
    optimizer = models.make_optimizer(model, cfg.lr, cfg.optimizer)  # over this rank's tensors
    reader = data_ranks(mesh) if mesh is not None else None
    inner = {"tp": axes.tp, "cp": axes.cp, "ep": axes.ep}
    inner |= {"replicate": axes.replicate} if axes.replicate > 1 else {}  # HSDP's groups
    inner |= {"tp_outer": True} if axes.tp_outer else {}  # tensor parallel across the nodes
    part = loop.Role(
        trained_module,
        optimizer,
        model=model,
        data_rank=reader.get_local_rank() if reader is not None else 0,
        data_world_size=axes.data_ranks,
        # the loss of the global batch: summed over one copy of each data rank's (tensor- and
        # context-parallel ranks compute the same loss on every rank)
        reduce=(lambda stats: _sum_over(stats, reader.get_group())) if mesh is not None else None,
        is_main=me.is_main,
        step_fn=partial(loop.train_step, amp=precision.Mixed(cfg.precision)),  # --precision
        params=[(name, 0, param) for name, param in model.named_parameters()],
        sharded=axes.data == "fsdp" and mesh is not None,  # checkpoints: one file per rank (DCP)
        info={"mesh": {"dp": axes.dp, **inner}} if any(n > 1 for n in inner.values()) else {},
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
