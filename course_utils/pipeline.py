"""Pipeline parallelism (lesson 06): each worker holds some consecutive layers (a *stage*), and
microbatches flow through the stages, forward then backward.

This module puts the pieces together (and re-exports them, so ``cu.pipeline.x`` finds them all):

- :mod:`course_utils.pipeline_schedules`: GPipe and 1F1B on paper, simulated timelines, the bubble;
- :mod:`course_utils.pipeline_stages`: cutting the CNN and the RNN into stages, balancing them;
- :mod:`course_utils.pipeline_engines`: two ways to run a stage's share of a step, with the same
  stages, data and results: ``engine="hand"`` (``dist.send``/``dist.recv``, any schedule's order)
  and ``engine="torch"`` (``torch.distributed.pipelining``: ``ScheduleGPipe``, ``Schedule1F1B``,
  ``ScheduleInterleaved1F1B``);
- here: :func:`config_error` (bad input, before any worker starts), :class:`Pipeline` (one rank's
  stage, optimizer and engine, trained by :func:`course_utils.loop.fit`), :func:`profile_worker`
  (measured timelines) and :func:`train_worker` (``--parallel pipeline``).

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

from course_utils import data, launch, loop, models
from course_utils.pipeline_engines import TorchPipeline, hand_step
from course_utils.pipeline_schedules import (  # noqa: F401  (re-exported: cu.pipeline.simulate)
    SCHEDULES,
    Event,
    bubble_formula,
    bubble_fraction,
    format_table,
    in_flight,
    makespan,
    orders,
    peak_in_flight,
    simulate,
    speedup_bound,
    stage_order,
    table,
)
from course_utils.pipeline_stages import (  # noqa: F401
    UNIT_NAMES,
    assemble,
    balance,
    boundary_shapes,
    even_sizes,
    full_pieces,
    max_stages,
    plan,
    saved_bytes,
    split,
    stage_costs,
    unit_costs,
    unit_names,
    units,
)

ENGINES = ("hand", "torch")
# torch.distributed.pipelining runs one more: several smaller stages per rank, taken in turn.
TORCH_SCHEDULES = (*SCHEDULES, "interleaved1f1b")


def config_error(
    model: str, nproc: int, batch_size: int, microbatches: int, schedule: str
) -> str | None:
    """The one line that says why this pipeline can't run, or None if it can (before any worker
    starts: inside ``torch.distributed.pipelining`` the same mistakes fail deep in one worker)."""
    if model not in UNIT_NAMES:
        return f"--model {model!r} is not one of {sorted(UNIT_NAMES)}"
    if schedule not in TORCH_SCHEDULES:
        return f"--schedule must be one of {', '.join(TORCH_SCHEDULES)}, got {schedule!r}"
    if nproc < 1:
        return f"--nproc must be at least 1, got {nproc}"
    if nproc > max_stages(model):
        cut = " | ".join(UNIT_NAMES[model])
        return (
            f"--nproc {nproc}: the {model} splits into at most {max_stages(model)} pipeline "
            f"stages ({cut})"
        )
    if microbatches < 1:
        return f"--microbatches must be at least 1, got {microbatches}"
    if batch_size % microbatches:
        return (
            f"--microbatches {microbatches} does not divide --batch-size {batch_size} (equal "
            "microbatches are what make the pipeline's loss the batch mean)"
        )
    if schedule == "interleaved1f1b":
        if max_stages(model) < 2 * nproc:
            return (
                f"--schedule interleaved1f1b needs 2 stages per worker: the {model} has "
                f"{max_stages(model)} units for {nproc} workers"
            )
        rounds = max(1, microbatches // nproc)  # torch's condition for its interleaved rounds
        if microbatches % rounds:
            return f"--schedule interleaved1f1b: --microbatches {microbatches} is not a multiple of {rounds}"
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
        conv2_split: int | None = None,
    ):
        me = launch.worker()
        self.rank, self.num_stages = me.rank, me.world_size
        self.last = self.rank == self.num_stages - 1
        self.num_microbatches, self.sizes = num_microbatches, sizes
        self.model = models.build(name, seed=seed)  # the full model, same weights on every rank
        stages = split(name, self.model, sizes, conv2_split)
        if schedule == "interleaved1f1b":  # several stages per rank: rank, rank + p, ...
            if engine != "torch":
                raise ValueError("the interleaved schedule runs with engine='torch' only")
            indices = list(range(self.rank, len(stages), self.num_stages))
            self.stage = nn.ModuleList([stages[i] for i in indices]).to(me.device)
            self.torch = TorchPipeline(
                list(self.stage), indices, len(stages), schedule, num_microbatches, me.device
            )
        else:
            sample = models.prepare_input(name, data.mnist("train", limit=1)[0])
            shapes = [tuple(sample.shape[1:]), *boundary_shapes(stages, sample)]
            self.in_shape, self.out_shape = shapes[self.rank], shapes[self.rank + 1]
            self.stage = stages[self.rank].to(me.device)
            self.order = stage_order(schedule, self.num_stages, num_microbatches, self.rank)
            self.torch = None
            if engine == "torch":
                self.torch = TorchPipeline(
                    [self.stage], [self.rank], len(stages), schedule, num_microbatches, me.device
                )
        self.optimizer = loop.make_optimizer(self.stage, lr)
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
            loss, correct = hand_step(
                self.stage,
                self.order,
                X,
                y,
                self.num_microbatches,
                self.in_shape,
                self.out_shape,
                self.events,
            )
        optimizer.step()
        return loss, correct

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Metrics are known on the last stage: every rank takes its copy."""
        dist.broadcast(stats, src=self.num_stages - 1)
        return stats

    def fit(self, X, y, batch_size: int, num_steps: int, seed: int = 0) -> loop.History:
        """Train on the seeded global batches (every stage draws the same ones, as one process)."""
        batches = data.batches(X, y, batch_size, num_steps, seed)
        return loop.fit(
            self.stage,
            self.optimizer,
            batches,
            num_steps,
            batch_size=batch_size,
            step_fn=self.step_fn,
            reduce=self.reduce,
            progress=False,
        )

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The full model's parameters, gathered from every stage, on rank 0 (None elsewhere)."""
        return _gather(full_pieces(self.stage), self.rank)

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        """The full model's gradients, gathered from every stage, on rank 0 (None elsewhere)."""
        return _gather(full_pieces(self.stage, grads=True), self.rank)


