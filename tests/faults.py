"""What the fault suite (``test_faults*.py``) shares: the limit only a hang reaches, the variables
torchrun sets, MNIST files with a fault planted, a folder's snapshot (to show nothing was written),
and a Python child process without torchrun's variables."""

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import ROOT

from course_utils import data

HANG_GUARD_S = 60  # a limit only a hang would reach; how fast these are is for benchmarks/
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, gz: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def mnist_folder(folder: Path, fault: str = "") -> Path:
    """Four small MNIST files in ``folder``, with one ``fault`` planted."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, (images_name, labels_name) in data.FULL_FILES.items():
        images = rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=8, dtype=np.uint8)
        if split == "train" and fault == "wrong shape":
            images = images[:, :20, :20].copy()
        if split == "train" and fault == "label 12":
            labels[3] = 12
        if split == "train" and fault == "int32 values":
            write_idx(folder / images_name, images.astype(">i4"), code=0x0C)
        else:
            write_idx(folder / images_name, images)
        write_idx(folder / labels_name, labels)
    if fault == "bad gzip":
        (folder / "train-labels-idx1-ubyte").unlink()
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all")
    if fault == "missing file":
        (folder / "t10k-labels-idx1-ubyte").unlink()
    return folder


def snapshot(folder: Path) -> dict:
    """Every file and folder below ``folder``; files with their size and time of change."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


def run_python(code: str, tmp_path: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, text=True, **kwargs
    )
