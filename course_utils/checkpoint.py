"""Save and resume a run, for every strategy (lesson 05, the entry point's ``--checkpoint DIR``).

A checkpoint holds what the next steps depend on: the weights, the optimizer's state (SGD's
momentum), the number of steps done (the batches are a function of seed and step, so no data
position is needed), the metrics so far (so that a resumed run reports every step), and the run's
configuration. Nothing is lost:

- **in the whole model's names.** Weights and optimizer state are stored by the full model's
  parameter names, whatever the strategy: a pipeline stage contributes its slices, gathered on
  rank 0. So a run resumes on another number of workers (the same global batch is the same
  arithmetic), and the file loads into a plain model;
- **atomic, with a spare.** Written to a temporary file, then renamed; the checkpoint it replaces
  is kept as ``previous.pt``. A crash while saving leaves both intact;
- **checksummed.** A SHA-256 of every tensor and number inside; a checkpoint whose contents do not
  match (a flipped byte) is refused, set aside as ``*.corrupt``, and the previous good one is used;
- **knowing its run.** Resuming with other arithmetic (another model, batch, learning rate, seed
  or strategy) would mix two runs in one record: :func:`check` refuses, naming the field.

A sharded run (``--parallel fsdp``) saves through ``torch.distributed.checkpoint`` (DCP) instead:
a folder, ``latest.dcp``, where every rank writes its own shards in parallel and a metadata file
maps them to the whole tensors, so that it loads on another number of ranks (DCP reshards). The
course adds ``course.pt`` beside them: the run's configuration, its history and a SHA-256 of every
file; the folder is written under a temporary name, then renamed, and the one it replaces is kept
as ``previous.dcp``, exactly like the single files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from course_utils import loop
from course_utils.launch import processes

LATEST, PREVIOUS = "latest.pt", "previous.pt"
LATEST_DCP, PREVIOUS_DCP, META = "latest.dcp", "previous.dcp", "course.pt"  # sharded runs
# Settings that change the numbers: a checkpoint resumes only under the same ones. (The number of
# workers does not: the global batch is the same arithmetic, to float32 rounding.)
ARITHMETIC = ("model", "parallel", "batch_size", "lr", "seed", "optimizer", "augment")


class CheckpointError(ValueError):
    """A checkpoint that can't be resumed: corrupt, or from a run with other arithmetic."""


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
        return _save_sharded(Path(directory), part, step, history, config)
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


def _write(directory: Path, state: dict) -> Path:
    """Write atomically; keep the checkpoint it replaces as PREVIOUS (if it was good)."""
    directory.mkdir(parents=True, exist_ok=True)
    _sweep_temporary_files(directory)
    latest, tmp = directory / LATEST, directory / f".{LATEST}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if latest.exists():
        try:
            _read(latest)
            os.replace(latest, directory / PREVIOUS)
        except CheckpointError:  # never let a corrupt file push the good spare out
            os.replace(latest, directory / f"{LATEST}.corrupt")
    os.replace(tmp, latest)
    return latest