def _gather(pieces, rank: int):
    everything = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(pieces, everything, dst=0)
    return assemble([p for part in everything for p in part]) if rank == 0 else None


def measured_plan(
    name: str, num_stages: int, microbatch_size: int, seed: int = 0
) -> tuple[list[int], int | None]:
    """:func:`plan` from unit costs measured on rank 0 at the microbatch size, sent to every
    rank (they must agree): units per stage, and where to split the CNN's conv2."""
    answer = [None]
    if dist.get_rank() == 0:
        X, y = data.mnist("train", limit=microbatch_size)
        pieces = units(name, models.build(name, seed=seed))
        costs = unit_costs(pieces, models.prepare_input(name, X), y)  # [(forward, backward)]
        answer = [plan(name, costs, num_stages)]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def profile_worker(
    name: str,
    num_microbatches: int,
    schedule: str = "gpipe",
    engine: str = "hand",
    batch_size: int = 64,
    num_steps: int = 4,
    sizes: list[int] | None = None,
    conv2_split: int | None = None,
    seed: int = 0,
) -> dict | None:
    """Train ``num_steps`` steps and record the last one's timeline on every rank. Rank 0
    returns ``samples_per_s`` (steps after the first), ``events`` (seconds from the step's
    start, all ranks), ``losses``, ``sizes`` and ``conv2_split``; the other ranks None.
    Without ``sizes``, the stages are planned from measured costs."""
    num_stages = dist.get_world_size()
    if sizes is None:
        total = _virtual_stages(name, num_stages, schedule)
        sizes, conv2_split = measured_plan(name, total, batch_size // num_microbatches, seed)
    pipe = Pipeline(name, sizes, num_microbatches, schedule, engine, seed, conv2_split=conv2_split)
    pipe.events = []
    X, y = data.mnist("train")
    history = pipe.fit(models.prepare_input(name, X), y, batch_size, num_steps, seed)
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
        "conv2_split": conv2_split,
    }


def train_worker(cfg) -> dict | None:
    """``--parallel pipeline``: train ``cfg`` (a ``course_utils.train.RunConfig``) with
    ``cfg.nproc`` stages, balanced by measured time; rank 0 returns the results of the CLI
    contract (less ``wall_s``), the other ranks None."""
    torch.set_num_threads(cfg.threads_per_worker)
    mb = cfg.batch_size // cfg.microbatches
    num_stages = _virtual_stages(cfg.model, dist.get_world_size(), cfg.schedule)
    sizes, conv2_split = measured_plan(cfg.model, num_stages, mb, cfg.seed)
    pipe = Pipeline(
        cfg.model, sizes, cfg.microbatches, cfg.schedule, "torch", cfg.seed, cfg.lr, conv2_split
    )
    X, y = data.mnist("train")
    history = pipe.fit(models.prepare_input(cfg.model, X), y, cfg.batch_size, cfg.steps, cfg.seed)
    state = pipe.full_state()
    if pipe.rank != 0:
        return None
    result = {
        "losses": history.losses,
        "accuracies": history.accuracies,
        "samples_per_s": history.samples_per_s,  # rank 0 finishes each step last
        "stage_sizes": sizes,
        "stages": [
            " + ".join(unit_names(cfg.model, conv2_split)[a : a + n]) for a, n in _starts(sizes)
        ],
        "backend": dist.get_backend(),
        "device": str(launch.worker().device),
    }
    if cfg.eval:
        model = models.build(cfg.model)
        model.load_state_dict(state)
        X_test, y_test = data.mnist("test")
        result["test_accuracy"] = loop.evaluate(
            model, models.prepare_input(cfg.model, X_test), y_test
        )
    return result


def _virtual_stages(name: str, num_ranks: int, schedule: str) -> int:
    """Stages in all: one per rank, or for the interleaved schedule as many per rank as fit."""
    if schedule != "interleaved1f1b":
        return num_ranks
    return max_stages(name) // num_ranks * num_ranks


def _starts(sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in sizes:
        out.append((a, n))
        a += n
    return out
