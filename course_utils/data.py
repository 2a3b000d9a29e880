"""MNIST for the course: the bundled 5,000-image subset, or the full set where a learner has it.

The subset ships in ``data/mnist_5k.npz`` (provenance, license and checksum in ``data/README.md``)
with a fixed split: 4,000 training and 1,000 test images, balanced across digits. If the four
original IDX files are put in ``data/mnist/``, ``source="full"`` (or ``"auto"``) reads them instead.

Batches are drawn by index, deterministically from a seed and a step number, so that N data-parallel
workers can each take their slice of *the same* global batch one process would have used
(lesson 05 relies on it).
"""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SUBSET_PATH = DATA_DIR / "mnist_5k.npz"
SUBSET_SHA256 = "4b84859b44455f8a525644d3a243d8a768ab925645d939ce5683ba7bea10871b"
FULL_DIR = DATA_DIR / "mnist"
FULL_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The usual MNIST normalisation constants (mean and std of the training pixels in [0, 1]).
MEAN, STD = 0.1307, 0.3081

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """The dataset is missing or does not match its recorded checksum."""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify(path: Path = SUBSET_PATH, expected: str = SUBSET_SHA256) -> Path:
    """Raise :class:`DataError` unless ``path`` exists and has the expected SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"MNIST subset not found at {path}. It ships with the course repository: "
            "restore it with `git checkout -- data/`."
        )
    actual = sha256(path)
    if actual != expected:
        raise DataError(
            f"{path.name} is corrupt: SHA-256 {actual[:12]}... does not match the recorded "
            f"{expected[:12]}... (see data/README.md); restore it with `git checkout -- data/`."
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the format of the original MNIST files), gzipped or not."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path.name} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path.name}: header says {shape} but the file holds a different size")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find(name: str, folder: Path) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def has_full(folder: Path | None = None) -> bool:
    """True when all four original MNIST IDX files are in ``folder`` (default ``data/mnist/``)."""
    folder = Path(folder) if folder is not None else FULL_DIR
    return all(_find(n, folder) for pair in FULL_FILES.values() for n in pair)


@lru_cache(maxsize=4)
def _load_subset(path: Path) -> dict[str, np.ndarray]:
    with np.load(verify(path)) as npz:
        return {k: npz[k] for k in npz.files}


def load(
    split: str = "train", source: str = "auto", full_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of one split.

    ``source``: ``"subset"`` (bundled 5k), ``"full"`` (IDX files in ``full_dir``, default
    data/mnist/), or ``"auto"`` (full when present, else the subset).
    """
    full_dir = Path(full_dir) if full_dir is not None else FULL_DIR
    if split not in FULL_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source not in ("auto", "subset", "full"):
        raise ValueError(f"source must be 'auto', 'subset' or 'full', got {source!r}")
    if source == "full" or (source == "auto" and has_full(full_dir)):
        if not has_full(full_dir):
            raise DataError(
                f"full MNIST not found: put the four IDX files ({', '.join(FULL_FILES['train'])}, "
                f"{', '.join(FULL_FILES['test'])}, optionally .gz) in {full_dir}"
            )
        images_name, labels_name = FULL_FILES[split]
        images = read_idx(_find(images_name, full_dir))
        labels = read_idx(_find(labels_name, full_dir))
    else:
        arrays = _load_subset(SUBSET_PATH)
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` → float32 ``(N, 1, 28, 28)``, scaled to [0, 1] then standardised."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    return ((x - MEAN) / STD).unsqueeze(1)  # (N, 1, 28, 28): one input channel


def mnist(
    split: str = "train", limit: int | None = None, source: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors ``X`` (N, 1, 28, 28) float32, normalised, and ``y`` (N,) int64; first ``limit`` only."""
    images, labels = load(split, source)
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


def batches(
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    num_steps: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
):
    """Yield the batches ``(X, y)`` of steps ``start_step .. num_steps - 1``; with ``world_size > 1``,
    this rank's shard of each global batch, so that the ranks' shards together are one process's
    batch. ``start_step`` lets a resumed run continue with exactly the batches it would have seen."""
    for step in range(start_step, num_steps):
        idx = shard(batch_indices(len(X), batch_size, step, seed), rank, world_size)
        yield X[idx], y[idx]
