"""The launcher: results by rank, the torchrun environment, threads, fork and spawn, no orphans.
(What happens when a worker fails or hangs: tests/test_faults_workers.py; when its caller is
interrupted: tests/test_faults_signals.py.)"""

import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, workers_left

import course_utils as cu
from course_utils import hardware, launch
from course_utils.launch import runner
from course_utils.loop import num_threads


def sum_of_ranks(offset, scale=1):
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return dist.get_rank(), t.item() * scale + offset, torch.get_num_threads(), env


def test_results_come_back_by_rank_with_the_torchrun_environment(monkeypatch):
    folders = []  # the rendezvous folder of each launch
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(
        tempfile, "mkdtemp", lambda **kw: folders.append(mkdtemp(**kw)) or folders[-1]
    )
    results = launch.run(sum_of_ranks, 3, 10, scale=2, threads=1)
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(r[1] == (1 + 2 + 3) * 2 + 10 for r in results)
    assert all(r[2] == 1 for r in results)
    for rank, (_, _, _, env) in enumerate(results):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "3"
    launch.run(sum_of_ranks, 2, 0)
    assert len(set(folders)) == 2  # a fresh rendezvous for each launch...
    assert not any(os.path.exists(folder) for folder in folders)  # ...removed after it


def bare_init_then_sum():
    # the way a tutorial writes it: env:// from MASTER_ADDR/MASTER_PORT, rank 0 hosts the store
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    try:
        t = torch.ones(1)
        dist.all_reduce(t)
        return t.item(), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    finally:
        dist.destroy_process_group()


def test_worker_code_may_init_the_group_itself_from_master_addr_and_port():
    results = launch.run(bare_init_then_sum, 2, init_group=False, timeout=60)
    assert [r[0] for r in results] == [2.0, 2.0]
    assert results[0][1] == "127.0.0.1" and results[0][2] != 29500


