"""A pipeline rank at work: checking a configuration, this rank's stage and engine
(:class:`Pipeline`), a measured run for lessons 06-07 and the panel (:func:`profile`), and the
rank's :class:`course_utils.loop.Role` in ``--parallel pipeline`` (:func:`role`).

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

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.profiler import record_function

from course_utils import checkpoint, data, launch, loop, models
from course_utils.pipeline import hand, stages
from course_utils.pipeline.schedules import SCHEDULES, Event, stage_order
from course_utils.pipeline.torch_engine import TorchPipeline

ENGINES = ("hand", "torch")
# torch.distributed.pipelining runs one more: several smaller stages per rank, taken in turn.
V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank in a V: rank r holds r and 2p-1-r
MULTI_STAGE = ("interleaved1f1b", *V_SCHEDULES)  # schedules with several stages per rank
TORCH_SCHEDULES = (*SCHEDULES, *MULTI_STAGE)


def config_error(
    model: str, nproc: int, batch_size: int, microbatches: int, schedule: str
) -> str | None:
    """The one line that says why this pipeline can't run, or None if it can (before any worker
    starts: inside ``torch.distributed.pipelining`` the same mistakes fail deep in one worker)."""
    if model not in stages.UNIT_NAMES:
        return f"--model {model!r} is not one of {sorted(stages.UNIT_NAMES)}"
    if schedule not in TORCH_SCHEDULES:
        return f"--schedule must be one of {', '.join(TORCH_SCHEDULES)}, got {schedule!r}"
    if nproc < 1:
        return f"--nproc must be at least 1, got {nproc}"
    most = stages.max_stages(model)
    if nproc > most:
        cut = " | ".join(stages.UNIT_NAMES[model])
        return f"--nproc {nproc}: the {model} splits into at most {most} pipeline stages ({cut})"
    if microbatches < 1:
        return f"--microbatches must be at least 1, got {microbatches}"
    if batch_size % microbatches:
        return (
            f"--microbatches {microbatches} does not divide --batch-size {batch_size} (equal "
            "microbatches are what make the pipeline's loss the batch mean)"
        )
    if schedule == "interleaved1f1b":
        if most < 2 * nproc:
            return (
                f"--schedule interleaved1f1b needs 2 stages per worker: the {model} has "
                f"{most} units for {nproc} workers"
            )
        rounds = max(1, microbatches // nproc)  # torch's condition for its interleaved rounds
        if microbatches % rounds:
            return f"--schedule interleaved1f1b: --microbatches {microbatches} is not a multiple of {rounds}"
    if schedule in V_SCHEDULES:
        if most < 2 * nproc:
            return (
                f"--schedule {schedule} needs 2 stages per worker: the {model} has {most} units "
                f"for {nproc} workers"
            )
        if microbatches < 2 * nproc:
            return (
                f"--schedule {schedule} needs --microbatches >= 2 x --nproc (its stages), got "
                f"{microbatches} < {2 * nproc}"
            )
    if schedule == "1f1b" and microbatches < nproc:
        return f"--schedule 1f1b needs --microbatches >= --nproc (stages), got {microbatches} < {nproc}"
    return None


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
        self.num_microbatches, self.sizes = num_microbatches, sizes
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
        self.optimizer = loop.make_optimizer(self.stage, lr, optimizer)
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


def _gather(pieces, rank: int):
    everything = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(pieces, everything, dst=0)
    return checkpoint.assemble([p for part in everything for p in part]) if rank == 0 else None


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


def one_process_throughput(
    name: str,
    batch_size: int,
    threads: int = 1,
    num_steps: int = 4,
    seed: int = 0,
    microbatches: int = 1,
) -> float:
    """Samples/s of the whole model in this process: the baseline a pipeline's speedup is over.
    With ``microbatches``, one process runs the pipeline's microbatches one after the other (the
    same arithmetic and the same sizes of operations, so a speedup over it is the pipelining
    alone: a big batch in one piece can be slower per sample, its activations overflowing the
    caches)."""
    X, y = data.mnist("train")
    model = models.build(name, seed=seed)
    return loop.measure_throughput(
        model,
        models.prepare_input(name, X),
        y,
        batch_size,
        threads=threads,
        num_steps=num_steps,
        microbatches=microbatches,
    )


@dataclass
class Profile:
    """One measured pipeline run of lessons 06-07 and the panel: what :func:`profile` trains."""

    model: str = "cnn"  # "cnn", "rnn" or "transformer"
    microbatches: int = 4  # per global batch
    schedule: str = (
        "gpipe"  # "gpipe", "1f1b"; with engine "torch" also interleaved1f1b, zbv, dualpipev
    )
    engine: str = "hand"  # "hand" (send/recv, this package) or "torch" (torch's pipelining)
    batch_size: int = 64  # the global batch
    num_steps: int = 4  # steps trained; the first is not timed, the last is recorded
    sizes: list[int] | None = None  # units per stage; None: planned from measured costs
    seed: int = 0


def profile(run: Profile) -> dict | None:
    """Train ``run.num_steps`` steps and record the last one's timeline on every rank. Rank 0
    returns ``samples_per_s`` (steps after the first), ``events`` (seconds from the step's
    start, all ranks), ``losses`` and ``sizes``; the other ranks None."""
    num_stages = dist.get_world_size()
    sizes = run.sizes or measured_plan(
        run.model,
        virtual_stages(run.model, num_stages, run.schedule),
        run.batch_size // run.microbatches,
        run.seed,
    )
    pipe = Pipeline(run.model, sizes, run.microbatches, run.schedule, run.engine, run.seed)
    pipe.events = []
    X, y = data.mnist("train")
    X = models.prepare_input(run.model, X)
    part = pipe.role()
    history = loop.fit(
        part.module,
        part.optimizer,
        data.batches(X, y, run.batch_size, run.num_steps, run.seed),
        run.num_steps,
        batch_size=run.batch_size,
        step_fn=part.step_fn,
        reduce=part.reduce,
        progress=False,
        sync_every=run.num_steps,  # the losses gathered once, at the end: no meeting per step
    )
    everything = [None] * num_stages if pipe.rank == 0 else None
    dist.gather_object(pipe.events, everything, dst=0)
    if pipe.rank != 0:
        return None
    events = [e for part in everything for e in part]
    t0 = min(e.start for e in events)
    return {
        "samples_per_s": history.samples_per_s,
        "events": [Event(e.stage, e.kind, e.microbatch, e.start - t0, e.end - t0) for e in events],
        "losses": history.losses,
        "sizes": sizes,
    }


def role(cfg, device: str | None = None) -> tuple[loop.Role, Pipeline]:
    """``--parallel pipeline``: this rank's stage of ``cfg`` (a ``course_utils.config.RunConfig``),
    ``cfg.nproc`` stages balanced by measured time, trained with ``torch.distributed.pipelining``.
    Returns its :class:`course_utils.loop.Role` (with the stages' names in ``info``) and the
    :class:`Pipeline`, whose :meth:`Pipeline.full_state` gives the trained model for ``--eval``."""
    num_stages = virtual_stages(cfg.model, dist.get_world_size(), cfg.schedule)
    sizes = measured_plan(cfg.model, num_stages, cfg.batch_size // cfg.microbatches, cfg.seed)
    pipe = Pipeline(
        cfg.model,
        sizes,
        cfg.microbatches,
        cfg.schedule,
        "torch",
        cfg.seed,
        cfg.lr,
        device,
        cfg.optimizer,
    )
    names = stages.unit_names(cfg.model)
    bounds = [0, *itertools.accumulate(sizes)]
    part = pipe.role()
    part.info = {
        "stage_sizes": sizes,
        "stages": [" + ".join(names[a:b]) for a, b in itertools.pairwise(bounds)],
    }
    return part, pipe
