"""The course's training entry point (contract in DESIGN.md).

    python -m course_utils.train --model cnn --parallel none --steps 50 --json out.json
    python -m course_utils.train --model rnn --steps 200 --eval
    python -m course_utils.train --model cnn --parallel ddp --nproc 2 --json out.json
    torchrun --nproc-per-node 2 -m course_utils.train --model cnn --parallel ddp

``--batch-size`` is always the *global* batch: a data-parallel or pipeline run with the same batch
and seed does the same arithmetic as ``--parallel none`` and reports the same per-step losses.
Bad input exits with status 2 and one line on stderr, before any worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from course_utils import data, hardware, models


@dataclass
class RunConfig:
    """One training run. Each field is a CLI flag (``batch_size`` → ``--batch-size``)."""

    model: str = "cnn"  # which network: "cnn" or "rnn" (the article's, corrected)
    parallel: str = "none"  # strategy: "none", "ddp" or "pipeline"
    nproc: int = 1  # worker processes (data-parallel replicas or pipeline stages)
    batch_size: int = 64  # global batch, summed over all workers
    steps: int = 100  # optimizer steps
    lr: float = 0.01  # SGD learning rate (momentum 0.9)
    seed: int = 0  # seeds the weights and the order of the batches
    threads: int | None = None  # torch threads per worker; default cores // nproc, at least 1
    microbatches: int = 4  # pipeline only: microbatches per global batch
    schedule: str = "gpipe"  # pipeline only: "gpipe", "1f1b" or "interleaved1f1b"
    eval: bool = False  # report test accuracy at the end
    json: str | None = None  # write the results to this file
    checkpoint: str | None = None  # directory to save to and resume from
    checkpoint_every: int = 0  # save every K steps (0: only at the end)

    @property
    def threads_per_worker(self) -> int:
        return self.threads or hardware.threads_per_worker(self.nproc)


CHOICES = {
    "model": sorted(models.MODELS),
    "parallel": ["none", "ddp", "pipeline"],
    "schedule": ["gpipe", "1f1b", "interleaved1f1b"],
}


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage; we print one line
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    """The CLI, built from :class:`RunConfig`'s fields and defaults."""
    p = _Parser(prog="python -m course_utils.train", description=__doc__.split("\n\n")[0])
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        p.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name))
    return p


def validate(cfg: RunConfig) -> None:
    """Raise :class:`UsageError` for input that can't work, before any worker starts."""
    num_train = len(data.load("train")[1])
    checks = [
        (cfg.nproc >= 1, f"--nproc must be at least 1, got {cfg.nproc}"),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (
            cfg.threads is None or cfg.threads >= 1,
            f"--threads must be at least 1, got {cfg.threads}",
        ),
        (
            1 <= cfg.batch_size <= num_train,
            f"--batch-size must be in 1..{num_train} (the training set), got {cfg.batch_size}",
        ),
        (cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}"),
        (
            cfg.parallel != "none" or cfg.nproc == 1,
            f"--parallel none runs one process; got --nproc {cfg.nproc} (use --parallel ddp)",
        ),
    ]
    if cfg.parallel == "ddp" and cfg.nproc >= 1:
        checks.append(
            (
                cfg.batch_size % cfg.nproc == 0,
                f"--batch-size {cfg.batch_size} does not divide among --nproc {cfg.nproc} "
                f"workers (use a multiple of {cfg.nproc})",
            )
        )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if cfg.parallel == "pipeline":
        from course_utils import pipeline

        error = pipeline.config_error(
            cfg.model, cfg.nproc, cfg.batch_size, cfg.microbatches, cfg.schedule
        )
        if error:
            raise UsageError(error)


def worker_main(cfg: RunConfig, progress: bool = False) -> dict | None:
    """What each worker runs (inside its process group, if any); rank 0 returns the results."""
    if cfg.parallel == "pipeline":
        from course_utils import pipeline

        return pipeline.train_worker(cfg)
    from course_utils import ddp

    return ddp.train_worker(cfg, progress=progress)


