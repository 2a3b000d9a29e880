"""Faults of a launch, tried on purpose: what a job on one machine opens to the network, and who is
to blame when a collective times out (issue 23, items 3 and 9).

1. torchrun on one machine, run as the README runs it: every socket its agent and its workers
   listen on is on loopback; every other one-machine torchrun command of the docs uses the same
   flags; the workers' own rendezvous (``env://`` at a loopback address) stays on loopback, and
   so do the workers of the course's launcher.
2. A collective that times out: the error names the rank it waited for (stopped by SIGSTOP, in a
   plain collective or a DDP step, or busy elsewhere, with its stack), not only the rank that gave
   up; ranks that all waited are not blamed; the error comes back even when freeing the failed
   step would hang the worker; nothing is left behind.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, workers_left
from faults import HANG_GUARD_S
from torch.nn.parallel import DistributedDataParallel

from course_utils import launch
from course_utils.launch import rendezvous

TORCHRUN = Path(sys.executable).parent / "torchrun"  # installed with torch, beside this python
HAS_PROC_NET = Path("/proc/net/tcp").exists()  # sockets by process: Linux's /proc
LOOPBACK = ("127.0.0.1", "::1")
DOCS = ("README.md", "docs/command_line.md", "scripts/README.md")


# --- 1. torchrun on one machine: loopback only --------------------------------------------------


def torchrun_commands(path: str) -> list[tuple[str, list[str]]]:
    """Each torchrun command in the ``bash`` blocks of ``path``: (its block, its words), the
    words with continuation lines joined and the variables set before it included."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / path).read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if any(Path(word).name == "torchrun" for word in words):
                found.append((block, words))
    return found