def test_thread_budget_defaults_to_cores_per_worker():
    (_, _, threads, _), _ = launch.run(sum_of_ranks, 2, 0)
    assert threads == max(1, hardware.num_cores() // 2)


def test_two_launches_at_once_do_not_collide():
    code = (
        "import course_utils.launch as L, torch, torch.distributed as dist\n"
        "def f():\n"
        "    t = torch.ones(1); dist.all_reduce(t); return t.item()\n"
        "for _ in range(5):\n"
        "    assert L.run(f, 2) == [2.0, 2.0]\n"
        "print('ok')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert all(out.strip() == "ok" for out in outs)


def test_more_workers_than_cores_warns_once(monkeypatch):
    monkeypatch.setattr(runner, "_warned", set())
    monkeypatch.setattr(hardware, "num_cores", lambda: 1)
    with pytest.warns(UserWarning, match="take turns on the cores"):
        launch.run(sum_of_ranks, 2, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch.run(sum_of_ranks, 2, 0)  # second time: silent


def test_spawned_workers_run_importable_functions_and_notebook_ones_by_value(monkeypatch):
    results = launch.run(sum_of_ranks, 2, 1, timeout=120, start_method="spawn")
    assert [r[1] for r in results] == [4.0, 4.0]

    offset = 10  # a global of "the notebook", captured by value with the function

    def defined_here(x):  # a spawned interpreter can't import this: cloudpickle carries it
        return dist.get_rank() + x + offset, torch.get_num_threads()

    monkeypatch.setenv("COURSE_START_METHOD", "spawn")  # how CI runs every lesson spawned
    assert runner.default_start_method() == "spawn"
    assert launch.run(defined_here, 2, 5, threads=1, timeout=120) == [(15, 1), (16, 1)]
    with pytest.raises(ValueError, match="can't be sent to spawned workers"):
        launch.run(defined_here, 2, threading.Lock(), timeout=120)
    with pytest.raises(ValueError, match="choose 'fork' or 'spawn'"):
        launch.run(defined_here, 2, 5, start_method="teleport")


def test_send_by_value_gives_forked_workers_the_copy_a_spawned_one_would_get(monkeypatch):
    lock = threading.Lock()  # in the caller's memory: a fork inherits it, pickle can't send it

    def uses_the_lock():  # "a notebook's function"
        with lock:
            return dist.get_rank()

    assert launch.run(uses_the_lock, 2, threads=1, start_method="fork", timeout=60) == [0, 1]
    monkeypatch.setenv("COURSE_SEND_BY_VALUE", "1")  # how CI runs every lesson
    with pytest.raises(ValueError, match="can't be sent"):
        launch.run(uses_the_lock, 2, threads=1, start_method="fork", timeout=60)


def apply_to_rank(fn):
    """A package-level function that calls what it is given (as cu.overlap.profile_steps does)."""
    return fn(dist.get_rank())


def test_a_notebook_function_passed_as_an_argument_travels_by_value_to_spawned_workers():
    scale = 3  # a global of "the notebook"

    def from_the_notebook(rank):  # an argument, not the work: a spawned worker can't import it
        return rank * scale

    results = launch.run(apply_to_rank, 2, from_the_notebook, start_method="spawn", timeout=120)
    assert results == [0, 3]


def ddp_step():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2))
    model(torch.randn(4, 8)).sum().backward()
    return float(model.module.weight.grad.sum())


def test_thirty_ddp_launches_in_a_row_all_exit_cleanly():
    """gloo sometimes aborts at interpreter exit after DDP; the launcher's workers never may."""
    for _ in range(30):
        grads = launch.run(ddp_step, 2, timeout=60)
        assert grads[0] == pytest.approx(grads[1])
    assert workers_left() == []


def conv_threads():
    x, w = torch.randn(16, 8, 28, 28), torch.randn(16, 8, 5, 5)
    torch.nn.functional.conv2d(x, w).sum()  # a parallel region in the worker
    return torch.get_num_threads()


def test_workers_wanting_threads_after_the_parent_used_openmp_do_not_hang(monkeypatch):
    """GNU OpenMP's pool does not survive fork: a forked child with 2 threads would hang here."""
    monkeypatch.setattr(runner, "_warned", set())
    with num_threads(2):
        torch.randn(256, 256) @ torch.randn(256, 256)  # the parent's pool is now in use
        assert launch.run(conv_threads, 1, threads=2, init_group=False, timeout=60) == [2]

        def in_a_notebook():  # can't be spawned: forked, with one thread, and a warning
            return conv_threads()

        with pytest.warns(UserWarning, match="must run with 1 thread"):
            assert launch.run(in_a_notebook, 1, threads=2, init_group=False, timeout=60) == [1]


def skips_a_collective() -> None:
    tensor = torch.ones(3)
    if dist.get_rank() == 0:
        dist.all_reduce(tensor)  # waits for rank 1, which never comes
    else:
        time.sleep(60)  # the bug: rank 1 skipped the collective


def test_a_timeout_says_where_each_late_rank_was_stuck():
    start = time.monotonic()
    with pytest.raises(cu.launch.LaunchTimeout) as caught:
        cu.launch.run(skips_a_collective, 2, timeout=3, device="cpu")
    assert time.monotonic() - start < 15  # seconds, not gloo's 30 minutes
    message = str(caught.value)
    rank0, rank1 = message.split("--- rank 1 was here ---")
    assert "in all_reduce" in rank0 and "in skips_a_collective" in rank0
    assert "in skips_a_collective" in rank1 and "all_reduce" not in rank1
    assert "child_main" not in message  # the launcher's own frames are left out
    assert set(caught.value.stacks) == {0, 1}  # every thread's stack, for whoever wants them


def test_a_script_read_from_standard_input_spawns_its_workers(tmp_path):
    # `python - <<EOF`: __main__ names "<stdin>", a file a spawned interpreter can't re-run; its
    # functions travel by value, as a notebook's do
    script = (
        "import torch.distributed as dist\n"
        "from course_utils import launch\n"
        "def rank_plus(x):\n"
        "    return dist.get_rank() + x\n"
        "print(launch.run(rank_plus, 2, 10, start_method='spawn', threads=1, timeout=60))\n"
    )
    done = subprocess.run(
        [sys.executable, "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the repository: nothing named <stdin> to find by accident
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0 and done.stdout.strip() == "[10, 11]", done.stderr[-2000:]


def test_spawned_workers_leave_no_semaphore_behind(tmp_path):
    # tqdm makes a lock with a process's first progress bar (loop.fit makes one in every worker,
    # shown or not): under spawn a named semaphore, which a worker leaving through os._exit, or
    # stopped by the caller on its way out, left behind, and the caller's resource tracker warned
    # "There appear to be 2 leaked semaphore objects to clean up at shutdown" when it ended
    script = tmp_path / "bench.py"
    script.write_text(
        "import multiprocessing\n"
        "import torch.distributed as dist\n"
        "from tqdm.auto import tqdm\n"
        "from course_utils import launch\n"
        "held = []\n"
        "def rank_with_a_lock():\n"
        "    held.append(multiprocessing.RLock())  # kept for the worker's life, as tqdm's is\n"
        "    tqdm(total=1, disable=True).close()\n"
        "    return dist.get_rank()\n"
        "if __name__ == '__main__':\n"
        "    print(launch.run(rank_with_a_lock, 2, start_method='spawn', threads=1, timeout=60))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1]", done.stderr[-2000:]
    assert "leaked semaphore" not in done.stderr, done.stderr[-2000:]
