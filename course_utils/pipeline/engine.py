"""A pipeline rank's engine: which stages this rank holds, and :class:`Pipeline`, the stages with
their optimizer and engine (the hand-written one or ``torch.distributed.pipelining``'s), whose
``step_fn`` plugs into :func:`course_utils.loop.fit`. Lessons 06 and 07, ``--parallel pipeline``
and the benchmarks all train through it.

Why the losses equal one process's: the last stage's loss is the mean over a microbatch, and with
``m`` equal microbatches the mean of their means is the mean over the batch. The gradients too:
the hand-written engine divides each microbatch's loss by ``m`` before its backward;
``torch.distributed.pipelining`` back-propagates the unscaled microbatch means and then divides
the accumulated gradients by ``m`` (``scale_grads=True``, its default). Both give the gradient of
the batch mean, so ``--parallel pipeline`` takes the same steps as ``--parallel none``.

Every function that talks runs inside a worker whose default process group is initialised
(:func:`course_utils.launch.run`, or ``torchrun`` + :func:`course_utils.launch.process_group`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.profiler import record_function

from course_utils import checkpoint, data, launch, loop, models
from course_utils.pipeline import hand, stages
from course_utils.pipeline.schedules import SCHEDULES, Event, stage_order
from course_utils.pipeline.torch_engine import TorchPipeline
from course_utils.pipeline.zero_bubble import V_SCHEDULES

ENGINES = ("hand", "torch")
# torch.distributed.pipelining runs more: several smaller stages per rank, taken in turn
# (interleaved), or two per rank in a V (rank r holds r and 2p-1-r).
MULTI_STAGE = ("interleaved1f1b", *V_SCHEDULES)  # schedules with several stages per rank
TORCH_SCHEDULES = (*SCHEDULES, *MULTI_STAGE)


def rank_stages(schedule: str, rank: int, num_ranks: int, num_stages: int) -> list[int]:
    """The stages a rank holds: its own; interleaved, every p-th (rank, rank + p, ...); in a V
    (ZBV, DualPipeV), stage ``rank`` going down and ``2p - 1 - rank`` coming back, so that rank
    0 holds both the first and the last stage."""
    if schedule in V_SCHEDULES:
        return [rank, 2 * num_ranks - 1 - rank]
    if schedule == "interleaved1f1b":
        return list(range(rank, num_stages, num_ranks))
    return [rank]


def virtual_stages(name: str, num_ranks: int, schedule: str) -> int:
    """Stages in all: one per rank; two per rank in a V; for the interleaved schedule as many
    per rank as fit."""
    if schedule in V_SCHEDULES:
        return 2 * num_ranks
    if schedule != "interleaved1f1b":
        return num_ranks
    return stages.max_stages(name) // num_ranks * num_ranks


def measured_plan(name: str, num_stages: int, microbatch_size: int, seed: int = 0) -> list[int]:
    """Units per stage (:func:`course_utils.pipeline.stages.plan`) from unit costs measured on
    rank 0 at the microbatch size, sent to every rank (they must agree)."""
    answer = [None]
    if dist.get_rank() == 0:
        X, y = data.mnist("train", limit=microbatch_size)
        pieces = stages.units(name, models.build(name, seed=seed))
        costs = stages.unit_costs(pieces, models.prepare_input(name, X), y)  # [(fwd, bwd)]
        answer = [stages.plan(costs, num_stages)]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


class Pipeline:
    """This rank's part of a pipeline: its stage, optimizer and engine; ``step_fn`` plugs into
    :func:`course_utils.loop.fit`. Every rank passes the same arguments."""

    def __init__(
        self,
        name: str,
        sizes: list[int],
        num_microbatches: int,
        schedule: str = "gpipe",
        engine: str = "hand",
        seed: int = 0,
        lr: float = 0.01,
        device: str | None = None,
        optimizer: str = "sgd",
    ):
        me = launch.worker(device)
        self.rank, self.num_stages = me.rank, me.world_size
        self.name, self.num_microbatches, self.sizes = name, num_microbatches, sizes
        self.model = models.build(name, seed=seed)  # the full model, same weights on every rank
        pieces = stages.split(name, self.model, sizes)
        self.torch = None
        self.last_rank = 0 if schedule in V_SCHEDULES else self.num_stages - 1  # holds the loss
        if schedule in MULTI_STAGE:  # several stages per rank
            if engine != "torch":
                raise ValueError(f"the {schedule} schedule runs with engine='torch' only")
            indices = rank_stages(schedule, self.rank, self.num_stages, len(pieces))
            self.stage = nn.ModuleList([pieces[i] for i in indices]).to(me.device)
            self.torch = TorchPipeline(
                list(self.stage), indices, len(pieces), schedule, num_microbatches, me.device
            )
        else:
            sample = models.prepare_input(name, data.mnist("train", limit=1)[0])
            shapes = [tuple(sample.shape[1:]), *stages.boundary_shapes(pieces, sample)]
            self.in_shape, self.out_shape = shapes[self.rank], shapes[self.rank + 1]
            self.stage = pieces[self.rank].to(me.device)
            self.order = stage_order(schedule, self.num_stages, num_microbatches, self.rank)
            if engine == "torch":
                self.torch = TorchPipeline(
                    [self.stage], [self.rank], len(pieces), schedule, num_microbatches, me.device
                )
        self.optimizer = models.make_optimizer(self.stage, lr, optimizer)
        self.events: list[Event] | None = None  # set to a list to record the next steps

    def step_fn(self, _model, optimizer, X, y) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of this stage: every microbatch forward and backward, one update."""
        optimizer.zero_grad(set_to_none=True)
        if self.events is not None:
            self.events.clear()  # keep the latest step's timeline only
        if self.torch is not None:
            self.torch.events = self.events
            loss, correct = self.torch.step(X, y)
        else:
            loss, correct = hand.step(
                self.stage,
                self.order,
                X,
                y,
                self.num_microbatches,
                self.in_shape,
                self.out_shape,
                self.events,
            )
        with record_function("optimizer"):
            optimizer.step()
        return loss, correct

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Metrics are known on the last stage: every rank takes its copy."""
        dist.broadcast(stats, src=self.last_rank)
        return stats

    def role(self) -> loop.Role:
        """This rank's part in :func:`course_utils.loop.fit`: every stage reads the whole global
        batch (the first uses the inputs, the last the labels), as one process would."""
        return loop.Role(
            self.stage,
            self.optimizer,
            step_fn=self.step_fn,
            reduce=self.reduce,
            is_main=self.rank == 0,
            params=stages.param_origins(self.stage),
            holds_all=False,
        )

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The full model's parameters, gathered from every stage, on rank 0 (None elsewhere)."""
        return _gather(stages.full_pieces(self.stage), self.rank)

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        """The full model's gradients, gathered from every stage, on rank 0 (None elsewhere)."""
        return _gather(stages.full_pieces(self.stage, grads=True), self.rank)

    def whole_model(self) -> nn.Module | None:
        """A plain copy of the model with every stage's trained weights, on rank 0 (None
        elsewhere): a collective every rank calls (what ``--eval`` tests)."""
        state = self.full_state()
        if state is None:
            return None
        model = models.build(self.name)
        model.load_state_dict(state)
        return model


def _gather(pieces, rank: int):
    everything = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(pieces, everything, dst=0)
    return checkpoint.assemble([p for part in everything for p in part]) if rank == 0 else None
