"""Faults and bad inputs, tried on purpose: nothing lost, nothing silent.

1. Bad input to the entry point: exit 2, one line, before any worker starts, nothing written.
2. Training that fails: exit 1, one line naming the step; never a NaN in a JSON file.
3. Checkpoints: corrupt ones refused (the previous good one used), pipelines resumed exactly,
   half-written files cleaned, a run killed with SIGKILL resumed to the last bit.
4. The launcher: a worker that raises, dies, hangs or skips a collective; an interrupted, killed
   or hung-up caller; results that can't come back; two launches racing; loopback only.

The fault suite is this module and its companions, ``test_faults_*.py`` (checkpoints, input
checked before a run, the launcher); docs/command_line.md states how many cases they try, and
a test keeps the two in step.
"""

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, run_cli, workers_left

from course_utils import checkpoint, config, data, hardware, launch, train
from course_utils.config import RunConfig

HANG_GUARD_S = 60  # a limit only a hang would reach; how fast these are is for benchmarks/


# --- 1. bad input: exit 2, one line, before any worker starts, nothing written --------------


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
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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


def snapshot(folder: Path) -> dict:
    """Every file and folder below ``folder``; files with their size and time of change."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


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


# --- 2. training that fails: exit 1, one line naming the step, no NaN in any file ----------


@pytest.mark.parametrize(
    "args",
    [[], ["--parallel", "ddp", "--nproc", "2"], ["--parallel", "pipeline", "--nproc", "2"]],
    ids=["none", "ddp", "pipeline"],
)
def test_a_diverging_loss_stops_the_run_with_one_line_naming_the_step(tmp_path, args):
    out = tmp_path / "out.json"
    proc = run_cli("--lr", "1e6", "--steps", "30", "--json", str(out), *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(
        r"train: error: the loss is (nan|inf) at step \d+", lines[0]
    )
    assert not out.exists()  # no half-result, and never a NaN


def test_the_json_is_strict(tmp_path):
    out = tmp_path / "out.json"
    assert run_cli("--steps", "3", "--json", str(out)).returncode == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert len(result["losses"]) == 3
    with pytest.raises(ValueError):
        train.write_json(str(tmp_path / "nan.json"), {"loss": float("nan")})


# --- 3. checkpoints -----------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the tensors' data
    path.write_bytes(bytes(raw))


def test_a_corrupt_checkpoint_is_refused_and_the_previous_one_resumes_exactly(tmp_path, capfd):
    common = dict(model="cnn", batch_size=32, seed=2)
    whole = train.run(RunConfig(**common, steps=8), progress=False)
    ckpt = str(tmp_path / "ckpt")
    train.run(RunConfig(**common, steps=6, checkpoint=ckpt, checkpoint_every=2), progress=False)
    flip_a_byte(tmp_path / "ckpt" / "latest.pt")  # step 6; previous.pt holds step 4
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint._read(tmp_path / "ckpt" / "latest.pt")
    resumed = train.run(RunConfig(**common, steps=8, checkpoint=ckpt), progress=False)
    assert "latest.pt is corrupt" in capfd.readouterr().err
    assert resumed["resumed_from_step"] == 4
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=0, atol=0)
    assert (tmp_path / "ckpt" / "latest.pt.corrupt").exists()  # set aside, not deleted


def test_a_pipeline_checkpoints_every_stage_and_resumes_exactly_even_on_more_stages(tmp_path):
    common = dict(model="cnn", parallel="pipeline", batch_size=32, microbatches=4)
    whole = train.run(RunConfig(**common, nproc=2, steps=8), progress=False)
    ckpt = str(tmp_path / "ckpt")
    train.run(RunConfig(**common, nproc=2, steps=5, checkpoint=ckpt), progress=False)
    saved = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    reference = train.models.build("cnn").state_dict()
    assert saved["model"].keys() == reference.keys()  # the whole model, from both stages
    assert saved["optimizer"]["conv2.weight"]["momentum_buffer"].shape == (64, 32, 5, 5)
    resumed = train.run(RunConfig(**common, nproc=2, steps=8, checkpoint=ckpt), progress=False)
    assert resumed["resumed_from_step"] == 5
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=0, atol=0)
    on_four = train.run(RunConfig(**common, nproc=4, steps=10, checkpoint=ckpt), progress=False)
    assert on_four["resumed_from_step"] == 8 and len(on_four["losses"]) == 10


def test_a_half_written_checkpoint_of_a_killed_save_is_cleaned(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    stray = ckpt / f".latest.pt.{dead}.tmp"  # what a SIGKILL during torch.save leaves
    stray.write_bytes(b"half a checkpoint")
    train.run(RunConfig(steps=1, batch_size=16, checkpoint=str(ckpt)), progress=False)
    assert not stray.exists() and (ckpt / "latest.pt").exists()


def test_a_stray_rank_variable_does_not_stop_the_checkpoint(tmp_path):
    proc = run_cli("--steps", "2", "--checkpoint", str(tmp_path / "ckpt"), env={"RANK": "3"})
    assert proc.returncode == 0, proc.stderr
    assert torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)["step"] == 2


def test_a_run_killed_with_sigkill_resumes_to_the_last_bit(tmp_path):
    args = ["--parallel", "ddp", "--nproc", "2", "--batch-size", "32", "--steps", "12"]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.json"
    command = [sys.executable, "-m", "course_utils.train", *args, "--checkpoint", str(ckpt)]
    run = subprocess.Popen([*command, "--checkpoint-every", "2"], cwd=ROOT, text=True,
                           stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    guard = threading.Timer(HANG_GUARD_S, os.killpg, (run.pid, signal.SIGKILL))
    guard.start()
    try:
        for line in run.stderr:  # the parent and its workers die at once, mid-run
            if line.startswith("checkpoint: step 6 saved"):
                os.killpg(run.pid, signal.SIGKILL)
                break
        run.wait(timeout=HANG_GUARD_S)
    finally:
        guard.cancel()
    assert run.returncode == -signal.SIGKILL
    resumed = subprocess.run([*command, "--json", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(out.read_text())
    assert 6 <= result["resumed_from_step"] < 12 and len(result["losses"]) == 12
    whole = train.run(RunConfig(parallel="ddp", nproc=2, batch_size=32, steps=12), progress=False)
    torch.testing.assert_close(result["losses"], whole["losses"], rtol=0, atol=0)


# --- 4. the launcher ----------------------------------------------------------------------------


def write_pid_then(tmp, behaviour):
    (tmp / f"pid{dist.get_rank()}").write_text(str(os.getpid()))
    dist.barrier()  # every rank has written its PID
    if dist.get_rank() == 1:
        if behaviour == "raise":
            raise ValueError("rank one is broken")
        if behaviour == "die":
            os._exit(3)
        if behaviour == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)  # the others are still busy when rank 1 fails


@pytest.mark.parametrize("behaviour", ["raise", "die", "sigkill"])
def test_a_failing_worker_raises_fast_with_rank_and_traceback_and_leaves_nothing(
    tmp_path, behaviour
):
    start = time.monotonic()
    with pytest.raises(launch.WorkerError) as info:
        launch.run(write_pid_then, 3, tmp_path, behaviour, oversubscribe=True)
    assert time.monotonic() - start < HANG_GUARD_S  # not the 600 s the other ranks sleep
    assert info.value.rank == 1
    if behaviour == "raise":
        assert info.value.kind == "ValueError" and info.value.message == "rank one is broken"
        assert "write_pid_then" in info.value.worker_traceback  # the worker's own frames
    else:
        if behaviour == "die":
            assert "exited with code 3" in str(info.value)
        else:  # the signal is named
            assert "was killed by SIGKILL (exit code -9)" in str(info.value)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(3)]
    assert not any(launch.alive(pid) for pid in pids)
    assert workers_left() == []


def sleeper():
    time.sleep(600)


def test_a_hung_launch_times_out_and_stops_every_worker():
    start = time.monotonic()
    with pytest.raises(launch.LaunchTimeout, match="ranks \\[0, 1\\]"):
        launch.run(sleeper, 2, timeout=1.5)
    assert time.monotonic() - start < HANG_GUARD_S  # not the 600 s they sleep
    assert workers_left() == []


def skip_collective():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.zeros(1))  # rank 1 never joins
    else:
        time.sleep(600)


def test_a_skipped_collective_fails_after_the_group_timeout_not_30_minutes():
    start = time.monotonic()
    with pytest.raises(launch.WorkerError) as info:
        launch.run(skip_collective, 2, group_timeout=2)
    assert info.value.rank == 0
    assert time.monotonic() - start < HANG_GUARD_S  # the group's 2 s, not gloo's 30 minutes
    assert workers_left() == []


def interrupt_the_caller_then_sleep(caller: int):
    dist.barrier()  # both workers are running...
    if dist.get_rank() == 0:
        os.kill(caller, signal.SIGINT)  # ...when the kernel is interrupted (the stop button)
    time.sleep(600)


def test_interrupting_the_caller_stops_the_workers():
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch.run(interrupt_the_caller_then_sleep, 2, os.getpid(), timeout=300)
    assert time.monotonic() - start < HANG_GUARD_S  # not the 600 s they sleep, nor the timeout
    assert workers_left() == []


class Unloadable:
    """Pickles in the worker, but can't be rebuilt in the caller."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise RuntimeError("this object can't be rebuilt here")


