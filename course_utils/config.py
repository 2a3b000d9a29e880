"""One training run's settings, the command line built from them, and the checks that run before
any worker starts (the contract of ``python -m course_utils.train``: docs/architecture.md).

``--batch-size`` is always the *global* batch: a data-parallel or pipeline run with the same batch
and seed does the same arithmetic as ``--parallel none`` and reports the same per-step losses.
Bad input raises :class:`UsageError`: one line, exit status 2, before anything is started or
written.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from course_utils import checkpoint, compression, data, hardware, models, parallelize, profiling
from course_utils.launch.runner import MAX_WORKERS_PER_CORE
from course_utils.precision import config_error as precision_error

MAX_SEED = 2**31 - 1  # seeds index torch generators (with room for the epoch number)
# The learning rate is applied in the parameters' dtype (every model is float32). Below float32's
# smallest normal number the rate is subnormal (fewer than 24 significant bits; 1e-46 is 0): not
# the rate asked for, and with gradients of the course's size (|g| <= ~1) each step is below half
# an ulp of any weight above 2**-126 * 2**24 ~ 2e-31, so no weight ever moves. Higher rates can
# still move some weights (Adam's first step is lr itself): where they stop mattering depends on
# the model, so the line is drawn where it holds for all. Above float32's largest it is infinite.
LR_DTYPE = torch.finfo(torch.float32)
# A --json file is written through a temporary file beside it, ".NAME.PID." + tempfile's 8
# random characters + ".tmp" (course_utils.files): at most 22 bytes more than the name (a PID
# has up to 7 digits); 32 leaves room to spare.
TEMPORARY_NAME_ROOM = 32
PATH_FIELDS = ("json", "checkpoint", "profile", "data_dir")  # the fields that name a path


@dataclass
class RunConfig:
    """One training run. Each field is a CLI flag (``batch_size`` → ``--batch-size``)."""

    model: str = "cnn"  # "cnn", "rnn" (the article's), "transformer", "pixels" (long), "moe"
    parallel: str = "none"  # strategy: "none", "ddp", "fsdp", "tp" (tensor parallel), "pipeline"
    nproc: int = 1  # worker processes (replicas, tensor-parallel ranks or pipeline stages)
    tp: int = 1  # with ddp or fsdp: tensor-parallel ranks per replica (2-D mesh: nproc = dp x tp)
    tp_outer: bool = False  # with --tp: tp ranks nproc / tp apart, not adjacent (tp across nodes)
    cp: int = 1  # context-parallel ranks: each holds part of every sequence (ring attention)
    ep: int = 1  # expert-parallel ranks: each holds some of the MoE's experts (all-to-all)
    replicate: int = 1  # fsdp only: HSDP, R replicas of shards over nproc / R consecutive ranks
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
    json: str | None = None  # write the results to this file (default: none written)
    checkpoint: str | None = None  # folder to save to and resume from (default: none kept)
    checkpoint_every: int = 0  # save every K steps (0: only at the end)
    profile: str | None = None  # folder for one torch.profiler trace per rank (default: none)
    data_dir: str | None = None  # folder with the full MNIST (default: the bundled subset)
    oversubscribe: bool = False  # allow more than 4 workers per core (MAX_WORKERS_PER_CORE)
    timeout: float = 60.0  # seconds a collective waits for the other ranks before it fails
    compress: str = "none"  # ddp only: gradients on the wire as bf16, powersgd:R, topk:F or sign
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast, loss scaling): none/ddp/fsdp

    def __post_init__(self) -> None:
        # "~" expanded once, here: the checks before the run and the writes after it use one path
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value:
                setattr(self, name, os.path.expanduser(value))

    @property
    def threads_per_worker(self) -> int:
        return self.threads or hardware.threads_per_worker(self.nproc)

    def record(self) -> dict:
        """What a checkpoint remembers of the run (checked by :func:`checkpoint.check`)."""
        kept = ("model", "parallel", "nproc", "tp", "cp", "ep", "batch_size", "steps", "lr", "seed")
        kept += ("optimizer", "augment", "microbatches", "schedule", "compress", "precision")
        return {k: v for k, v in asdict(self).items() if k in kept}


CHOICES = {
    "model": sorted(models.MODELS),
    "parallel": ["none", "ddp", "fsdp", "tp", "pipeline"],
    "optimizer": list(models.OPTIMIZERS),
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
    helps = _field_comments()
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=text)
            continue
        if f.default is not None and "default" not in text:
            text += f" (default: {f.default})"
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=text)
    return p


def _field_comments() -> dict[str, str]:
    """Each :class:`RunConfig` field's comment, its one-line help (one text for code and CLI)."""
    try:
        source = inspect.getsource(RunConfig)
    except (OSError, TypeError):  # no source (a frozen build): flags without help
        return {}
    return dict(re.findall(r"^    (\w+): [^=\n]+ = [^#\n]+  # (.+)$", source, re.MULTILINE))


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
    for name in ("cp", "ep"):
        if name in given and cfg.parallel not in ("none", "ddp", "fsdp"):
            raise UsageError(
                f"{flag(name)} is for --parallel none, ddp or fsdp (it composes with data "
                f"parallelism); this run is {cfg.parallel}"
            )
    if world_size is not None and "nproc" in given and cfg.nproc != world_size:
        raise UsageError(
            f"--nproc {cfg.nproc}, but torchrun started {world_size} workers: leave out --nproc "
            "under torchrun (its --nproc-per-node and --nnodes decide)"
        )
    return cfg


