"""Save and resume a run, for every strategy (lesson 05, the entry point's ``--checkpoint DIR``).

A checkpoint holds what the next steps depend on: the weights, the optimizer's state (SGD's
momentum), the number of steps done (the batches are a function of seed and step, so no data
position is needed), the metrics so far (so that a resumed run reports every step), and the run's
configuration. Nothing is lost:

- **in the whole model's names.** Weights and optimizer state are stored by the full model's
  parameter names, whatever the strategy: a pipeline stage contributes its slices, gathered on
  rank 0. So a run resumes on another number of workers (the same global batch is the same
  arithmetic), and the file loads into a plain model;
- **atomic, with a spare.** Written under a temporary name nobody can guess, then renamed
  (:mod:`course_utils.files`); the checkpoint it replaces is kept as ``previous.pt``. A crash
  while saving leaves both intact; a failed save (a full disk) leaves nothing half-written;
- **checksummed.** A SHA-256 of every tensor and number inside; a checkpoint whose contents do not
  match (a flipped byte) is refused, set aside as ``*.corrupt``, and the previous good one is used;
- **knowing its run.** Resuming with other arithmetic (another model, batch, learning rate, seed
  or strategy), on other training data (its SHA-256 is recorded), or into a model whose tensors
  are not exactly the checkpoint's (names and shapes: nothing is broadcast into place) would mix
  two runs in one record: :func:`check` refuses, naming what differs;
- **one run at a time.** :func:`reserved` holds the folder's lock from the check to the last save:
  a second run into the same folder is refused. The workers load only the checkpoint the check
  verified (its name and SHA-256), read and verified again as they load it (:func:`load`).

**A checkpoint from someone else can't run code.** Every file a resume reads is a regular file
(a symlink, a FIFO or a device is refused unopened), read once into memory, unpickled only by
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts: an allowlist) and
checked against its SHA-256 from those same bytes. The checksum proves a checkpoint intact, not who
wrote it: one from someone else can still hold weights of their choosing, nothing more.

A sharded run (``--parallel fsdp``) saves through ``torch.distributed.checkpoint`` (DCP) instead,
a folder ``latest.dcp`` with ``course.pt`` beside the shards: :mod:`.sharded`.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from course_utils import files, loop

LATEST, PREVIOUS = "latest.pt", "previous.pt"
LATEST_DCP, PREVIOUS_DCP, META = "latest.dcp", "previous.dcp", "course.pt"  # sharded runs
NEWEST_FIRST = (LATEST, LATEST_DCP, PREVIOUS, PREVIOUS_DCP)
# Settings that change the numbers: a checkpoint resumes only under the same ones. (The number of
# workers does not: the global batch is the same arithmetic, to float32 rounding.)
ARITHMETIC = ("model", "parallel", "batch_size", "lr", "seed", "optimizer", "augment")
ARITHMETIC += ("compress", "precision")  # how gradients travel, the step's dtypes
# what a checkpoint written before a setting existed ran with
UNRECORDED = {"compress": "none", "precision": "fp32"}


class CheckpointError(ValueError):
    """A checkpoint that can't be resumed: corrupt, or from a run with other arithmetic."""


class SaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a folder taken away): the run stops
    with one line, and nothing half-written is left."""


def assemble(pieces) -> dict[str, torch.Tensor]:
    """Whole-model tensors by name from ``(name, first row, tensor)`` pieces (slices joined)."""
    by_name: dict[str, list] = {}
    for name, row, tensor in pieces:
        by_name.setdefault(name, []).append((row, tensor))
    return {k: torch.cat([t for _, t in sorted(v, key=lambda p: p[0])]) for k, v in by_name.items()}


def checksum(state: dict) -> str:
    """SHA-256 of everything in ``state`` but its ``sha256`` entry: keys, numbers, tensor bytes."""
    digest = hashlib.sha256()

    def walk(value) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key != "sha256":
                    digest.update(repr(key).encode())
                    walk(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"[{len(value)}".encode())
            for item in value:
                walk(item)
        elif torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(
                tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            )
        else:
            digest.update(repr(value).encode())

    walk(state)
    return digest.hexdigest()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU; a DTensor (a tensor-parallel slice) is gathered whole first: a
    collective, which every rank reaches in the same order (the parameters' order)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def _pieces(part: loop.Role) -> tuple[list, list]:
    """This rank's weights and optimizer state as pieces of the whole model's tensors."""
    weights, optim = [], []
    for name, row, param in part.params:
        weights.append((name, row, _whole(param)))
        for key, value in part.optimizer.state.get(param, {}).items():
            sliced = torch.is_tensor(value) and value.shape == param.shape
            value = _whole(value) if torch.is_tensor(value) else value
            optim.append((name, row if sliced else None, key, value))
    return weights, optim


def save(directory: str | Path, part: loop.Role, step: int, history, config: dict) -> Path | None:
    """Save after ``step`` steps. Every rank calls it (a pipeline's stages are gathered on the main
    rank, a collective); the main rank writes and returns the path, the others None."""
    if part.sharded:
        from course_utils.checkpoint import sharded

        return sharded.save(Path(directory), part, step, history, config)
    weights, optim = _pieces(part)
    if not part.holds_all and dist.is_available() and dist.is_initialized():
        everything = [None] * dist.get_world_size() if part.is_main else None
        dist.gather_object((weights, optim), everything, dst=0)
        if not part.is_main:
            return None
        weights = [p for w, _ in everything for p in w]
        optim = [p for _, o in everything for p in o]
    if not part.is_main:
        return None
    state = {
        "config": dict(config),
        "step": step,  # steps completed; the batches are a function of (seed, step)
        "model": assemble(weights),  # the whole model's state_dict
        "optimizer": _assemble_optimizer(optim),  # {parameter name: {"momentum_buffer": ...}}
        "losses": list(history.losses),
        "accuracies": list(history.accuracies),
    }
    state["sha256"] = checksum(state)
    return _write(Path(directory), state)


def _assemble_optimizer(pieces) -> dict[str, dict]:
    sliced = assemble((f"{name}\0{key}", row, t) for name, row, key, t in pieces if row is not None)
    out: dict[str, dict] = {}
    for full_key, tensor in sliced.items():
        name, key = full_key.split("\0")
        out.setdefault(name, {})[key] = tensor
    for name, row, key, value in pieces:
        if row is None:  # a number per parameter (Adam's step count), the same on every slice
            out.setdefault(name, {})[key] = value
    return out


def save_error(directory, err: BaseException) -> SaveError:
    """The one line of a failed save (``err``: an OSError, or DCP's wrapper of one)."""
    failures = getattr(err, "failures", {})  # DCP's CheckpointException: an error per rank
    err = next((e for e, _ in failures.values()), err) if failures else err
    if isinstance(err, files.WriteError):  # its line says it all
        return SaveError(str(err))
    reason = getattr(err, "strerror", None) or str(err)
    return SaveError(f"can't save the checkpoint in {directory}: {reason}")


def _write(directory: Path, state: dict) -> Path:
    """Write atomically (:func:`course_utils.files.atomic_write`), keeping the checkpoint it
    replaces as PREVIOUS (if it was good); a failure leaves no temporary file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        files.sweep(directory, LATEST)  # what a killed save left behind
        keep = partial(keep_aside, directory, LATEST, PREVIOUS)
        write = partial(torch.save, state)
        return files.atomic_write(directory / LATEST, write, "the checkpoint", before_replace=keep)
    except OSError as err:
        raise save_error(directory, err) from None


def keep_aside(directory: Path, name: str, spare: str, folder: bool = False) -> None:
    """Move the checkpoint ``name`` out of the way of a new one: to ``spare`` when it is good, to
    ``name.corrupt`` when not (a corrupt checkpoint never pushes the good spare out)."""
    current = directory / name
    if not os.path.lexists(current):
        return
    try:
        _read(current)
        keep = directory / spare
    except CheckpointError:
        keep = directory / f"{name}.corrupt"
    if folder:
        files.replace_folder(current, keep, "the checkpoint")
    else:
        files.refuse_unsafe_target(keep, "the checkpoint")
        os.replace(current, keep)


def _read(path: Path) -> dict:
    """Load and verify one checkpoint file, or a DCP folder (:func:`.sharded.read`): read once,
    unpickled by ``weights_only`` (a checkpoint can't run code), checked from the same bytes."""
    if path.is_dir() and not path.is_symlink():
        from course_utils.checkpoint import sharded

        return sharded.read(path)
    state = verified(path, path.name)
    model, optim = state.get("model"), state.get("optimizer")
    if not (_named(model, torch.Tensor) and _named(optim, dict)):
        raise CheckpointError(f"{path.name} is not a checkpoint of this course (no weights)")
    optim = {name: {k: _shape(v) for k, v in d.items()} for name, d in optim.items()}
    state["shapes"] = {"model": {k: _shape(v) for k, v in model.items()}, "optimizer": optim}
    state["name"] = path.name
    return state


def _named(value, kind: type) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, kind) for k, v in value.items()
    )


