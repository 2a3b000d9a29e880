"""Sharded checkpoints (``--parallel fsdp``): ``torch.distributed.checkpoint`` (DCP), read safely.

Every rank writes its own shards in parallel into a folder, and a metadata file maps them to the
whole tensors, so that it loads on another number of ranks (DCP reshards). The course adds
``course.pt`` beside them: the run's configuration, its history, a SHA-256 of every file, and the
*layout*, DCP's metadata written out as plain data. The folder is written under a temporary name
nobody can guess, then renamed to ``latest.dcp``; the one it replaces is kept as ``previous.dcp``.

Why the layout: DCP's own reader unpickles ``.metadata`` with plain ``pickle`` and its non-tensor
items with ``torch.load(weights_only=False)``, so a folder from someone else could run code. Here
a resume never unpickles ``.metadata`` (it is kept, checksummed, for DCP's own tools): the metadata
is rebuilt from the layout, the files are read once into memory and checked against their
SHA-256, every item is decoded by ``torch.load(weights_only=True)``, and DCP loads from those
bytes (:class:`_Reader`): tensors only, of exactly the model's names and shapes (:class:`_Planner`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from course_utils import files, loop
from course_utils.checkpoint import (
    LATEST_DCP,
    META,
    PREVIOUS_DCP,
    CheckpointError,
    checksum,
    keep_aside,
    save_error,
    verified,
)

DTYPES = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
MALFORMED = (AttributeError, KeyError, TypeError, ValueError)  # a layout that is not the course's


def save(directory: Path, part: loop.Role, step: int, history, config: dict) -> Path | None:
    """Every rank writes its shards of the model and optimizer into a fresh temporary folder
    (DCP); the main rank adds ``course.pt`` (configuration, history, the files' checksums, the
    layout) and renames the folder to ``latest.dcp``, keeping the one it replaces."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(part.model, part.optimizer)
    tmp, failure = [None], None
    if part.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            files.sweep(directory, LATEST_DCP)  # what a killed save left behind
            tmp = [str(files.temporary_folder(directory / LATEST_DCP))]
        except OSError as err:
            failure = err
    dist.broadcast_object_list(tmp, src=0)  # its random name, to every rank
    if tmp[0] is None:
        raise save_error(directory, failure or OSError("the main rank could not start the save"))
    tmp = Path(tmp[0])
    try:
        metadata = dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    except CheckpointException as err:  # raised on every rank, whichever failed
        if part.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()  # nobody reports (and gets the others stopped) before the folder is gone
        raise save_error(directory, err) from None
    if not part.is_main:
        return None
    state = {
        "config": dict(config),
        "step": step,
        "format": "dcp",
        "files": {f.name: _sha256(f.read_bytes()) for f in sorted(tmp.iterdir())},
        "layout": describe(metadata),
        "losses": list(history.losses),
        "accuracies": list(history.accuracies),
    }
    state["sha256"] = checksum(state)
    try:
        with open(tmp / META, "xb") as f:  # a new file, in a folder only this run knows
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        keep_aside(directory, LATEST_DCP, PREVIOUS_DCP, folder=True)
        files.replace_folder(tmp, directory / LATEST_DCP, "the checkpoint")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(directory, err) from None
    return directory / LATEST_DCP


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(metadata: Metadata) -> dict:
    """DCP's metadata as plain data: each tensor's dtype, size and chunks, the names of the
    non-tensor items, and where every item lies (file, offset, length)."""
    tensors, others = {}, []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            chunks = [[list(c.offsets), list(c.sizes)] for c in md.chunks]
            dtype = str(md.properties.dtype).removeprefix("torch.")
            tensors[fqn] = {"dtype": dtype, "size": list(md.size), "chunks": chunks}
        else:
            others.append(fqn)
    items = [
        [i.fqn, None if i.offset is None else list(i.offset), s.relative_path, s.offset, s.length]
        for i, s in metadata.storage_data.items()
    ]
    return {"tensors": tensors, "others": others, "items": items}


def rebuild(layout: dict, blobs: dict[str, bytes]) -> Metadata:
    """DCP's metadata from the layout, checked: known dtypes, whole numbers, every item inside
    a file of the checkpoint. Raises ValueError (or another of :data:`MALFORMED`) otherwise."""
    entries = {}
    for fqn, t in layout["tensors"].items():
        chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in t["chunks"]]
        properties = TensorProperties(dtype=DTYPES[t["dtype"]])
        entries[fqn] = TensorStorageMetadata(properties, torch.Size(t["size"]), chunks)
    entries.update((fqn, BytesStorageMetadata()) for fqn in layout["others"])
    if not all(isinstance(fqn, str) for fqn in entries):
        raise TypeError("a name that is not text")
    storage = {}
    for fqn, offset, name, start, length in layout["items"]:
        whole = type(start) is int and type(length) is int and fqn in entries
        if not (whole and 0 <= start <= start + length <= len(blobs[name])):
            raise ValueError(f"an item of {fqn!r} lies outside its file")
        index = MetadataIndex(fqn, None if offset is None else torch.Size(offset))
        storage[index] = _StorageInfo(name, start, length)
    return Metadata(state_dict_metadata=entries, storage_data=storage)


