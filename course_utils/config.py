"""One training run's settings, the command line built from them, and the checks that run before
any worker starts (the contract of ``python -m course_utils.train``, in DESIGN.md and the README).

``--batch-size`` is always the *global* batch: a data-parallel or pipeline run with the same batch
and seed does the same arithmetic as ``--parallel none`` and reports the same per-step losses.
Bad input raises :class:`UsageError`: one line, exit status 2, before anything is started or
written.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from course_utils import checkpoint, data, hardware, loop, models, tensor_parallel
from course_utils.launch.runner import MAX_WORKERS_PER_CORE
from course_utils.pipeline import worker as pipeline_worker

MAX_SEED = 2**31 - 1  # seeds index torch generators (with room for the epoch number)


@dataclass
class RunConfig:
    """One training run. Each field is a CLI flag (``batch_size`` → ``--batch-size``)."""

    model: str = "cnn"  # which network: "cnn", "rnn" (the article's, corrected), "transformer"
    parallel: str = "none"  # strategy: "none", "ddp", "fsdp", "tp" (tensor parallel), "pipeline"
    nproc: int = 1  # worker processes (replicas, tensor-parallel ranks or pipeline stages)
    tp: int = 1  # with ddp or fsdp: tensor-parallel ranks per replica (2-D mesh: nproc = dp x tp)
    batch_size: int = 64  # global batch, summed over all workers
    steps: int = 100  # optimizer steps
    lr: float = 0.01  # learning rate
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw" (weight decay 0.05)
    augment: bool = False  # shift each image by up to 2 pixels (a function of seed and step)
    seed: int = 0  # seeds the weights and the order of the batches
    threads: int | None = None  # torch threads per worker; default cores // nproc, at least 1
    device: str = "auto"  # "cpu", "cuda", or "auto": a GPU per worker when there are enough
    microbatches: int = 4  # pipeline only: microbatches per global batch
    schedule: str = "gpipe"  # pipeline: gpipe, 1f1b, interleaved1f1b, zbv or dualpipev
    eval: bool = False  # report test accuracy at the end
    json: str | None = None  # write the results to this file
    checkpoint: str | None = None  # directory to save to and resume from
    checkpoint_every: int = 0  # save every K steps (0: only at the end)
    profile: str | None = None  # folder for one torch.profiler trace per rank
    data_dir: str | None = None  # folder with the full MNIST (default: the bundled subset)
    oversubscribe: bool = False  # allow more than 4 workers per core (MAX_WORKERS_PER_CORE)

    @property
    def threads_per_worker(self) -> int:
        return self.threads or hardware.threads_per_worker(self.nproc)

    def record(self) -> dict:
        """What a checkpoint remembers of the run (checked by :func:`checkpoint.check`)."""
        kept = ("model", "parallel", "nproc", "tp", "batch_size", "steps", "lr", "seed")
        kept += ("optimizer", "augment", "microbatches", "schedule")
        return {k: v for k, v in asdict(self).items() if k in kept}


CHOICES = {
    "model": sorted(models.MODELS),
    "parallel": ["none", "ddp", "fsdp", "tp", "pipeline"],
    "optimizer": list(loop.OPTIMIZERS),
    "device": list(hardware.DEVICES),
    "schedule": ["gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev"],
}
PIPELINE_ONLY = ("microbatches", "schedule")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage; we print one line
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    """The CLI, built from :class:`RunConfig`'s fields; a flag not given is absent from the
    parsed namespace (so that :func:`parse` can tell a default from a choice)."""
    p = _Parser(
        prog="python -m course_utils.train",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        p.add_argument(flag, type=kind, choices=CHOICES.get(f.name))
    return p


def parse(argv: list[str] | None = None, world_size: int | None = None) -> RunConfig:
    """A :class:`RunConfig` from command-line arguments. Raises :class:`UsageError` for what
    argparse refuses and for flags that would be silently ignored; ``world_size``: the number
    of workers a launcher (torchrun) already started, which ``--nproc`` must not contradict."""
    given = vars(parser().parse_args(argv))
    cfg = RunConfig(**given)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if "checkpoint_every" in given and cfg.checkpoint is None:
        raise UsageError("--checkpoint-every needs --checkpoint DIR (where to save)")
    for name in PIPELINE_ONLY:
        if name in given and cfg.parallel != "pipeline":
            raise UsageError(f"{flag(name)} is for --parallel pipeline; this run is {cfg.parallel}")
    if "tp" in given and cfg.parallel not in ("ddp", "fsdp"):
        raise UsageError(
            f"--tp is for --parallel ddp or fsdp (a data x tensor parallel mesh); this run is "
            f"{cfg.parallel} (--parallel tp splits every layer over all --nproc ranks)"
        )
    if world_size is not None and "nproc" in given and cfg.nproc != world_size:
        raise UsageError(
            f"--nproc {cfg.nproc}, but torchrun started {world_size} workers: leave out --nproc "
            "under torchrun (its --nproc-per-node and --nnodes decide)"
        )
    return cfg


def validate(cfg: RunConfig, local_workers: int | None = None) -> None:
    """Raise :class:`UsageError` for input that can't work, before any worker starts.
    ``local_workers``: workers on this machine, when they are not all of them (torchrun)."""
    try:
        num_train = len(data.load("train", data_dir=cfg.data_dir)[1])
    except data.DataError as err:
        raise UsageError(str(err)) from None
    cores = hardware.num_cores()
    checks = [
        (cfg.nproc >= 1, f"--nproc must be at least 1, got {cfg.nproc}"),
        (
            cfg.oversubscribe or cfg.nproc <= MAX_WORKERS_PER_CORE * cores,
            f"--nproc {cfg.nproc} is far more workers than this machine's {cores} cores (at "
            f"most {MAX_WORKERS_PER_CORE * cores}); add --oversubscribe to run them anyway",
        ),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}"),
        (0 <= cfg.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {cfg.seed}"),
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
    replicas = cfg.nproc // max(cfg.tp, 1) if cfg.parallel in ("ddp", "fsdp") else 1
    data_parallel = cfg.parallel in ("ddp", "fsdp")
    if data_parallel and cfg.nproc >= 1 and cfg.tp >= 1 and cfg.nproc % cfg.tp == 0:
        checks.append(
            (
                cfg.batch_size % replicas == 0,
                f"--batch-size {cfg.batch_size} does not divide among {replicas} data-parallel "
                f"replicas (use a multiple of {replicas})",
            )
        )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if cfg.parallel == "tp" or cfg.tp != 1:
        tp_size = cfg.nproc if cfg.parallel == "tp" else cfg.tp
        error = tensor_parallel.config_error(cfg.model, tp_size, cfg.nproc)
        if error:
            raise UsageError(error)
    _check_device(cfg.device, cfg.nproc if local_workers is None else local_workers)
    if cfg.parallel == "pipeline":
        error = pipeline_worker.config_error(
            cfg.model, cfg.nproc, cfg.batch_size, cfg.microbatches, cfg.schedule
        )
        if error:
            raise UsageError(error)
    _check_writable("--json", cfg.json, folder=False)
    _check_writable("--checkpoint", cfg.checkpoint, folder=True)
    _check_writable("--profile", cfg.profile, folder=True)
    try:
        checkpoint.check(cfg.checkpoint, cfg.record())
    except checkpoint.CheckpointError as err:
        raise UsageError(str(err)) from None


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


def _check_writable(flag: str, path: str | None, folder: bool) -> None:
    """Refuse an output path the run could not write at its end: the results would be lost.
    The check writes and removes one empty file in the nearest existing folder."""
    if path is None:
        return
    target = Path(path).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path} is a file; it must be a folder (or not exist yet)")
    if not folder and target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    existing = target if folder and target.is_dir() else target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".course-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path}: can't write in {existing} ({err.strerror})") from None