def return_unloadable():
    return Unloadable() if dist.get_rank() == 1 else "fine"


def return_unpicklable():
    return (lambda: None) if dist.get_rank() == 0 else "fine"


def test_results_that_cannot_come_back_are_worker_errors_with_the_rank():
    with pytest.raises(launch.WorkerError) as info:
        launch.run(return_unloadable, 2)
    assert info.value.rank == 1 and info.value.kind == "ResultError"
    assert "could not be unpickled" in info.value.message
    with pytest.raises(launch.WorkerError) as info:
        launch.run(return_unpicklable, 2)
    assert info.value.rank == 0 and "could not be sent back" in info.value.message
    assert workers_left() == []


@pytest.mark.parametrize("timeout", [-5, 0, float("nan")])
def test_a_timeout_that_is_not_positive_is_refused(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive"):
        launch.run(sleeper, 2, timeout=timeout)


def test_a_thousand_workers_are_refused_before_any_starts():
    with pytest.raises(ValueError, match="far too many"):
        launch.run(sleeper, 1000)
    assert workers_left() == []


def run_python(code: str, tmp_path: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, text=True, **kwargs
    )


def test_two_cold_launches_from_two_threads_both_finish(tmp_path):
    # Forking while another thread imports (DDP's first import of torch._dynamo) could leave the
    # child holding a lock no one will release: the launcher starts one launch at a time.
    code = """
        import threading, torch, torch.distributed as dist
        import course_utils.launch as L

        def work():
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
            return float(model(torch.ones(1, 4)).sum().detach())

        results = []
        threads = [threading.Thread(target=lambda: results.append(L.run(work, 2, timeout=60)))
                   for _ in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(len(results))
    """
    proc = run_python(code, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=2 * HANG_GUARD_S)
    assert proc.returncode == 0 and out.strip() == "2", err[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_terminated_caller_removes_its_rendezvous_folder_and_workers(tmp_path, sig):
    code = f"""
        import os, time
        from pathlib import Path
        import course_utils.launch as L

        def report_then_sleep():
            Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}").touch()
            time.sleep(600)

        L.run(report_then_sleep, 2, timeout=300)
    """
    proc = run_python(code, tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + HANG_GUARD_S
    while len(list(tmp_path.glob("worker-*"))) < 2:  # both workers are up
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert len(list(tmp_path.glob("course-launch-*"))) == 1
    proc.send_signal(sig)
    proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + sig
    assert list(tmp_path.glob("course-launch-*")) == []  # the rendezvous folder is gone
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    deadline = time.monotonic() + 10
    while any(launch.alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(launch.alive(pid) for pid in workers)


def test_folders_of_launches_whose_caller_died_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f"course-launch-{dead}-abc123"  # its caller got SIGKILL: nothing ran
    stale.mkdir()
    (stale / "store").write_text("")
    mine = tmp_path / f"course-launch-{os.getpid()}-live"  # a launch of this process: kept
    mine.mkdir()
    assert launch.run(my_pid, 1) and not stale.exists()
    assert mine.exists()


def my_pid():
    return os.getpid()


def listening_addresses() -> list[str]:
    """The local addresses of this process's listening TCP sockets (Linux /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(local.split(":")[0])
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.append(socket.inet_ntop(family, raw))
    return addresses


def gloo_listens_on():
    t = torch.ones(1)
    dist.all_reduce(t)  # gloo has connected the pair of ranks
    return listening_addresses(), os.environ.get("GLOO_SOCKET_IFNAME")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net (Linux)")
def test_workers_on_one_machine_listen_on_loopback_only():
    for addresses, interface in launch.run(gloo_listens_on, 2, device="cpu"):
        assert interface == launch.rendezvous.loopback_interface()
        assert addresses and all(a in ("127.0.0.1", "::1") for a in addresses), addresses


# --- the count in docs/command_line.md ---------------------------------------------------------------


def test_the_docs_state_how_many_faults_the_suite_tries():
    suite = sorted(str(p) for p in Path(__file__).parent.glob("test_faults*.py"))
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *suite],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    cases = sum(1 for line in listed.splitlines() if "::" in line) - 1  # less this test
    stated = re.search(
        r"\*\*(\d+) faults and bad inputs\*\*", (ROOT / "docs" / "command_line.md").read_text()
    )
    assert stated and int(stated.group(1)) == cases, f"docs/command_line.md should say {cases}"
