"""``--parallel pipeline``, the face every strategy shows :mod:`course_utils.parallelize`: whether
a configuration can run (:func:`config_error`, before any worker starts) and this rank's part in
the run (:func:`role`): ``--nproc`` stages balanced by measured time, trained with
``torch.distributed.pipelining``. The package exports both (``course_utils.pipeline.role``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch.nn as nn

from course_utils import launch, loop
from course_utils.pipeline import stages
from course_utils.pipeline.engine import (
    TORCH_SCHEDULES,
    Pipeline,
    measured_plan,
    virtual_stages,
)
from course_utils.pipeline.zero_bubble import V_SCHEDULES


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


def role(cfg, me: launch.Worker) -> tuple[loop.Role, Callable[[], nn.Module | None]]:
    """This rank's stage of ``cfg`` (a :class:`course_utils.config.RunConfig`): its
    :class:`course_utils.loop.Role` (every stage reads the whole global batch; the stages' names
    in ``info``) and a function that returns the whole trained model on the main rank, None
    elsewhere (a collective every rank calls: the stages are gathered)."""
    num_stages = virtual_stages(cfg.model, me.world_size, cfg.schedule)
    sizes = measured_plan(cfg.model, num_stages, cfg.batch_size // cfg.microbatches, cfg.seed)
    pipe = Pipeline(
        cfg.model,
        sizes,
        cfg.microbatches,
        cfg.schedule,
        "torch",
        cfg.seed,
        cfg.lr,
        me.device.type,
        cfg.optimizer,
    )
    names = stages.unit_names(cfg.model)
    bounds = [0, *itertools.accumulate(sizes)]
    part = pipe.role()
    part.info = {
        "stage_sizes": sizes,
        "stages": [" + ".join(names[a:b]) for a, b in itertools.pairwise(bounds)],
    }
    return part, pipe.whole_model