def read(path: Path) -> dict:
    """``course.pt`` of a DCP folder, verified, with every file it names read once and checked
    (``blobs``), DCP's metadata rebuilt from the layout, and every item decoded as plain data."""
    what = f"{path.name}/{META}"
    try:
        state = verified(path / META, what)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.name} is not a checkpoint of this course (no {META})"
        ) from None
    if not isinstance(state.get("layout"), dict) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{what} has no layout (an older course wrote it): start afresh")
    blobs = {}
    for name, digest in state["files"].items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{what} names a file outside its folder ({name!r})")
        try:
            blobs[name] = files.read_regular(path / name, f"{path.name}/{name}")
        except OSError as err:
            raise CheckpointError(f"{path.name} is corrupt ({name}: {err})") from None
        if _sha256(blobs[name]) != digest:
            raise CheckpointError(f"{path.name} is corrupt ({name} does not match its checksum)")
    try:
        metadata = rebuild(state["layout"], blobs)
    except MALFORMED as err:
        raise CheckpointError(f"{what} has a malformed layout ({type(err).__name__})") from None
    for index, info in metadata.storage_data.items():  # plain data, each of its stated shape
        value = _decode(blobs, info, f"{path.name} ({index.fqn})")
        entry = metadata.state_dict_metadata[index.fqn]
        if isinstance(entry, TensorStorageMetadata):
            sizes = [c.sizes for c in entry.chunks if c.offsets == index.offset]
            if not (torch.is_tensor(value) and sizes and value.shape == sizes[0]):
                raise CheckpointError(
                    f"{path.name} is corrupt ({index.fqn} is not its stated size)"
                )
    model, optim = {}, {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and isinstance(entry, TensorStorageMetadata):
            model[fqn.removeprefix("model.")] = tuple(entry.size)
        elif fqn.startswith("optimizer.state.") and isinstance(entry, TensorStorageMetadata):
            name, _, key = fqn.removeprefix("optimizer.state.").rpartition(".")
            optim.setdefault(name, {})[key] = tuple(entry.size)
    shapes = {"model": model, "optimizer": optim}
    state.update(name=path.name, path=str(path), blobs=blobs, metadata=metadata, shapes=shapes)
    return state


def _decode(blobs: dict[str, bytes], info: _StorageInfo, what: str):
    """One item of the checkpoint, unpickled with ``weights_only`` (an allowlist)."""
    raw = blobs[info.relative_path][info.offset : info.offset + info.length]
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{what} is not plain data ({type(err).__name__})") from None


class _Reader(FileSystemReader):
    """DCP's storage reader over a checkpoint already read and verified in memory (:func:`read`):
    nothing is opened again, and the metadata is the one rebuilt from the layout."""

    def __init__(self, state: dict):
        super().__init__(state["path"])
        self.blobs, self.metadata = state["blobs"], state["metadata"]

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.metadata

    def read_data(self, plan, planner) -> Future:
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"{item.dest_index.fqn}: only tensors are loaded")
            tensor = _decode(self.blobs, info, item.dest_index.fqn)
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                tensor = tensor.narrow(dim, start, length)
            target = planner.resolve_tensor(item).detach()
            if target.shape != tensor.shape:
                raise CheckpointError(f"{item.dest_index.fqn} is not the size the model expects")
            target.copy_(tensor)
            planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done


class _Planner(DefaultLoadPlanner):
    """DCP's default load planner, strict: the checkpoint's tensors must be exactly the state's,
    by name, shape and dtype, refused in one line (DCP alone checks each size, but ignores the
    checkpoint's tensors that the state lacks, and dtypes), and no non-tensor item is loaded."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        entries = metadata.state_dict_metadata.items()
        stored = {k: v for k, v in entries if isinstance(v, TensorStorageMetadata)}
        if set(stored) != set(self.state_dict):
            differ = sorted(set(stored) ^ set(self.state_dict))
            raise CheckpointError(f"the checkpoint's tensors are not the model's ({differ[:3]})")
        for fqn, value in self.state_dict.items():
            md = stored[fqn]
            if tuple(md.size) != tuple(value.shape) or md.properties.dtype != value.dtype:
                raise CheckpointError(
                    f"the checkpoint's {fqn} is {list(md.size)} ({md.properties.dtype}), the "
                    f"model's {list(value.shape)} ({value.dtype})"
                )

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn}: only tensors are loaded")


def load_into(part: loop.Role, state: dict) -> None:
    """Every rank reads its shards, on however many ranks the checkpoint was saved (DCP
    reshards: the layout says where each piece of each tensor is), from the bytes :func:`read`
    verified. The optimizer's hyperparameters are this run's (the same: :func:`check`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(part.model, part.optimizer)  # the shapes to fill
    target = {"model": model_state, "optimizer": {"state": optim_state["state"]}}
    try:
        dcp.load(target, storage_reader=_Reader(state), planner=_Planner())
    except CheckpointException as err:  # a failure on any rank, wrapped: ours has the one line
        ours = [e for e, _ in err.failures.values() if isinstance(e, CheckpointError)]
        raise (
            ours[0] if ours else CheckpointError(f"{state['name']} could not be loaded")
        ) from None
    optim_state["state"] = target["optimizer"]["state"]
    set_state_dict(
        part.model, part.optimizer, model_state_dict=target["model"], optim_state_dict=optim_state
    )
