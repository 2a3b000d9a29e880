"""The course's training entry point (contract in docs/architecture.md), one run top to bottom.

    python -m course_utils.train --model rnn --steps 200 --eval
    python -m course_utils.train --model cnn --parallel ddp --nproc 2 --json out.json

The path of a run: :func:`main` parses and validates (:mod:`course_utils.config`), :func:`run`
starts ``--nproc`` workers (:func:`course_utils.launch.run`; ``--parallel none`` trains in this
process), and every worker runs :func:`train_worker`: this rank's part in the run (the model
built and parallelized by :func:`course_utils.parallelize.role`), resume from a checkpoint,
:func:`course_utils.loop.fit`, the results. Under ``torchrun`` (commands in
docs/command_line.md) each process is already one worker: :func:`under_torchrun`.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import asdict

import torch
import torch.distributed as dist

from course_utils import (
    checkpoint,
    data,
    files,
    launch,
    loop,
    models,
    parallelize,
    profiling,
    sharding,
)
from course_utils.config import RunConfig, UsageError, parse, validate
from course_utils.launch import postmortem

SYNC_EVERY = 16  # steps between the sums of the workers' metrics (without --checkpoint-every)
# Failures one line explains (exit 1): a diverging loss, a changed checkpoint, a full disk
FAILURES = (loop.NonFiniteLoss, checkpoint.CheckpointError, checkpoint.SaveError, files.WriteError)


def train_worker(
    cfg: RunConfig, progress: bool = False, announce: bool = False, resume: tuple | None = None
) -> dict | None:
    """One worker's run (the only one with ``--parallel none``); the main rank returns the
    results of the contract (less ``wall_s``), the other ranks None. ``announce``: say on stderr
    when a checkpoint is saved (the command line does; a notebook's output stays quiet).
    ``resume``: ``(name, sha256)`` of what the caller verified (:func:`_reserve`), or None."""
    me = launch.worker(cfg.device)
    torch.set_num_threads(cfg.threads_per_worker)
    part, trained = parallelize.role(cfg, me)  # this rank's share of the model, by strategy
    images, labels = data.load("train", data_dir=cfg.data_dir)
    X, y = models.prepare_input(cfg.model, data.normalize(images)), torch.as_tensor(labels)

    # Resume from the checkpoint the caller verified, and no other (read and verified again).
    state = checkpoint.load(cfg.checkpoint, resume) if resume else None
    if state:
        checkpoint.load_into(part, state)  # this rank's share: the model, or a stage's slices
    start_step = state["step"] if state else 0
    record = checkpoint.record(cfg.record(), images, labels) if cfg.checkpoint else None
    before = loop.History(batch_size=cfg.batch_size)
    if state:  # continue the stopped run's history, so that the results hold every step
        before.losses, before.accuracies = list(state["losses"]), list(state["accuracies"])

    recorder = None
    if cfg.profile and start_step < cfg.steps:  # a few steps of each rank (profiling)
        recorder = profiling.Recorder(cfg.profile, me.rank, cfg.steps - start_step).__enter__()

    def on_step(i: int, run: loop.History) -> None:
        if recorder is not None:
            recorder.step()
        done, every = start_step + i + 1, cfg.checkpoint_every
        if cfg.checkpoint and (done == cfg.steps or (every and done % every == 0)):
            # every rank takes part (a pipeline's stages are gathered); the main rank writes
            path = checkpoint.save(cfg.checkpoint, part, done, before + run, record)
            if path is not None and announce:
                print(f"checkpoint: step {done} saved to {path}", file=sys.stderr, flush=True)

    batches = data.batches(
        X,
        y,
        cfg.batch_size,
        cfg.steps,
        cfg.seed,
        part.data_rank,
        part.data_world_size,
        start_step,
        augment=cfg.augment,
    )
    workers = f"{me.world_size} worker{'s' if me.world_size > 1 else ''}"
    peak = sharding.PeakState(part.module, part.optimizer)  # the fullest moment of 2 steps
    run = loop.fit(
        part.module,
        part.optimizer,
        batches,
        cfg.steps - start_step,
        batch_size=cfg.batch_size,
        step_fn=part.step_fn,
        reduce=part.reduce,
        progress=progress and part.is_main,
        desc=f"{cfg.model}, {cfg.parallel} ({workers})",
        on_step=on_step,
        first_step=start_step,
        # the per-step global losses, summed over the workers every few steps rather than in a
        # collective of their own every step (one meeting fewer per step: ~2-4% for DDP's CNN);
        # a checkpoint's steps are among them, so that it holds every step's loss
        sync_every=cfg.checkpoint_every or SYNC_EVERY,
    )
    peak.remove()  # a run of fewer than two steps: stop watching all the same
    profile = None
    if recorder is not None:
        profile = profiling.summary(recorder.stop(), recorder.active)
        if dist.is_initialized():  # every rank's summary, for the main rank's report
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, profile)
            profile = everyone
        else:
            profile = [profile]
    if cfg.checkpoint and dist.is_initialized():
        dist.barrier()  # nobody leaves (and no restart reads) before the main rank has saved
    model = trained() if cfg.eval else None  # every rank takes part (a pipeline gathers)
    if not part.is_main:
        return None
    history = before + run
    held = sharding.state_bytes([param for _, _, param in part.params], part.optimizer)
    result = {
        "losses": history.losses,
        "accuracies": history.accuracies,
        # this run's steps only, start-up excluded; None when the checkpoint had done them all
        "samples_per_s": run.samples_per_s if start_step < cfg.steps else None,
        "resumed_from_step": start_step,
        "backend": dist.get_backend() if dist.is_initialized() else "none",
        "device": str(me.device),
        "state_bytes_per_rank": held["total"],  # parameters + gradients + optimizer, rank 0
        "state_bytes": held,  # between steps
        "peak_state_bytes": peak.bytes,  # the same parts at a step's fullest (FSDP's gathers)
        **part.info,
        **({"profile_summary": profile} if profile else {}),
    }
    if cfg.eval:
        X_test, y_test = data.mnist("test", data_dir=cfg.data_dir)
        result["test_accuracy"] = loop.evaluate(
            model, models.prepare_input(cfg.model, X_test), y_test
        )
    return result


def run(
    cfg: RunConfig, progress: bool = True, timeout: float = 24 * 3600, announce: bool = False
) -> dict:
    """Validate and run one configuration; the notebooks' and tests' way in.

    ``--parallel none`` on one process trains here (with ``cfg.threads_per_worker`` threads,
    restored after);
    otherwise :func:`course_utils.launch.run` starts ``nproc`` workers on ``cfg.device`` and
    rank 0's results come back. ``wall_s`` covers everything, start-up included."""
    start = time.perf_counter()
    validate(cfg)
    with ExitStack() as held:  # the checkpoint folder, for the whole run
        resume = _reserve(cfg, held)
        if cfg.nproc == 1 and cfg.parallel == "none":
            with loop.num_threads(cfg.threads_per_worker):
                result = train_worker(cfg, progress, announce, resume)
        else:
            # Under ``python -m`` this module is __main__, which a spawned worker can't import:
            # hand the launcher the importable copy's train_worker (else workers fork, 1 thread).
            importable = importlib.import_module("course_utils.train")
            per_rank = launch.run(
                importable.train_worker,
                cfg.nproc,
                cfg,
                progress,
                announce,
                resume,
                threads=cfg.threads_per_worker,
                timeout=timeout,
                device=cfg.device,
                oversubscribe=cfg.oversubscribe,
                group_timeout=cfg.timeout,
            )
            result = per_rank[0]
    result = _complete(cfg, result)
    result["wall_s"] = time.perf_counter() - start
    return result


def _reserve(cfg: RunConfig, held: ExitStack) -> tuple[str, str] | None:
    """Take the checkpoint folder for the run (its lock, until ``held`` closes) and return the
    checkpoint to resume, verified under the lock (:func:`checkpoint.reserved`), or None. A
    refusal (another run holds the folder, a checkpoint of another run) is a UsageError."""
    if cfg.checkpoint is None:
        return None
    try:
        record = checkpoint.record(cfg.record(), *data.load("train", data_dir=cfg.data_dir))
        resume, notes = held.enter_context(checkpoint.reserved(cfg.checkpoint, record))
    except checkpoint.CheckpointError as err:
        raise UsageError(str(err)) from None
    for line in notes:
        print(f"checkpoint: {line}", file=sys.stderr, flush=True)
    return resume


def _complete(cfg: RunConfig, result: dict) -> dict:
    """The JSON object of the contract: the configuration, then rank 0's results."""
    config = {k: v for k, v in asdict(cfg).items() if k not in ("json", "eval")}
    return {**config, "threads": cfg.threads_per_worker, **result}


def under_torchrun(cfg: RunConfig) -> int:
    """Run as one worker of a ``torchrun`` job: ranks and rendezvous come from the environment
    (env://); rank 0 prints and writes the JSON, and holds the checkpoint folder for the job (the
    other ranks, on every node, load what it verified). Leaves through ``exit_cleanly``."""
    start = time.perf_counter()
    me = launch.worker(cfg.device)
    cfg.nproc = me.world_size  # torchrun decides the number of workers
    code = 0
    try:
        validate(cfg, local_workers=int(os.environ.get("LOCAL_WORLD_SIZE", me.world_size)))
        with ExitStack() as held, launch.process_group(cfg.device, cfg.timeout):
            resume = [_reserve(cfg, held) if me.is_main else None]
            dist.broadcast_object_list(resume, src=0)  # every rank loads what rank 0 verified
            result = train_worker(cfg, me.is_main and sys.stderr.isatty(), True, resume[0])
        if me.is_main:
            result = _complete(cfg, result)
            result["wall_s"] = time.perf_counter() - start
            report(cfg, result)
    except UsageError as err:
        _error(err, me.is_main)
        code = 2
    except FAILURES as err:
        _error(err, me.is_main)
        code = 1
    except BaseException as err:
        if postmortem.collective_failure(err):  # every rank, not only rank 0: each says where
            _error(postmortem.where_it_failed(cfg.parallel, cfg.timeout, me.rank, err))
        else:
            traceback.print_exc()
        code = 1
    launch.exit_cleanly(code)  # gloo can abort at interpreter exit after DDP: skip teardown
    return code


def _error(err: Exception | str, show: bool = True) -> None:
    """The one line a failed run prints (under torchrun, on one rank only)."""
    if show:
        print(f"train: error: {err}", file=sys.stderr, flush=True)


def _first_rank() -> bool:
    """Whether this process speaks for a torchrun job (rank 0, or not launched at all)."""
    return os.environ.get("RANK", "0").strip() in ("0", "") or not launch.launched()


def report(cfg: RunConfig, result: dict) -> None:
    """One summary line on stdout, and the JSON file when ``--json`` asks for one."""
    summary = f"{cfg.model}: final loss {result['losses'][-1]:.4f}, "
    if result["samples_per_s"] is None:
        summary += f"nothing left to train (the checkpoint was at step {cfg.steps} already)"
    else:
        summary += f"{result['samples_per_s']:.0f} samples/s"
    if "test_accuracy" in result:
        summary += f", test accuracy {result['test_accuracy']:.2%}"
    print(summary)
    for rank, s in enumerate(result.get("profile_summary", [])):
        print(f"profile: {profiling.line(rank, s)}")
    if cfg.profile and "profile_summary" in result:
        print(f"profile: traces in {cfg.profile} (open them at https://ui.perfetto.dev)")
    if cfg.json:
        write_json(cfg.json, result)


write_json = files.write_json  # strict JSON, atomically, only over a regular file


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success; 2 and one line for bad input, before anything starts;
    1 and one line when training itself fails (a diverging loss)."""
    if launch.launched() or "RANK" in os.environ:  # torchrun's variables: are they usable?
        problem = launch.environment_error()
        if problem:
            _error(problem)
            return 2
    world_size = int(os.environ["WORLD_SIZE"]) if launch.launched() else None
    try:
        cfg = parse(argv, world_size)
    except UsageError as err:
        _error(err, _first_rank())
        return 2
    if launch.launched():  # started by torchrun (RANK, WORLD_SIZE set): this process is a worker
        return under_torchrun(cfg)
    try:
        result = run(cfg, progress=sys.stderr.isatty(), announce=True)
        report(cfg, result)
    except UsageError as err:
        _error(err)
        return 2
    except FAILURES as err:  # --parallel none: raised here
        _error(err)
        return 1
    except launch.WorkerError as err:
        if not err.late and err.kind not in {f.__name__ for f in FAILURES}:
            raise
        # a timed-out collective: the first line names the rank it waited for; a failure that
        # every rank saw (the same diverging loss): one line is the whole story
        _error(str(err).splitlines()[0] if err.late else err.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
