"""One training run's settings, the command line built from them, and the checks that run before
any worker starts (the contract of ``python -m course_utils.train``, in DESIGN.md and the README).

``--batch-size`` is always the *global* batch: a data-parallel or pipeline run with the same batch
and seed does the same arithmetic as ``--parallel none`` and reports the same per-step losses.
Bad input raises :class:`UsageError`: one line, exit status 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from course_utils import data, hardware, models
from course_utils.pipeline import worker as pipeline_worker


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
    device: str = "auto"  # "cpu", "cuda", or "auto": a GPU per worker when there are enough
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
    "device": list(hardware.DEVICES),
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


def parse(argv: list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from command-line arguments (raises :class:`UsageError`)."""
    return RunConfig(**vars(parser().parse_args(argv)))


def validate(cfg: RunConfig, local_workers: int | None = None) -> None:
    """Raise :class:`UsageError` for input that can't work, before any worker starts.
    ``local_workers``: workers on this machine, when they are not all of them (torchrun)."""
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
    _check_device(cfg.device, cfg.nproc if local_workers is None else local_workers)
    if cfg.parallel == "pipeline":
        error = pipeline_worker.config_error(
            cfg.model, cfg.nproc, cfg.batch_size, cfg.microbatches, cfg.schedule
        )
        if error:
            raise UsageError(error)


def _check_device(device: str, local_workers: int) -> None:
    if device == "cuda":
        gpus = hardware.num_gpus()
        if gpus == 0:
            raise UsageError("--device cuda: no CUDA GPU is visible on this machine")
        if local_workers > gpus:
            raise UsageError(
                f"--device cuda: {local_workers} workers on this machine need {local_workers} "
                f"GPUs (one each: NCCL allows no sharing); it has {gpus}"
            )