def split_command(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """``NAME=value ... torchrun args``: the variables, and the command from torchrun on. A
    launcher before torchrun (``sudo -E scripts/cluster run 1 --``: a node of the one-machine
    cluster) is not a variable."""
    start = next(i for i, word in enumerate(words) if Path(word).name == "torchrun")
    assigned = [w for w in words[:start] if re.fullmatch(r"[A-Za-z_]\w*=.*", w)]
    variables = dict(word.split("=", 1) for word in assigned)
    return variables, words[start:]


def hosts(args: list[str]) -> list[str]:
    """The hosts a torchrun command names for its rendezvous (not a file's path)."""
    named = []
    for flag, value in zip(args, args[1:]):
        if flag == "--master-addr":
            named.append(value)
        elif flag == "--rdzv-endpoint" and ":" in value:
            named.append(value.rsplit(":", 1)[0])
    return named


def on_one_machine(args: list[str]) -> bool:
    return all(rendezvous.loopback_address(host) for host in hosts(args))


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun's workers, their helpers): one pass over
    ``/proc``, cheap enough to repeat while the job runs."""
    below: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # it ended while we looked
                continue
            below.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += below.get(found[-1], [])
    return found


def listening(pids: list[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket that ``pids`` hold."""
    owner = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # it ended while we looked
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in owner:  # 0A: LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port, 16), owner[inode]))
    return found


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads sockets by process from /proc (Linux)")
def test_the_readme_torchrun_command_listens_on_loopback_only(tmp_path):
    (block, words), *_ = torchrun_commands("README.md")
    variables, args = split_command(words)
    args = [str(TORCHRUN), *args[1:], "--batch-size", "16"]
    args[args.index("--steps") + 1] = "2"
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(variables, COURSE_FAST="1", TMPDIR=str(tmp_path))  # torchrun's files: in tmp_path
    log = tmp_path / "torchrun.log"
    seen: set[tuple[str, int, int]] = set()
    with log.open("w") as out:
        agent = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    tree = [agent.pid]
    try:
        deadline = time.monotonic() + HANG_GUARD_S * 2
        while agent.poll() is None and time.monotonic() < deadline:
            tree = sorted(set(tree) | set(descendants(agent.pid)))
            seen |= listening(tree)
            time.sleep(0.05)
        assert agent.wait(timeout=10) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        kill_tree(tree)
    assert "final loss" in log.read_text()
    workers = {pid for _, _, pid in seen if pid != agent.pid}
    assert workers, "no worker was seen listening (its store, gloo): the listing saw nothing"
    outside = sorted((a, port, "agent" if pid == agent.pid else "worker") for a, port, pid in seen)
    assert all(address in LOOPBACK for address, _, _ in outside), outside


def test_every_one_machine_torchrun_command_in_the_docs_uses_the_loopback_flags():
    one_machine, many = [], []
    for path in DOCS:
        for block, words in torchrun_commands(path):
            variables, args = split_command(words)
            (one_machine if on_one_machine(args) else many).append((path, block, variables, args))
    assert len(one_machine) >= 4 and len(many) >= 2  # README, command_line.md, scripts: all found
    flags = rendezvous.TORCHRUN_ON_ONE_MACHINE
    for path, block, variables, args in one_machine:
        command = shlex.join(args)
        assert "--standalone" not in args, f"{path}: {command}"
        for flag, value in zip(flags[::2], flags[1::2]):
            assert f"{flag} {value}" in command, f"{path} lacks {flag} {value}: {command}"
        for name, value in rendezvous.TORCHRUN_ENV.items():
            exported = re.search(rf"^\s*export .*\b{name}={value}\b", block, re.MULTILINE)
            assert variables.get(name) == value or exported, f"{path} lacks {name}: {command}"


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


def env_rendezvous_listens_on():
    """A worker meeting the others as under torchrun (``env://``, ``MASTER_ADDR`` 127.0.0.1, no
    ``GLOO_SOCKET_IFNAME``): where it listens once gloo has connected, and gloo's interface."""
    os.environ.pop("GLOO_SOCKET_IFNAME", None)  # torchrun sets none: the launcher's is removed
    with launch.process_group(device="cpu", timeout_s=30):
        dist.all_reduce(torch.ones(1))
        return listening_addresses(), os.environ.get("GLOO_SOCKET_IFNAME")


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads sockets by process from /proc (Linux)")
def test_a_rendezvous_at_a_loopback_address_keeps_the_store_and_gloo_on_loopback():
    ranks = launch.run(env_rendezvous_listens_on, 2, init_group=False, device="cpu")
    for addresses, interface in ranks:
        assert addresses and all(a in LOOPBACK for a in addresses), addresses
        assert interface == rendezvous.loopback_interface()
    assert len(ranks[0][0]) > len(ranks[1][0])  # rank 0 also hosts the store: on loopback too


# --- 2. a collective times out: the late rank is named ------------------------------------------


def launch_folders() -> list[Path]:
    """Rendezvous folders of this process's launches that still exist."""
    return list(Path(tempfile.gettempdir()).glob(f"{rendezvous.PREFIX}{os.getpid()}-*"))


def stop_one_rank(stopped: int):
    dist.barrier()  # every rank is running...
    if dist.get_rank() == stopped:
        os.kill(os.getpid(), signal.SIGSTOP)  # ...when one is stopped (kill -STOP, Ctrl-Z)
    dist.all_reduce(torch.ones(1))


@pytest.mark.filterwarnings("ignore:3 workers on")  # 3 workers on a 2-core machine take turns
def test_a_stopped_worker_is_named_not_the_ranks_that_waited_for_it():
    start = time.monotonic()
    try:
        with pytest.raises(launch.WorkerError) as info:
            launch.run(stop_one_rank, 3, 2, group_timeout=3, device="cpu")
    finally:
        left = workers_left()
        kill_tree(left)  # a clean-up, in case: the launcher must leave nothing (asserted below)
    error = info.value
    assert error.late == {2: "stopped: SIGSTOP or Ctrl-Z"}  # ranks 0 and 1 waited: not blamed
    first_line = str(error).splitlines()[0]
    assert error.rank in (0, 1) and first_line.startswith(
        f"worker rank {error.rank} timed out waiting for rank 2 (stopped: SIGSTOP or Ctrl-Z): "
    ), first_line
    assert "Timed out" in first_line  # gloo's own words follow
    assert time.monotonic() - start < HANG_GUARD_S  # the group's 3 s, not the launch's 300
    assert left == [] and launch_folders() == []


def ddp_step_with_rank_1_stopped():
    model = DistributedDataParallel(torch.nn.Linear(4, 4))
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    model(torch.ones(2, 4)).sum().backward()  # DDP's all-reduce of the gradients waits for rank 1


def test_a_ddp_step_with_a_stopped_rank_names_it():
    # The case: training under DDP, one worker stopped mid-step.
    try:
        with pytest.raises(launch.WorkerError) as info:
            launch.run(ddp_step_with_rank_1_stopped, 2, group_timeout=2, timeout=30, device="cpu")
    finally:
        left = workers_left()
        kill_tree(left)
    assert info.value.rank == 0 and info.value.late == {1: "stopped: SIGSTOP or Ctrl-Z"}
    assert left == [] and launch_folders() == []


class HangsWhenFreed:
    """Stands for a DDP model after a timeout: freeing its process group can deadlock (a gloo
    thread waits for the GIL that the freeing thread holds)."""

    def __del__(self):
        time.sleep(600)


def fail_holding_what_hangs_when_freed():
    held = HangsWhenFreed()  # noqa: F841 (freed with this frame, when the error is freed)
    raise RuntimeError("Timed out waiting 2000ms for recv operation to complete")


def test_the_error_is_sent_before_the_failed_frames_are_freed():
    start = time.monotonic()
    with pytest.raises(launch.WorkerError, match="Timed out waiting 2000ms"):
        launch.run(fail_holding_what_hangs_when_freed, 1, timeout=20, init_group=False)
    assert time.monotonic() - start < 10  # not the launch's 20 s: it was not stuck freeing
    assert workers_left() == []


def busy_elsewhere():
    time.sleep(600)


def one_rank_busy_elsewhere():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 is somewhere else
    else:
        busy_elsewhere()


def test_a_rank_busy_elsewhere_is_named_with_its_stack():
    start = time.monotonic()
    with pytest.raises(launch.WorkerError) as info:
        launch.run(one_rank_busy_elsewhere, 2, group_timeout=2, device="cpu")
    error = info.value
    assert error.rank == 0 and error.late == {1: "still running"}
    assert str(error).startswith("worker rank 0 timed out waiting for rank 1 (still running): ")
    assert "busy_elsewhere" in error.stacks[1]
    assert "--- rank 1 was here ---" in str(error)
    assert time.monotonic() - start < HANG_GUARD_S
    assert workers_left() == [] and launch_folders() == []


def both_receive_first():
    x = torch.zeros(1)
    dist.recv(x, src=1 - dist.get_rank())  # each waits for the other: a deadlock, nobody late


def test_ranks_that_all_waited_are_not_blamed_on_each_other():
    with pytest.raises(launch.WorkerError) as info:
        launch.run(both_receive_first, 2, group_timeout=2, device="cpu")
    assert info.value.late == {}
    assert str(info.value).startswith(f"worker rank {info.value.rank} failed: ")
    assert workers_left() == []