def _shape(value) -> tuple | None:
    return tuple(value.shape) if torch.is_tensor(value) else None


def verified(path: Path, what: str) -> dict:
    """A course checkpoint (a dict with its configuration and SHA-256) read from ``path``."""
    try:
        raw = files.read_regular(path, what)
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except files.UnsafeFile as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:  # truncated, scrambled, or a pickle that is not plain data
        raise CheckpointError(f"{what} is unreadable ({type(err).__name__})") from None
    if not isinstance(state, dict) or "sha256" not in state or "config" not in state:
        raise CheckpointError(f"{what} is not a checkpoint of this course (no checksum)")
    if checksum(state) != state["sha256"]:
        raise CheckpointError(f"{what} is corrupt (its contents do not match its checksum)")
    step = state.get("step")
    well_formed = isinstance(state["config"], dict) and type(step) is int and step >= 0
    if not (well_formed and _per_step(step, state.get("losses"), state.get("accuracies"))):
        raise CheckpointError(f"{what} is not a checkpoint of this course (malformed)")
    return state


def _per_step(step: int, *lists) -> bool:
    """Whether each list (losses, accuracies) holds one number for each step done."""
    return all(
        isinstance(values, list)
        and len(values) == step
        and all(type(v) in (int, float) for v in values)
        for values in lists
    )


def latest(directory: str | Path | None) -> tuple[dict | None, list[str]]:
    """The newest good checkpoint in ``directory`` (None if there is none yet) and a line for
    each one skipped. Raises :class:`CheckpointError` when checkpoints are there but none is
    good: starting afresh would write over them."""
    if directory is None or not Path(directory).is_dir():
        return None, []
    skipped = []
    for name in NEWEST_FIRST:
        path = Path(directory) / name
        if os.path.lexists(path):
            try:
                return _read(path), skipped
            except (CheckpointError, FileNotFoundError) as err:
                skipped.append(str(err))
    if skipped:
        raise CheckpointError(f"no good checkpoint in {directory}: {'; '.join(skipped)}")
    return None, []


# Resuming: the checks before a run, its lock, and loading into the model (they use the above).
from course_utils.checkpoint.resume import (  # noqa: E402
    check,
    load,
    load_into,
    record,
    reserved,
)

__all__ = [
    "ARITHMETIC",
    "LATEST",
    "LATEST_DCP",
    "PREVIOUS",
    "PREVIOUS_DCP",
    "CheckpointError",
    "SaveError",
    "assemble",
    "check",
    "checksum",
    "latest",
    "load",
    "load_into",
    "record",
    "reserved",
    "save",
]
