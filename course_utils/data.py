"""MNIST for the course: the bundled 5,000-image subset, or the full set where a learner has it.

The subset ships inside the package, ``course_utils/datasets/mnist_5k.npz`` (provenance, license
and checksum in the repository's ``data/README.md``), so the course runs wherever the package is
installed, with a fixed split: 4,000 training and 1,000 test images, balanced across digits. The
full set is read from the four original IDX files, from the first folder of: the ``data_dir``
argument (``--data-dir`` on the command line), the ``COURSE_DATA_DIR`` environment variable, and
``data/mnist/`` of the repository when the package runs from a checkout.

Batches are drawn by index, deterministically from a seed and a step number, so that N data-parallel
workers can each take their slice of *the same* global batch one process would have used
(lesson 05 relies on it).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PACKAGE_DIR = Path(__file__).resolve().parent
SUBSET_PATH = PACKAGE_DIR / "datasets" / "mnist_5k.npz"
SUBSET_SHA256 = "4b84859b44455f8a525644d3a243d8a768ab925645d939ce5683ba7bea10871b"
REPO_FULL_DIR = PACKAGE_DIR.parent / "data" / "mnist"  # in a checkout of the course repository
DATA_DIR_VARIABLE = "COURSE_DATA_DIR"  # a learner's own setting: where the full MNIST is
FULL_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The usual MNIST normalisation constants (mean and std of the training pixels in [0, 1]).
MEAN, STD = 0.1307, 0.3081
BACKGROUND = (0.0 - MEAN) / STD  # a blank pixel after normalisation
SHIFT = 2  # augmentation: pixels an image may move, each way, along each axis

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """The dataset is missing, incomplete, malformed, or does not match its checksum."""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify(path: Path = SUBSET_PATH, expected: str = SUBSET_SHA256) -> Path:
    """Raise :class:`DataError` unless ``path`` exists and has the expected SHA-256."""
    path = Path(path)
    restore = (
        "reinstall course_utils, or in the repository `git checkout -- course_utils/datasets/`"
    )
    if not path.is_file():
        raise DataError(f"MNIST subset not found at {path}: it ships with the package; {restore}")
    actual = sha256(path)
    if actual != expected:
        raise DataError(
            f"{path.name} is corrupt: SHA-256 {actual[:12]}... does not match the recorded "
            f"{expected[:12]}... (data/README.md); {restore}"
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the format of the original MNIST files), gzipped or not. Anything else
    is a :class:`DataError`: the header's sizes are checked against the bytes the file holds
    before an array is made of them."""
    path = Path(path)
    if not os.path.isfile(path):  # follows links; a FIFO would wait for a writer, /dev/zero not end
        what = "a broken symbolic link" if os.path.islink(path) else "not a regular file"
        raise DataError(f"{path.name} in {path.parent} is {what}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path.name} in {path.parent} can't be read ({err.strerror})") from None
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path.name} is not a valid gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path.name} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    offset = 4 + 4 * ndim  # the magic number, then one 4-byte size per dimension
    if len(raw) < offset:
        raise DataError(f"{path.name}: its header of {ndim} sizes is cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize  # Python integers: huge sizes can't overflow
    if len(raw) - offset != expected:
        raise DataError(
            f"{path.name}: header says {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - offset} bytes of values"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find(name: str, folder: Path) -> Path | None:
    """The file ``name`` or ``name.gz`` in ``folder``; whatever is there under that name, so that
    :func:`read_idx` can say what is wrong with it (a broken link, a FIFO)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if os.path.lexists(candidate):
            return candidate
    return None


def full_dir(data_dir: str | Path | None = None) -> Path:
    """The folder the full MNIST is read from: ``data_dir``, else ``$COURSE_DATA_DIR``, else the
    repository's ``data/mnist/``."""
    chosen = data_dir or os.environ.get(DATA_DIR_VARIABLE)
    return Path(chosen).expanduser() if chosen else REPO_FULL_DIR


def missing_files(folder: str | Path | None = None) -> list[str]:
    """The original MNIST files not in ``folder`` (default :func:`full_dir`), gzipped or not."""
    folder = full_dir(folder)
    return [n for pair in FULL_FILES.values() for n in pair if not _find(n, folder)]


def has_full(folder: str | Path | None = None) -> bool:
    """True when all four original MNIST IDX files are in ``folder`` (default :func:`full_dir`)."""
    return not missing_files(folder)


@lru_cache(maxsize=4)
def _load_subset(path: Path) -> dict[str, np.ndarray]:
    with np.load(verify(path)) as npz:
        return {k: npz[k] for k in npz.files}


def _read_full(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split of the full MNIST, checked: (N, 28, 28) uint8 images, N labels in 0..9."""
    images_name, labels_name = FULL_FILES[split]
    images, labels = read_idx(_find(images_name, folder)), read_idx(_find(labels_name, folder))
    for name, array, ndim in ((images_name, images, 3), (labels_name, labels, 1)):
        if array.dtype != np.uint8:
            raise DataError(f"{name} holds {array.dtype} values; MNIST files hold bytes (uint8)")
        if array.ndim != ndim:
            raise DataError(f"{name} has shape {array.shape}; expected {ndim} dimensions")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_name} holds {images.shape[1:]} images; MNIST's are 28x28")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_name} holds a label {labels.max()}; digits are 0..9")
    if len(images) != len(labels):
        raise DataError(f"{images_name} has {len(images)} images but {labels_name} {len(labels)}")
    return images, labels


def load(
    split: str = "train", source: str = "auto", data_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of one split.

    ``source``: ``"subset"`` (bundled 5k), ``"full"`` (the IDX files in :func:`full_dir`), or
    ``"auto"``: full when a folder was named (``data_dir``, ``$COURSE_DATA_DIR``) or the
    repository's ``data/mnist/`` holds all four files, the subset when it holds none, and an error
    naming the missing files otherwise (a half-copied dataset is a mistake, not a choice).
    """
    if split not in FULL_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source not in ("auto", "subset", "full"):
        raise ValueError(f"source must be 'auto', 'subset' or 'full', got {source!r}")
    folder = full_dir(data_dir)
    named = bool(data_dir or os.environ.get(DATA_DIR_VARIABLE))
    missing = missing_files(folder) if source != "subset" else []
    if source == "full" or (source == "auto" and (named or len(missing) < 4)):
        if not os.path.isdir(folder):
            raise DataError(f"full MNIST not found: {folder} {_not_a_folder(folder)}")
        if missing:
            what = "full MNIST not found" if len(missing) == 4 else "full MNIST incomplete"
            raise DataError(
                f"{what} in {folder}: missing {', '.join(missing)} (each may end in .gz)"
            )
        images, labels = _read_full(split, folder)
    else:
        arrays = _load_subset(SUBSET_PATH)
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    return images, labels.astype(np.int64)


def _not_a_folder(path: Path) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a broken symbolic link (to {os.readlink(path)})"
    return "is not a folder" if os.path.lexists(path) else "does not exist"


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` → float32 ``(N, 1, 28, 28)``, scaled to [0, 1] then standardised."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    return ((x - MEAN) / STD).unsqueeze(1)  # (N, 1, 28, 28): one input channel


def mnist(
    split: str = "train",
    limit: int | None = None,
    source: str = "auto",
    data_dir: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors ``X`` (N, 1, 28, 28) float32, normalised, and ``y`` (N,) int64; first ``limit`` only."""
    images, labels = load(split, source, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize(images), torch.as_tensor(labels)


def as_sequence(X: torch.Tensor) -> torch.Tensor:
    """The RNN view of images: (N, 1, 28, 28) → (N, 28, 28) = 28 time steps of 28 features (rows)."""
    return X.reshape(X.shape[0], X.shape[-2], X.shape[-1])


def batch_indices(num_samples: int, batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """Indices of the global batch at ``step``: a fresh seeded permutation each epoch, last partial
    batch dropped. The same (seed, step) always gives the same batch, in any process."""
    if not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size must be in 1..{num_samples}, got {batch_size}")
    steps_per_epoch = num_samples // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return perm[i * batch_size : (i + 1) * batch_size]


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch (the batch must divide evenly)."""
    if len(indices) % world_size:
        raise ValueError(f"batch of {len(indices)} does not divide among {world_size} workers")
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


def shifted(X: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image of ``X`` ((N, 1, 28, 28), or (N, 28, 28) rows) moved by its ``(dy, dx)`` in
    ``offsets`` (N, 2), at most :data:`SHIFT` pixels each way; the uncovered border is background."""
    images = X if X.dim() == 4 else X.unsqueeze(1)  # (N, C, H, W)
    N, _, H, W = images.shape
    padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT), value=BACKGROUND)  # (N, C, H+2S, W+2S)
    rows = (SHIFT - offsets[:, 0])[:, None] + torch.arange(H)  # (N, H): source row of each row
    cols = (SHIFT - offsets[:, 1])[:, None] + torch.arange(W)  # (N, W)
    picked = padded[torch.arange(N)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = picked.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return out if X.dim() == 4 else out[:, 0]


def random_offsets(batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """The shifts of the global batch at ``step``: (batch_size, 2) in -SHIFT..SHIFT, a function
    of (seed, step) only, so every worker draws the same and takes its slice."""
    g = torch.Generator().manual_seed(2**31 + seed * 65_537 + step)
    return torch.randint(-SHIFT, SHIFT + 1, (batch_size, 2), generator=g)


def batches(
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    num_steps: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    augment: bool = False,
):
    """Yield the batches ``(X, y)`` of steps ``start_step .. num_steps - 1``; with ``world_size > 1``,
    this rank's shard of each global batch, so that the ranks' shards together are one process's
    batch. ``start_step`` lets a resumed run continue with exactly the batches it would have seen.
    ``augment``: each image shifted by up to :data:`SHIFT` pixels, the shifts a function of (seed,
    step) like the batch itself, so augmentation keeps N workers equal to one process."""
    for step in range(start_step, num_steps):
        idx = batch_indices(len(X), batch_size, step, seed)
        mine = shard(torch.arange(batch_size), rank, world_size)  # positions in the global batch
        X_b, y_b = X[idx[mine]], y[idx[mine]]
        if augment:
            X_b = shifted(X_b, random_offsets(batch_size, step, seed)[mine])
        yield X_b, y_b
