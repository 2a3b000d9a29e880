"""Usage errors of the entry point, tried on purpose: exit 2, one line, before any worker starts,
nothing written. A bad option or one that would be ignored, torchrun's variables that don't fit, an
output path that can't be written, a broken MNIST folder or bundled subset, resuming with another
run's arguments or from checkpoints that are all corrupt.

Part of the fault suite (``tests/test_faults.py``); what would fail only at a run's end, checked
before it starts, is ``tests/test_faults_input.py``.
"""

import os
import shutil
from pathlib import Path

import pytest
from faults import TORCHRUN_VARIABLES, mnist_folder, snapshot

from course_utils import config, data, hardware, launch, train
from course_utils.config import RunConfig

RESUME = ["--checkpoint", "{tmp}/ckpt", "--batch-size", "16"]  # the playground's checkpoint
BAD_INPUTS = {  # name: (arguments, environment, what the one line must say)
    "--json onto a folder": (["--json", "{tmp}"], {}, "is a folder"),
    "--json under /proc": (["--json", "/proc/course/out.json"], {}, "can't write in /proc"),
    "--json under a file": (["--json", "{tmp}/a_file/out.json"], {}, "is a file, not a folder"),
    "--checkpoint onto a file": (["--checkpoint", "{tmp}/a_file"], {}, "must be a folder"),
    "--lr inf": (["--lr", "inf"], {}, "--lr must be a positive number"),
    "--lr 1e400": (["--lr", "1e400"], {}, "--lr must be a positive number, got inf"),
    "--lr nan": (["--lr", "nan"], {}, "--lr must be a positive number"),
    "--seed -1": (["--seed", "-1"], {}, "--seed must be in 0.."),
    "--seed 2**40": (["--seed", str(2**40)], {}, "--seed must be in 0.."),
    "--checkpoint-every alone": (["--checkpoint-every", "5"], {}, "needs --checkpoint"),
    "--microbatches with ddp": (
        ["--parallel", "ddp", "--nproc", "2", "--microbatches", "2"],
        {},
        "--microbatches is for --parallel pipeline",
    ),
    "--schedule with none": (["--schedule", "1f1b"], {}, "--schedule is for --parallel pipeline"),
    "--nproc 1000": (["--parallel", "ddp", "--nproc", "1000"], {}, "add --oversubscribe"),
    "--device cuda, no GPU": (["--device", "cuda"], {}, "--device cuda: no CUDA GPU"),
    "RANK=5 WORLD_SIZE=2": ([], {"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 does not fit"),
    "RANK=abc": ([], {"RANK": "abc"}, "RANK='abc' is not a whole number"),
    "RANK=0 WORLD_SIZE=2, no MASTER_ADDR": (
        [],
        {"RANK": "0", "WORLD_SIZE": "2"},
        "MASTER_ADDR and MASTER_PORT are not",
    ),
    "--nproc 2 under torchrun of 1": (
        ["--nproc", "2"],
        {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
        "torchrun started 1 workers",
    ),
    "--data-dir, 3 of 4 files": (
        ["--data-dir", "{tmp}/missing file"],
        {},
        "missing t10k-labels-idx1-ubyte",
    ),
    "--data-dir, no files": (["--data-dir", "{tmp}/empty"], {}, "full MNIST not found"),
    "--data-dir, label 12": (["--data-dir", "{tmp}/label 12"], {}, "holds a label 12"),
    "--data-dir, bad gzip": (["--data-dir", "{tmp}/bad gzip"], {}, "not a valid gzip file"),
    "--data-dir, int32 values": (["--data-dir", "{tmp}/int32 values"], {}, "hold bytes (uint8)"),
    "--data-dir, 20x20 images": (["--data-dir", "{tmp}/wrong shape"], {}, "MNIST's are 28x28"),
    "COURSE_DATA_DIR, 3 of 4 files": (
        [],
        {"COURSE_DATA_DIR": "{tmp}/missing file"},
        "missing t10k-labels-idx1-ubyte",
    ),
    "resume with another --batch-size": (
        ["--checkpoint", "{tmp}/ckpt", "--batch-size", "32"],
        {},
        "--batch-size 16, not 32",
    ),
    "resume with another --lr": ([*RESUME, "--lr", "0.1"], {}, "--lr 0.01, not 0.1"),
    "resume with another --seed": ([*RESUME, "--seed", "9"], {}, "--seed 0, not 9"),
    "resume with another --model": ([*RESUME, "--model", "rnn"], {}, "--model cnn, not rnn"),
    "resume with another --parallel": (
        [*RESUME, "--parallel", "ddp"],
        {},
        "--parallel none, not ddp",
    ),
    "resume with fewer --steps": ([*RESUME, "--steps", "1"], {}, "at step 2, past --steps 1"),
    "resume, both checkpoints corrupt": (
        ["--checkpoint", "{tmp}/broken"],
        {},
        "no good checkpoint",
    ),
}


@pytest.fixture
def playground(tmp_path_factory):
    """A folder with what the bad inputs point at: a file, broken MNIST folders, a checkpoint of
    a 2-step run (batch 16), and a folder whose two checkpoints are both corrupt."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "empty").mkdir()
    for fault in ("missing file", "label 12", "bad gzip", "int32 values", "wrong shape"):
        mnist_folder(tmp / fault, fault)
    train.run(RunConfig(steps=2, batch_size=16, checkpoint=str(tmp / "ckpt")), progress=False)
    (tmp / "broken").mkdir()
    for name in ("latest.pt", "previous.pt"):
        (tmp / "broken" / name).write_bytes(b"\x80\x04 scrambled")
    return tmp


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_before_any_worker_and_nothing_written(
    name, playground, monkeypatch, capsys
):
    args, env, message = BAD_INPUTS[name]
    if name.startswith("--device cuda") and hardware.num_gpus():
        pytest.skip("this machine has a GPU")
    if "/proc" in name and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    for variable in (*TORCHRUN_VARIABLES, data.DATA_DIR_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=playground))

    def no_workers(*_args, **_kwargs):
        raise AssertionError("a worker started")

    monkeypatch.setattr(launch, "run", no_workers)
    monkeypatch.setattr(train, "train_worker", no_workers)
    before = snapshot(playground)
    code = train.main([a.format(tmp=playground) for a in args])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("train: error: "), err
    assert message in err
    assert snapshot(playground) == before  # nothing written, nothing moved


def test_a_read_only_folder_for_the_results_is_refused(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anyway (and so does the run)
            pytest.skip("this user can write into read-only folders")
        with pytest.raises(config.UsageError, match="can't write"):
            config.validate(RunConfig(json=str(folder / "out.json")))
    finally:
        folder.chmod(0o755)


def test_a_missing_or_corrupt_bundled_subset_is_one_line(tmp_path, monkeypatch, capsys):
    corrupt = tmp_path / "mnist_5k.npz"
    shutil.copy(data.SUBSET_PATH, corrupt)
    with corrupt.open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff\x00\xff")
    for path, message in ((corrupt, "is corrupt"), (tmp_path / "gone.npz", "not found")):
        monkeypatch.setattr(data, "SUBSET_PATH", path)
        assert train.main(["--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
