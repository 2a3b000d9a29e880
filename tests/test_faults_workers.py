"""Workers that fail, tried on purpose: one that raises, exits or is killed with SIGKILL, one that
hangs, one that skips a collective (the group's timeout, not gloo's 30 minutes), results that
can't come back, limits that make no sense, two launches racing from two threads. The launch raises fast, with the rank and the worker's own traceback, and leaves no
process behind. Part of the fault suite (``tests/test_faults.py``); a caller that is interrupted
or terminated is ``tests/test_faults_signals.py``, a collective that times out and what a launch
listens on ``tests/test_faults_launch.py``."""

import os
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
from conftest import workers_left
from faults import HANG_GUARD_S, run_python

from course_utils import launch


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


MESH_FAILURE = "Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer"


def mesh_fails_the_first_times(failures: int, folder):
    """An ``init_process_group`` whose first ``failures`` launches fail on rank 1 as gloo's
    transport sometimes does (counted in files, since each launch forks fresh workers)."""
    real = dist.init_process_group

    def init(*args, **kwargs):
        if int(os.environ["RANK"]) == 1:
            tries = len(list(folder.glob("try*")))
            (folder / f"try{tries}").touch()
            if tries < failures:
                raise RuntimeError(MESH_FAILURE)
        return real(*args, **kwargs)

    return init


def rank_and_runs(folder):
    (folder / f"ran{dist.get_rank()}-{os.getpid()}").touch()
    return dist.get_rank()


def test_a_group_that_did_not_form_is_started_again_once_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", mesh_fails_the_first_times(1, tmp_path))
    with pytest.warns(RuntimeWarning, match="process group did not form .*starting them again"):
        assert launch.run(rank_and_runs, 2, tmp_path, timeout=60) == [0, 1]
    assert len(list(tmp_path.glob("try*"))) == 2
    assert len(list(tmp_path.glob("ran*"))) == 2  # the work ran once per rank, in the second try
    assert workers_left() == []


def test_a_group_that_fails_to_form_twice_raises_the_setup_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", mesh_fails_the_first_times(2, tmp_path))
    with pytest.warns(RuntimeWarning), pytest.raises(launch.WorkerError) as info:
        launch.run(rank_and_runs, 2, tmp_path, timeout=60)
    assert info.value.rank == 1 and info.value.phase == "setup"
    assert "connectFullMesh" in str(info.value)
    assert list(tmp_path.glob("ran*")) == []
    assert workers_left() == []


def connection_lost_at_work(folder):
    (folder / f"ran{dist.get_rank()}-{os.getpid()}").touch()
    if dist.get_rank() == 1:
        raise RuntimeError(MESH_FAILURE)
    return 0


def test_the_same_error_once_the_work_began_is_not_retried(tmp_path):
    with pytest.raises(launch.WorkerError) as info:
        launch.run(connection_lost_at_work, 2, tmp_path, timeout=60)
    assert info.value.rank == 1 and info.value.phase == "run"
    assert len(list(tmp_path.glob("ran1-*"))) == 1  # rank 1's work ran once: nothing repeated
    assert workers_left() == []
