"""A measured pipeline run and the baseline it is measured against (lessons 06 and 07, the
pipeline panel and ``benchmarks/bench_pipeline.py``): :func:`profile` trains a few steps of a
:class:`Profile` on every rank and records the last step's timeline; :func:`one_process_throughput`
times the whole model in one process, the baseline of every speedup. The lessons' sweeps over
these runs are in :mod:`course_utils.pipeline.sweeps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from course_utils import data, loop, measure, models
from course_utils.pipeline.engine import Pipeline, measured_plan, virtual_stages
from course_utils.pipeline.schedules import Event


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
    return measure.throughput(
        model,
        models.prepare_input(name, X),
        y,
        batch_size,
        threads=threads,
        num_steps=num_steps,
        microbatches=microbatches,
    )