def run_single(cfg: RunConfig, progress: bool = True) -> dict:
    """Train in this process (``--parallel none``) and return the results dict of the contract."""
    return _complete(cfg, worker_main(cfg, progress))


def _complete(cfg: RunConfig, result: dict) -> dict:
    """The JSON object of the contract: the configuration, then rank 0's results."""
    config = {k: v for k, v in asdict(cfg).items() if k not in ("json", "eval")}
    return {**config, "threads": cfg.threads_per_worker, **result}


def run(
    cfg: RunConfig,
    progress: bool = True,
    timeout: float = 24 * 3600,
    use_gpu: bool | None = None,
) -> dict:
    """Validate and run one configuration; the notebooks' and tests' way in.

    ``--parallel none`` trains here; otherwise :func:`course_utils.launch.run` starts ``nproc``
    workers (fork from a notebook, each with its process group and thread budget) and rank 0's
    results come back. ``wall_s`` covers everything, start-up included. ``use_gpu``: as
    :func:`course_utils.launch.run` (default: a GPU per worker when there are enough); a caller
    comparing runs passes one value to all of them, so that none compares a GPU with CPUs."""
    start = time.perf_counter()
    validate(cfg)
    if cfg.parallel == "none":
        with _gpu_choice(use_gpu):
            result = run_single(cfg, progress=progress)
    else:
        from course_utils import launch

        per_rank = launch.run(
            worker_main,
            cfg.nproc,
            cfg,
            progress,
            threads=cfg.threads_per_worker,
            timeout=timeout,
            use_gpu=use_gpu,
        )
        result = _complete(cfg, per_rank[0])
    result["wall_s"] = time.perf_counter() - start
    return result


@contextmanager
def _gpu_choice(use_gpu: bool | None):
    """``--parallel none`` in this process: the choice reaches :func:`course_utils.launch.worker`
    through the variable the launcher sets for its workers, restored after."""
    old = os.environ.get("COURSE_USE_GPU")
    if use_gpu is not None:
        os.environ["COURSE_USE_GPU"] = str(int(use_gpu))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COURSE_USE_GPU", None)
        else:
            os.environ["COURSE_USE_GPU"] = old


def _under_torchrun(cfg: RunConfig) -> int:
    """Run as one worker of a ``torchrun`` job: ranks and rendezvous come from the environment
    (env://); rank 0 prints and writes the JSON. Leaves through ``exit_cleanly``."""
    from course_utils import launch

    start = time.perf_counter()
    me = launch.worker()
    cfg.nproc = me.world_size  # torchrun decides the number of workers
    code = 0
    try:
        validate(cfg)
        with launch.process_group():
            result = worker_main(cfg, progress=me.is_main and sys.stderr.isatty())
        if me.is_main:
            result = _complete(cfg, result)
            result["wall_s"] = time.perf_counter() - start
            _report(cfg, result)
    except UsageError as err:
        if me.is_main:
            print(f"train: error: {err}", file=sys.stderr)
        code = 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    launch.exit_cleanly(code)  # gloo can abort at interpreter exit after DDP: skip teardown
    return code


def _report(cfg: RunConfig, result: dict) -> None:
    summary = f"{cfg.model}: final loss {result['losses'][-1]:.4f}, "
    summary += f"{result['samples_per_s']:.0f} samples/s"
    if "test_accuracy" in result:
        summary += f", test accuracy {result['test_accuracy']:.2%}"
    print(summary)
    if cfg.json:
        write_json(cfg.json, result)


def launch_env() -> bool:
    """True in a process that torchrun (or another launcher) started as one worker of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = RunConfig(**vars(parser().parse_args(argv)))
    except UsageError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    if launch_env():  # started by torchrun (RANK, WORLD_SIZE set): this process is one worker
        return _under_torchrun(cfg)
    try:
        result = run(cfg, progress=sys.stderr.isatty())
    except UsageError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    _report(cfg, result)
    return 0


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` atomically: a crash never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