def validate(cfg: RunConfig, local_workers: int | None = None) -> None:
    """Raise :class:`UsageError` for input that can't work, before any worker starts: everything
    the run reads (the training split, and the test split with ``--eval``) is read here, and every
    path it writes at its end is checked here. ``local_workers``: workers on this machine, when
    they are not all of them (torchrun)."""
    try:
        num_train = len(data.load("train", data_dir=cfg.data_dir)[1])
        if cfg.eval:  # read only after training otherwise: a bad file would lose the run
            data.load("test", data_dir=cfg.data_dir)
    except data.DataError as err:
        raise UsageError(str(err)) from None
    cores = hardware.num_cores()
    most = MAX_WORKERS_PER_CORE * cores
    local = cfg.nproc if local_workers is None else local_workers
    checks = [
        (cfg.nproc >= 1, f"--nproc must be at least 1, got {cfg.nproc}"),
        (
            cfg.oversubscribe or local <= most,
            f"--nproc {local} is far more workers than this machine's {cores} cores (at "
            f"most {most}); add --oversubscribe to run them anyway",
        ),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (
            math.isfinite(cfg.timeout) and cfg.timeout > 0,
            f"--timeout must be a positive number of seconds, got {cfg.timeout}",
        ),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}"),
        (
            not 0 < cfg.lr < LR_DTYPE.tiny,
            f"--lr {cfg.lr} vanishes in float32, the parameters' dtype (its normal numbers start "
            f"at {LR_DTYPE.tiny:.3g}): the weights would never move",
        ),
        (
            not LR_DTYPE.max < cfg.lr < math.inf,
            f"--lr {cfg.lr} is infinite in float32, the parameters' dtype (at most "
            f"{LR_DTYPE.max:.3g})",
        ),
        (0 <= cfg.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {cfg.seed}"),
        (
            cfg.threads is None or cfg.threads >= 1,
            f"--threads must be at least 1, got {cfg.threads}",
        ),
        (
            cfg.oversubscribe or cfg.threads is None or local * cfg.threads <= most,
            f"--threads {cfg.threads} x {local} worker(s) is far more threads than this "
            f"machine's {cores} cores (at most {most}); add --oversubscribe to run them anyway",
        ),
        (
            1 <= cfg.batch_size <= num_train,
            f"--batch-size must be in 1..{num_train} (the training set), got {cfg.batch_size}",
        ),
        (cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}"),
        (
            cfg.parallel != "none" or cfg.nproc == cfg.cp * cfg.ep,
            f"--parallel none runs one process; got --nproc {cfg.nproc} (use --parallel ddp)"
            if cfg.cp * cfg.ep == 1
            else f"--parallel none with --cp {cfg.cp} and --ep {cfg.ep} runs one replica, "
            f"{cfg.cp * cfg.ep} processes; got --nproc {cfg.nproc} (use --parallel ddp)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    rooms = (parallelize.Axes.of(cfg).error, compression.config_error, precision_error)
    if error := next(filter(None, (room(cfg) for room in rooms)), None):  # the first, in order
        raise UsageError(error)
    _check_device(cfg.device, local)
    _check_output("--json", cfg.json, folder=False)
    _check_output("--checkpoint", cfg.checkpoint, folder=True)
    _check_output("--profile", cfg.profile, folder=True)
    for rank in range(cfg.nproc) if cfg.profile and os.path.isdir(cfg.profile) else ():
        trace = profiling.trace_path(cfg.profile, rank)  # the profiler opens it and writes
        kind = _kind(trace, follow=False) if os.path.lexists(trace) else "a file"
        if kind != "a file":
            raise UsageError(f"--profile {cfg.profile}: {trace.name} is {kind}, not a file")
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


def _check_output(flag: str, path: str | None, folder: bool) -> None:
    """Refuse an output path the run could not write at its end (the results would be lost), by
    the rule the writer enforces: a file is written only over a regular file or where nothing is,
    never through a symbolic link, into a device or a FIFO; a folder is an existing one (a link to
    one will do) or a new one. Nothing on the way may be a broken link or a file, and every name
    to create must fit the file system. Only metadata is read (a FIFO is never opened); one empty
    file is written and removed in the nearest existing folder."""
    if path is None:
        return
    if not path:
        raise UsageError(f"{flag} needs a {'folder' if folder else 'file'} name, got ''")
    target = Path(path)
    existing, missing = _existing_part(flag, target)
    if not missing:  # the target is there: is it what the run can write?
        kind = _kind(target, follow=folder)
        if folder and kind != "a folder":
            raise UsageError(f"{flag} {path} is {kind}; it must be a folder (or not exist yet)")
        if not folder and kind == "a folder":
            raise UsageError(f"{flag} {path} is a folder; give a file name")
        if not folder and kind != "a file":
            link = f" (to {os.readlink(target)})" if kind == "a symbolic link" else ""
            raise UsageError(
                f"{flag} {path} is {kind}{link}; results are written to a regular file (or a new "
                "one), never through a link or into a device"
            )
        existing = target if folder else target.parent
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):  # a file system that does not say: POSIX's usual 255
        name_max = 255
    room = 0 if folder else TEMPORARY_NAME_ROOM  # the temporary file beside a --json
    for name, extra in [*((name, 0) for name in missing[:-1]), (target.name, room)]:
        size = len(os.fsencode(name))
        if size + extra > name_max:
            beside = f", and {extra} more for the temporary file beside it" if extra else ""
            raise UsageError(
                f"{flag} {path}: the name {name[:16]}... is too long ({size} bytes{beside}; "
                f"a name in {existing} has at most {name_max})"
            )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".course-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path}: can't write in {existing} ({err.strerror})") from None


def _existing_part(flag: str, path: Path) -> tuple[Path, list[str]]:
    """The longest leading part of ``path`` that exists, and the names after it, which the run
    will create. Refuses a broken symbolic link and a file where a folder must be."""
    here = Path(path.anchor or ".")
    names = path.parts[1:] if path.anchor else path.parts
    for i, name in enumerate(names):
        step = here / name
        try:
            os.lstat(step)
        except FileNotFoundError:
            return here, list(names[i:])
        except NotADirectoryError:
            raise UsageError(f"{flag} {path}: {here} is {_kind(here)}, not a folder") from None
        except OSError as err:  # a folder that can't be searched, a name too long
            raise UsageError(f"{flag} {path}: {step}: {err.strerror}") from None
        if os.path.islink(step) and not os.path.exists(step):  # exists() follows the link
            where = "" if step == path else f": {step}"
            raise UsageError(
                f"{flag} {path}{where} is a broken symbolic link (to {os.readlink(step)})"
            )
        here = step
    return here, []


def _kind(path: Path, follow: bool = True) -> str:
    """What ``path`` is, in words: "a file", "a folder", "a FIFO"..."""
    mode = os.stat(path).st_mode if follow else os.lstat(path).st_mode
    kinds = (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "a socket")
