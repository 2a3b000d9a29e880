"""Input checked before the run, tried on purpose: nothing trains only to fail at its end.

1. Arithmetic that can't train: a learning rate that vanishes (or overflows) in float32, more
   threads than the machine can run.
2. Output paths the run could not write at its end: through a broken symbolic link, onto a link,
   a FIFO or a device, a name too long for its temporary file, an empty name, a planted trace.
   Refused in one line (exit 2) before any worker starts, nothing written, the victim untouched.
3. The same path where it is checked and where it is written: "~" expanded once, in the config.
4. Data read at the end, read at the start: a malformed test split with ``--eval``, IDX headers
   whose sizes overflow, data files that are links to nowhere, FIFOs, or fail to read.

Part of the fault suite with ``tests/test_faults.py``.
"""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from faults import TORCHRUN_VARIABLES, mnist_folder, snapshot, write_idx

from course_utils import config, data, hardware, launch, train
from course_utils.config import RunConfig, UsageError

NAME_MAX = 255  # the usual limit; the tests ask the file system for its own
LONG = "r" * (NAME_MAX - 20) + ".json"  # fits alone (240 bytes), not with a temporary suffix
BAD_INPUTS = {  # name: (arguments, what the one line must say)
    "--lr 1e-320 (0 in float32)": (["--lr", "1e-320"], "--lr 1e-320 vanishes in float32"),
    "--lr 1e-46 (0 in float32)": (["--lr", "1e-46"], "the weights would never move"),
    "--lr 1e-40 (subnormal)": (["--lr", "1e-40"], "vanishes in float32"),
    "--lr 1e39 (inf in float32)": (["--lr", "1e39"], "is infinite in float32"),
    "--threads 1000": (["--threads", "1000"], "add --oversubscribe"),
    "--threads 3 x 2 workers on 1 core": (
        ["--parallel", "ddp", "--nproc", "2", "--threads", "3"],
        "--threads 3 x 2 worker(s) is far more threads",
    ),
    "--json through a broken link": (["--json", "{tmp}/broken/out.json"], "broken symbolic link"),
    "--json a broken link": (["--json", "{tmp}/broken"], "is a broken symbolic link (to"),
    "--json a link to a file": (["--json", "{tmp}/link.json"], "is a symbolic link (to"),
    "--json a FIFO": (["--json", "{tmp}/fifo"], "is a FIFO"),
    "--json /dev/null": (["--json", "/dev/null"], "is a character device"),
    "--json a name too long for its temporary file": (["--json", "{tmp}/" + LONG], "too long"),
    "--json a new folder's name too long": (
        ["--json", "{tmp}/" + "d" * (NAME_MAX + 1) + "/out.json"],
        "too long",
    ),
    "--json ''": (["--json", ""], "--json needs a file name"),
    "--json under a FIFO": (["--json", "{tmp}/fifo/out.json"], "is a FIFO (named pipe), not a"),
    "--checkpoint a broken link": (["--checkpoint", "{tmp}/broken"], "broken symbolic link"),
    "--checkpoint through a broken link": (
        ["--checkpoint", "{tmp}/broken/ckpt"],
        "broken symbolic link",
    ),
    "--checkpoint a FIFO": (["--checkpoint", "{tmp}/fifo"], "is a FIFO (named pipe); it must"),
    "--checkpoint a name too long": (["--checkpoint", "{tmp}/" + "c" * (NAME_MAX + 1)], "too long"),
    "--checkpoint ''": (["--checkpoint", ""], "--checkpoint needs a folder name"),
    "--profile a broken link": (["--profile", "{tmp}/broken"], "broken symbolic link"),
    "--profile ''": (["--profile", ""], "--profile needs a folder name"),
    "--profile with a planted trace link": (
        ["--profile", "{tmp}/traces"],
        "trace_rank0.json is a symbolic link",
    ),
    "--data-dir a broken link": (["--data-dir", "{tmp}/broken"], "is a broken symbolic link"),
    "--data-dir missing": (["--data-dir", "{tmp}/nowhere"], "nowhere does not exist"),
    "--data-dir a file": (["--data-dir", "{tmp}/a_file"], "a_file is not a folder"),
    "--eval, test labels 12": (["--eval", "--data-dir", "{tmp}/label 12"], "holds a label 12"),
    "--eval, test images 20x20": (
        ["--eval", "--data-dir", "{tmp}/wrong shape"],
        "t10k-images-idx3-ubyte holds (20, 20) images",
    ),
    "--eval, test split of 7 images, 8 labels": (
        ["--eval", "--data-dir", "{tmp}/count"],
        "has 7 images but t10k-labels-idx1-ubyte 8",
    ),
    "--eval, test images cut short": (["--eval", "--data-dir", "{tmp}/cut"], "header says"),
    "an IDX header whose sizes overflow": (["--data-dir", "{tmp}/overflow"], "header says"),
    "an IDX header cut short": (["--data-dir", "{tmp}/short header"], "is cut short"),
    "a data file that is a broken link": (
        ["--data-dir", "{tmp}/dangling file"],
        "train-labels-idx1-ubyte in {tmp}/dangling file is a broken symbolic link",
    ),
    "a data file that is a FIFO": (["--data-dir", "{tmp}/fifo file"], "not a regular file"),
}