def _sweep_temporary_files(directory: Path) -> None:
    """Remove half-written files that a killed save left behind (their writer is gone)."""
    for path in directory.glob(f".{LATEST}.*.tmp"):
        match = re.fullmatch(rf"\.{re.escape(LATEST)}\.(\d+)\.tmp", path.name)
        if match and not processes.alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    """Load and verify one checkpoint file (``weights_only``: a checkpoint can't run code), or a
    DCP folder's ``course.pt`` and the checksums of its files."""
    if path.is_dir():
        return _read_sharded(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or scrambled: unreadable
        raise CheckpointError(f"{path.name} is unreadable ({type(err).__name__})") from None
    if not isinstance(state, dict) or "sha256" not in state or "config" not in state:
        raise CheckpointError(f"{path.name} is not a checkpoint of this course (no checksum)")
    if checksum(state) != state["sha256"]:
        raise CheckpointError(f"{path.name} is corrupt (its contents do not match its checksum)")
    return state


def latest(directory: str | Path | None) -> tuple[dict | None, list[str]]:
    """The newest good checkpoint in ``directory`` (None if there is none yet) and a line for
    each file skipped. Raises :class:`CheckpointError` when checkpoints are there but none is
    good: starting afresh would write over them."""
    if directory is None or not Path(directory).is_dir():
        return None, []
    skipped = []
    for name in (LATEST, LATEST_DCP, PREVIOUS, PREVIOUS_DCP):
        path = Path(directory) / name
        if path.exists():
            try:
                return _read(path), skipped
            except CheckpointError as err:
                skipped.append(str(err))
    if skipped:
        raise CheckpointError(f"no good checkpoint in {directory}: {'; '.join(skipped)}")
    return None, []


def check(directory: str | Path | None, config: dict) -> tuple[dict | None, list[str]]:
    """:func:`latest`, refused (:class:`CheckpointError`) when it belongs to a run with other
    arithmetic than ``config``, or has already trained more steps than ``config`` asks for."""
    state, skipped = latest(directory)
    if state is None:
        return None, skipped
    saved = state["config"]
    for field in ARITHMETIC:
        if saved.get(field) != config.get(field):
            raise CheckpointError(
                f"the checkpoint in {directory} is of a run with --{field.replace('_', '-')} "
                f"{saved.get(field)}, not {config.get(field)}: resume with the same value, or "
                "give another --checkpoint folder"
            )
    if state["step"] > config["steps"]:
        raise CheckpointError(
            f"the checkpoint in {directory} is at step {state['step']}, past --steps "
            f"{config['steps']}: ask for at least {state['step']} steps"
        )
    return state, skipped


def load_into(part: loop.Role, state: dict) -> None:
    """Copy this rank's share (whole tensors, or a stage's slices) of ``state`` into its
    parameters and optimizer."""
    if part.sharded:
        return _load_sharded(part, state["path"])
    for name, row, param in part.params:
        rows = slice(row, row + param.shape[0]) if param.dim() else slice(None)
        with torch.no_grad():
            _local(param).copy_(_shard_like(state["model"][name][rows], param))
        saved = state["optimizer"].get(name, {})
        part.optimizer.state[param] = {
            key: (_shard_like(value[rows], param, keep=True) if _sliced(value, param) else value)
            for key, value in saved.items()
        }


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


def _sliced(value, param) -> bool:
    return torch.is_tensor(value) and value.dim() == param.dim() and value.dim() > 0


# --- sharded runs: torch.distributed.checkpoint ----------------------------------------------------


def _save_sharded(directory: Path, part: loop.Role, step: int, history, config: dict):
    """Every rank writes its shards of the model and optimizer into a temporary folder (DCP); the
    main rank adds ``course.pt`` (configuration, history, the files' checksums) and renames the
    folder to ``latest.dcp``, keeping the one it replaces as ``previous.dcp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(part.model, part.optimizer)
    tmp = directory / f".{LATEST_DCP}.step{step}.tmp"  # the same name on every rank
    if part.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f".{LATEST_DCP}.*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if not part.is_main:
        return None
    state = {
        "config": dict(config),
        "step": step,
        "format": "dcp",
        "files": {f.name: _file_sha256(f) for f in sorted(tmp.iterdir())},
        "losses": list(history.losses),
        "accuracies": list(history.accuracies),
    }
    state["sha256"] = checksum(state)
    with open(tmp / META, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    latest = directory / LATEST_DCP
    if latest.exists():
        try:
            _read(latest)
            keep = directory / PREVIOUS_DCP
        except CheckpointError:  # never let a corrupt folder push the good spare out
            keep = directory / f"{LATEST_DCP}.corrupt"
        shutil.rmtree(keep, ignore_errors=True)
        os.replace(latest, keep)
    os.replace(tmp, latest)
    return latest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sharded(path: Path) -> dict:
    meta = path / META
    if not meta.is_file():
        raise CheckpointError(f"{path.name} is not a checkpoint of this course (no {META})")
    state = _read(meta)
    for name, digest in state["files"].items():
        if not (path / name).is_file() or _file_sha256(path / name) != digest:
            raise CheckpointError(f"{path.name} is corrupt ({name} does not match its checksum)")
    state["path"] = str(path)  # where the shards are (load_into reads them)
    return state


def _load_sharded(part: loop.Role, path: str) -> None:
    """Every rank reads its shards, on however many ranks the checkpoint was saved (DCP
    reshards: the metadata says where each piece of each tensor is)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(part.model, part.optimizer)  # the shapes to fill
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        part.model,
        part.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
