import gzip
import shutil

import numpy as np
import pytest
import torch

import course_utils as cu
from course_utils import data


def write_idx(path, array: np.ndarray, gz: bool = False):
    """Write ``array`` (uint8) in the IDX format of the original MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_bundled_subset_verifies_and_has_fixed_split():
    data.verify()
    x_train, y_train = data.load("train", source="subset")
    x_test, y_test = data.load("test", source="subset")
    assert x_train.shape == (4000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (1000, 28, 28)
    assert np.bincount(y_train).tolist() == [400] * 10
    assert np.bincount(y_test).tolist() == [100] * 10
    # Deterministic: the split is baked into the file, so a reload is identical.
    data._load_subset.cache_clear()
    np.testing.assert_array_equal(data.load("train", source="subset")[0], x_train)


def test_checksum_failure_is_a_clear_error(tmp_path):
    corrupt = tmp_path / "mnist_5k.npz"
    shutil.copy(data.SUBSET_PATH, corrupt)
    with corrupt.open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff\x00\xff")
    with pytest.raises(data.DataError, match="corrupt.*SHA-256"):
        data.verify(corrupt)
    with pytest.raises(data.DataError, match="corrupt"):
        data._load_subset(corrupt)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.verify(tmp_path / "nothing.npz")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"imgs{suffix}", images, gz)
    write_idx(tmp_path / f"lbls{suffix}", labels, gz)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"imgs{suffix}"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"lbls{suffix}"), labels)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(data.DataError, match="header"):
        data.read_idx(tmp_path / "short")


def test_full_mnist_from_idx_folder(tmp_path):
    rng = np.random.default_rng(1)
    sets = {}
    for split, (img_name, lbl_name) in data.FULL_FILES.items():
        n = 12 if split == "train" else 5
        sets[split] = (
            rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8),
        )
        suffix = ".gz" if split == "test" else ""  # the loader takes both forms
        write_idx(tmp_path / (img_name + suffix), sets[split][0], gz=split == "test")
        write_idx(
            tmp_path / (lbl_name + (".gz" if split == "test" else "")),
            sets[split][1],
            gz=split == "test",
        )
    assert data.has_full(tmp_path)
    for split, (images, labels) in sets.items():
        got_images, got_labels = data.load(split, source="auto", data_dir=tmp_path)
        np.testing.assert_array_equal(got_images, images)
        assert got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()
    with pytest.raises(data.DataError, match="full MNIST not found"):
        data.load("train", source="full", data_dir=tmp_path / "empty")


def test_mnist_tensors_and_sequence_view():
    X, y = cu.data.mnist("test", limit=16)
    assert X.shape == (16, 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(cu.data.mnist("train")[0].mean().item()) < 0.1  # standardised
    seq = cu.data.as_sequence(X)
    assert seq.shape == (16, 28, 28)
    torch.testing.assert_close(seq[3, 5], X[3, 0, 5])  # time step 5 is row 5


def test_batches_are_deterministic_and_shards_make_up_the_global_batch():
    a = data.batch_indices(100, 10, step=3, seed=7)
    assert torch.equal(a, data.batch_indices(100, 10, step=3, seed=7))
    assert not torch.equal(a, data.batch_indices(100, 10, step=3, seed=8))
    shards = [data.shard(a, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(shards), a)
    # one epoch of steps visits every sample once
    epoch = torch.cat([data.batch_indices(100, 10, s, seed=0) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="does not divide"):
        data.shard(a, 0, 3)