def faulty_test_split(folder: Path, fault: str) -> Path:
    """An MNIST folder whose *test* split has ``fault`` (read only at the end of a run before)."""
    mnist_folder(folder)
    images_name, labels_name = data.FULL_FILES["test"]
    images = np.zeros((8, 28, 28), np.uint8)
    if fault == "label 12":
        write_idx(folder / labels_name, np.full(8, 12, np.uint8))
    if fault == "wrong shape":
        write_idx(folder / images_name, images[:, :20, :20].copy())
    if fault == "count":
        write_idx(folder / images_name, images[:7])
    if fault == "cut":
        write_idx(folder / images_name, images)
        raw = (folder / images_name).read_bytes()
        (folder / images_name).write_bytes(raw[:-100])
    return folder


def overflow_header(path: Path) -> None:
    """An IDX file of 2**31 x 2**31 x 4 bytes and no values: the sizes' product is 2**64, which
    is 0 in int64, the byte count of the (empty) file."""
    path.write_bytes(
        bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (2**31, 2**31, 4))
    )


@pytest.fixture
def traps(tmp_path):
    """A folder of traps: a broken link, a FIFO, a link to a victim file, a file, MNIST folders
    with a faulty test split or a faulty IDX file, a profile folder with a planted trace link."""
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link.json").symlink_to(tmp_path / "victim.txt")
    os.mkfifo(tmp_path / "fifo")
    for fault in ("label 12", "wrong shape", "count", "cut"):
        faulty_test_split(tmp_path / fault, fault)
    images_name, labels_name = data.FULL_FILES["train"]
    overflow_header(mnist_folder(tmp_path / "overflow") / images_name)
    short = mnist_folder(tmp_path / "short header") / images_name
    short.write_bytes(bytes([0, 0, 0x08, 200]) + b"\0" * 40)  # 200 sizes promised, 10 given
    (mnist_folder(tmp_path / "dangling file") / labels_name).unlink()
    (tmp_path / "dangling file" / labels_name).symlink_to(tmp_path / "nowhere")
    (mnist_folder(tmp_path / "fifo file") / images_name).unlink()
    os.mkfifo(tmp_path / "fifo file" / images_name)
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "trace_rank0.json").symlink_to(tmp_path / "victim.txt")
    return tmp_path


@pytest.fixture
def no_workers(monkeypatch):
    """Every check runs before a worker: any start fails the test. One core, so that the
    thread limit (4 per core) is the same on every machine."""
    for variable in (*TORCHRUN_VARIABLES, data.DATA_DIR_VARIABLE):
        monkeypatch.delenv(variable, raising=False)

    def started(*_args, **_kwargs):
        raise AssertionError("a worker started")

    monkeypatch.setattr(launch, "run", started)
    monkeypatch.setattr(train, "train_worker", started)
    monkeypatch.setattr(hardware, "num_cores", lambda: 1)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_before_any_worker_and_nothing_written(
    name, traps, no_workers, capsys
):
    args, message = BAD_INPUTS[name]
    if "/dev/null" in args and not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    if "too long" in message and os.pathconf(traps, "PC_NAME_MAX") != NAME_MAX:
        pytest.skip(f"this file system's names are not limited to {NAME_MAX} bytes")
    before = snapshot(traps)
    code = train.main([a.format(tmp=traps) for a in [*args, "--steps", "2", "--batch-size", "8"]])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("train: error: "), err
    assert message.format(tmp=traps) in err
    assert snapshot(traps) == before  # nothing written, nothing moved
    assert (traps / "victim.txt").read_text() == "precious"


