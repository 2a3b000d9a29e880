"""The caller of a launch signalled, tried on purpose: interrupted (SIGINT, a notebook's stop
button), terminated or hung up (SIGTERM, SIGHUP), or killed (SIGKILL, which nothing can catch:
the next launch sweeps what it left). No worker and no rendezvous folder outlives it. Part of the
fault suite (``tests/test_faults.py``)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from conftest import workers_left
from faults import HANG_GUARD_S, run_python

from course_utils import launch


def interrupt_the_caller_then_sleep(caller: int):
    dist.barrier()  # both workers are running...
    if dist.get_rank() == 0:
        os.kill(caller, signal.SIGINT)  # ...when the kernel is interrupted (the stop button)
    time.sleep(600)


def test_interrupting_the_caller_stops_the_workers():
    # A notebook's kernel turns SIGINT into KeyboardInterrupt. A test run started in the
    # background by a shell (`make test &`) inherits SIGINT ignored, and Python then installs no
    # handler: give this process the kernel's for the test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch.run(interrupt_the_caller_then_sleep, 2, os.getpid(), timeout=300)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < HANG_GUARD_S  # not the 600 s they sleep, nor the timeout
    assert workers_left() == []


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
