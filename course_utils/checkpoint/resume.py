"""Resuming a run: the checks before any worker starts (:func:`check`), the folder's lock for
the run's lifetime (:func:`reserved`), and loading into this rank's part of the model
(:func:`load`, :func:`load_into`), tensor by tensor of exactly the model's shapes."""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from course_utils import files, loop, models
from course_utils.checkpoint import (
    ARITHMETIC,
    NEWEST_FIRST,
    UNRECORDED,
    CheckpointError,
    _read,
    latest,
)


def record(settings: dict, images: np.ndarray, labels: np.ndarray) -> dict:
    """What a checkpoint remembers of a run: its ``settings`` (``RunConfig.record()``) and the
    SHA-256 of its training split, images and labels (``"data"``, which :func:`check` compares)."""
    digest = hashlib.sha256(f"{images.shape}{labels.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return {**settings, "data": digest.hexdigest()}


def check(directory: str | Path | None, config: dict) -> tuple[dict | None, list[str]]:
    """:func:`latest`, refused (:class:`CheckpointError`) when it belongs to a run with other
    arithmetic than ``config`` (or other data: ``config["data"]``, when given), has already
    trained more steps than ``config`` asks for, or does not fit the model exactly. Something
    that is not a file (a folder, for ``.dcp``) where a checkpoint goes is refused unopened."""
    _refuse_strangers(directory)
    state, skipped = latest(directory)
    if state is None:
        return None, skipped
    saved = state["config"]
    for field in ARITHMETIC:
        if saved.get(field, UNRECORDED.get(field)) != config.get(field, UNRECORDED.get(field)):
            raise CheckpointError(
                f"the checkpoint in {directory} is of a run with --{field.replace('_', '-')} "
                f"{saved.get(field)}, not {config.get(field)}: resume with the same value, or "
                "give another --checkpoint folder"
            )
    if "data" in config and saved.get("data") != config["data"]:
        recorded = f"{saved['data'][:12]}..." if saved.get("data") else "not recorded"
        raise CheckpointError(
            f"the checkpoint in {directory} was trained on other data (its training split's "
            f"SHA-256 {recorded}, this run's {config['data'][:12]}...): resume with the "
            "--data-dir it was trained on, or give another --checkpoint folder"
        )
    if state["step"] > config["steps"]:
        raise CheckpointError(
            f"the checkpoint in {directory} is at step {state['step']}, past --steps "
            f"{config['steps']}: ask for at least {state['step']} steps"
        )
    _check_shapes(f"the checkpoint in {directory}", state["shapes"], config["model"])
    return state, skipped


def _refuse_strangers(directory) -> None:
    """Refuse, unopened, what is not a file (a folder, for ``.dcp``) where a checkpoint goes or
    is set aside: a FIFO would hang the read, a symlink lead elsewhere, a device be replaced."""
    if directory is None or not Path(directory).is_dir():
        return
    for name in NEWEST_FIRST:
        for entry in (name, f"{name}.corrupt"):
            try:
                files.refuse_unsafe_target(
                    Path(directory) / entry, "the checkpoint", ".dcp" in name
                )
            except files.UnsafeFile as err:
                raise CheckpointError(str(err)) from None


def _check_shapes(what: str, shapes: dict, model: str) -> None:
    """Refuse a checkpoint whose tensors are not exactly ``model``'s: the same parameter names,
    the same shapes (a smaller tensor would be broadcast into place), optimizer state of the
    parameter's shape or a single number."""
    with torch.device("meta"):  # shapes only: no memory, no draw from the random generator
        expected = {n: tuple(p.shape) for n, p in models.build(model).named_parameters()}
    extra = sorted(set(shapes["model"]) - set(expected))
    missing = sorted(set(expected) - set(shapes["model"]))
    if extra or missing:
        raise CheckpointError(
            f"{what} does not hold the {model}'s parameters (it lacks {missing[:3] or 'none'}, "
            f"and has {extra[:3] or 'none'} besides): give another --checkpoint folder"
        )
    found = [(n, s, expected[n]) for n, s in shapes["model"].items() if s != expected[n]]
    for name, state in shapes["optimizer"].items():  # the parameter's shape, or one number
        wanted = expected.get(name)
        found += [
            (f"{name} ({k})", s, wanted) for k, s in state.items() if s not in (wanted, (), None)
        ]
    if found:
        name, shape, wanted = found[0]
        raise CheckpointError(
            f"{what} does not fit the {model}: its {name} has shape {list(shape or [])}, the "
            f"model's {list(wanted or [])}: give another --checkpoint folder"
        )


@contextmanager
def reserved(directory: str | Path | None, config: dict):
    """Hold ``directory``'s lock for the whole run (a second run is refused) and yield what to
    resume, ``(name, sha256)`` of the checkpoint :func:`check` verified under the lock (None:
    start afresh), with a line for each checkpoint skipped. Raises :class:`CheckpointError`."""
    if directory is None:
        yield None, []
        return
    with ExitStack() as stack:
        try:
            held = stack.enter_context(files.locked(directory, "the checkpoint folder"))
        except files.Busy as err:
            raise CheckpointError(str(err)) from None
        state, skipped = check(directory, config)
        notes = [f"{line}; resuming from the one before" for line in skipped]
        if not held:
            notes.append(f"{directory} can't be locked here: a second run into it is not stopped")
        yield (state and (state["name"], state["sha256"])), notes


def load(directory: str | Path, resume: tuple[str, str]) -> dict:
    """The checkpoint :func:`reserved` verified, ``resume = (name, sha256)``, read and verified
    in one pass: refused (:class:`CheckpointError`) if it is no longer that one."""
    name, digest = resume
    try:
        state = _read(Path(directory) / name)
    except FileNotFoundError:
        state = {"sha256": None}
    if state["sha256"] != digest:
        raise CheckpointError(
            f"{name} in {directory} changed after the run checked it (another program writes "
            "there): start the run again"
        )
    return state


def load_into(part: loop.Role, state: dict) -> None:
    """Copy this rank's share (whole tensors, or a stage's slices) of ``state`` into its
    parameters and optimizer, each of exactly the parameter's shape (never broadcast)."""
    if part.sharded:
        from course_utils.checkpoint import sharded

        return sharded.load_into(part, state)
    for name, row, param in part.params:
        rows = slice(row, row + param.shape[0]) if param.dim() else slice(None)
        with torch.no_grad():
            _local(param).copy_(
                _shard_like(_piece(state["model"].get(name), rows, param, name), param)
            )
        saved = state["optimizer"].get(name, {})
        state_of_param = {}
        for key, value in saved.items():  # a tensor per element (momentum), or a step count
            if torch.is_tensor(value) and value.dim():
                value = _shard_like(_piece(value, rows, param, f"{name} ({key})"), param, keep=True)
            state_of_param[key] = value
        part.optimizer.state[param] = state_of_param


def _piece(whole, rows: slice, param, what: str) -> torch.Tensor:
    """``whole[rows]``, refused unless it has exactly ``param``'s shape."""
    piece = None
    if torch.is_tensor(whole):
        piece = whole[rows] if whole.dim() else whole
    if piece is None or piece.shape != param.shape:
        shape = list(whole.shape) if torch.is_tensor(whole) else "missing"
        raise CheckpointError(
            f"the checkpoint's {what} is {shape}, the model's {list(param.shape)}"
        )
    return piece


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_like(whole: torch.Tensor, param, keep: bool = False):
    """``whole`` as ``param`` holds it: this rank's slice of a DTensor parameter (as a DTensor
    when ``keep``, for optimizer state), or the tensor itself, on the parameter's device."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        mine = distribute_tensor(
            whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
        return mine if keep else mine.to_local()
    return whole.clone().to(param.device)