def test_the_limits_are_where_they_are_derived(no_workers):
    """float32's smallest normal rate and its largest pass, and so does any thread count up to
    4 per core, or above with --oversubscribe; under torchrun this machine's workers count."""
    tiny, largest = config.LR_DTYPE.tiny, config.LR_DTYPE.max
    for lr in (tiny, largest, 1e-8):
        config.validate(RunConfig(lr=lr, steps=1, batch_size=8))
    config.validate(RunConfig(threads=4))
    config.validate(RunConfig(threads=1000, oversubscribe=True))
    ddp = dict(parallel="ddp", nproc=16, batch_size=16)
    config.validate(RunConfig(**ddp), local_workers=2)  # 16 ranks on 8 machines
    with pytest.raises(UsageError, match="--nproc 16 is far more workers"):
        config.validate(RunConfig(**ddp))
    with pytest.raises(UsageError, match="--threads 3 x 2 worker"):
        config.validate(RunConfig(**ddp, threads=3), local_workers=2)


def test_the_longest_json_name_the_check_allows_is_one_the_writer_can_write(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = tmp_path / ("j" * (name_max - config.TEMPORARY_NAME_ROOM - 5) + ".json")
    config.validate(RunConfig(json=str(longest)))
    train.write_json(str(longest), {"losses": [1.0]})  # its temporary file fits beside it
    assert json.loads(longest.read_text()) == {"losses": [1.0]}
    with pytest.raises(UsageError, match="too long"):
        config.validate(RunConfig(json=str(longest.with_name("j" + longest.name))))


def test_a_home_path_is_expanded_once_so_the_check_and_the_write_agree(
    tmp_path, monkeypatch, capsys
):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(data.DATA_DIR_VARIABLE, raising=False)
    argv = ["--json", "~/out.json", "--checkpoint", "~/ckpt", "--profile", "~/prof"]
    cfg = config.parse([*argv, "--data-dir", "~/mnist"])
    assert (cfg.json, cfg.checkpoint) == (str(home / "out.json"), str(home / "ckpt"))
    assert (cfg.profile, cfg.data_dir) == (str(home / "prof"), str(home / "mnist"))
    if not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    monkeypatch.chdir("/proc")  # "~" taken literally here would be /proc/~: can't be written
    assert train.main(["--json", "~/out.json", "--steps", "1", "--batch-size", "16"]) == 0
    assert len(json.loads((home / "out.json").read_text())["losses"]) == 1
    assert "error" not in capsys.readouterr().err


def test_an_idx_header_whose_sizes_overflow_is_a_data_error(tmp_path):
    overflow_header(tmp_path / "huge")
    with pytest.raises(data.DataError, match=r"header says \(2147483648, 2147483648, 4\)"):
        data.read_idx(tmp_path / "huge")


def test_a_fifo_among_the_data_files_is_refused_without_waiting_for_a_writer(tmp_path):
    folder = mnist_folder(tmp_path / "mnist")
    fifo = folder / data.FULL_FILES["train"][0]
    fifo.unlink()
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            data.load("train", data_dir=folder)
        except data.DataError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # it opened the FIFO and waits for a writer: give it one, then fail
        fifo.open("wb").close()
        reader.join(timeout=10)
        pytest.fail("reading the data opened a FIFO and waited for a writer")
    assert outcome and "is not a regular file" in outcome[0]


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_data_file_that_fails_to_read_is_one_line(tmp_path):
    """A regular file whose read fails (even for root, unlike a file without read permission):
    a process's own memory, read from address 0."""
    folder = mnist_folder(tmp_path / "mnist")
    labels = folder / data.FULL_FILES["train"][1]
    labels.unlink()
    labels.symlink_to("/proc/self/mem")
    with pytest.raises(UsageError, match="can't be read"):
        config.validate(RunConfig(data_dir=str(folder)))


def test_a_bad_test_split_stops_the_command_line_before_training(tmp_path):
    folder = faulty_test_split(tmp_path / "mnist", "label 12")
    out = tmp_path / "out.json"
    proc = run_cli(
        "--eval",
        "--data-dir",
        str(folder),
        "--batch-size",
        "8",
        "--steps",
        "50",
        "--json",
        str(out),
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "holds a label 12" in proc.stderr
    assert not out.exists()
    config.validate(RunConfig(data_dir=str(folder), batch_size=8))  # without --eval: not read
