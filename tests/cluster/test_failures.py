"""Failures across machines, on a cluster of network namespaces (issue 26; scripts/README.md,
"Surviving a failure"): a worker killed, a whole node lost, the node that hosts the rendezvous
lost, a link cut mid-step. One torchrun agent per node runs the course's entry point, and every
case ends with the per-step losses of one process that was never interrupted. What torchrun did
is read from each agent's log.

Two ways a node can die. :func:`course_utils.cluster.kill_node` kills its processes, but its
kernel lives on and answers its peers' packets with resets, so their connections fail at once: a
crashed program. A machine that loses power sends nothing more, not even a reset: its link is cut
first (``kill_node(..., silent=True)``), and the peers learn of it only through their own timeouts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cluster_support import needs_cluster, running, single_process

from course_utils import cluster, loop, restart
from course_utils.cluster import torchrun
from course_utils.launch import postmortem, processes

NAME = "fail"  # this file's cluster
STEPS, EVERY, BATCH = 20, 5, 32  # a checkpoint every EVERY steps
TIMEOUT_S = 5  # --timeout: how long a collective waits for the other ranks
JOB_S = 120  # a whole job, start-up and a restart included (15-40 s here, on 2 busy cores)
BOUND_S = 30  # how long an agent may take to exit after a failure (6-10 s here)
# A node's kernel gives up on a peer that stopped answering after tcp_retries2 retransmissions:
# 15 by default (16 minutes, measured here); 3 is about 3 s (200 ms, doubling).
TCP_RETRIES = 3
# One line per rank of a failed collective (course_utils.launch.postmortem.where_it_failed)
WHERE = re.compile(r"^train: error: rank (\d+) \((node\d+)\): step (\d+) (.+?) (timed out|failed)")


def train_args(work: Path, parallel: str = "ddp") -> list[str]:
    return [
        "--model", "cnn", "--parallel", parallel, "--steps", str(STEPS),
        "--batch-size", str(BATCH), "--timeout", str(TIMEOUT_S),
        "--checkpoint", str(work / "checkpoint"), "--checkpoint-every", str(EVERY),
        "--json", str(work / "run.json"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted() -> list[float]:
    """The per-step losses of one process training alone, never stopped."""
    return single_process(model="cnn", batch_size=BATCH, steps=STEPS)["losses"]


def logs(job: torchrun.Job) -> str:
    return "".join(f"\n--- node{n} ---\n{job.log(n)[-3000:]}" for n in job.logs)


def first_checkpoint(job: torchrun.Job) -> None:
    """Wait until a checkpoint is saved (the job's rank 0 says so, on whichever node it is)."""
    deadline = time.monotonic() + JOB_S
    while not any(restart.SAVED in job.log(n) for n in job.logs):
        assert all(agent.poll() is None for agent in job.agents.values()), logs(job)
        assert time.monotonic() < deadline, f"no checkpoint in {JOB_S} s{logs(job)}"
        time.sleep(0.05)


def exits(job: torchrun.Job, nodes: list[int], within: float) -> dict[int, int]:
    """The exit codes of the agents on ``nodes``, each of which must exit within ``within`` s."""
    deadline, codes = time.monotonic() + within, {}
    for node in nodes:
        try:
            codes[node] = job.agents[node].wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"node{node}'s agent still runs after {within} s{logs(job)}")
    return codes


def worker(c: cluster.Cluster, node: int) -> int:
    """The pid of the worker on ``node``: the process there that torchrun gave a RANK."""
    found = [pid for pid in cluster.pids(c.namespace(node)) if "RANK" in processes.environ(pid)]
    assert len(found) == 1, found
    return found[0]


def tcp_retries(c: cluster.Cluster, node: int, retries: int) -> None:
    """Set how many times ``node``'s kernel retransmits to a silent peer before it gives up."""
    path = "/proc/sys/net/ipv4/tcp_retries2"  # one per network namespace
    subprocess.run(
        ["ip", "netns", "exec", c.namespace(node), "sh", "-c", f"echo {retries} > {path}"],
        check=True,
    )


def alone(c: cluster.Cluster, node: int, args: list[str], folder: Path) -> torchrun.Job:
    """A job on ``node`` only, meeting at a c10d rendezvous on its own address: what a scheduler
    starts on the nodes that are left."""
    return torchrun.job(c, args, nodes=[node], logs=folder, nnodes="1", rdzv="c10d", head=node)


def resumed(work: Path, uninterrupted: list[float], nproc: int) -> None:
    """Check the job's results: resumed from a checkpoint (not step 0) on ``nproc`` workers, with every
    step's loss equal to the uninterrupted run's."""
    result = json.loads((work / "run.json").read_text())
    assert result["nproc"] == nproc
    assert result["resumed_from_step"] in range(EVERY, STEPS, EVERY), result["resumed_from_step"]
    assert len(result["losses"]) == STEPS
    torch.testing.assert_close(result["losses"], uninterrupted, rtol=1e-4, atol=0)


GLOO_TIMEOUT = "Timed out waiting 5000ms for recv operation to complete"
GLOO_RESET = "Read error [10.99.0.2]:20669: Connection reset by peer"
GLOO = "[/src/third_party/gloo/gloo/transport/tcp/pair.cc:537] "  # where gloo raised


def failing_fit(first_step: int, at: int, in_backward: bool, message: str) -> BaseException:
    """What :func:`loop.fit` raises when a collective fails in the ``at``-th step it runs: in the
    backward pass (a gradient's hook, where DDP's all-reduce waits) or in the sum of the losses."""
    model = torch.nn.Linear(4, 2)
    calls = itertools.count()

    def fail(tensor: torch.Tensor) -> torch.Tensor:
        if next(calls) == at:
            raise RuntimeError(GLOO + message + ". This is typically caused by a remote worker.")
        return tensor

    if in_backward:
        model.weight.register_hook(fail)
    batches = ((torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError) as caught:
        loop.fit(
            model, optimizer, batches, 5, progress=False, first_step=first_step,
            reduce=None if in_backward else fail,
        )  # fmt: skip
    return caught.value


def test_a_failed_collective_is_told_in_one_line_with_rank_node_step_and_operation():
    node = socket.gethostname()
    err = failing_fit(first_step=5, at=2, in_backward=True, message=GLOO_TIMEOUT)
    assert postmortem.collective_failure(err)
    line = postmortem.where_it_failed("ddp", 5, 1, err)
    timed_out = f"timed out after 5 s: {GLOO_TIMEOUT}"
    assert line == f"rank 1 ({node}): step 8 gradient all-reduce (backward) {timed_out}"
    err = failing_fit(first_step=0, at=0, in_backward=True, message=GLOO_RESET)
    line = postmortem.where_it_failed("fsdp", 5, 0, err)
    assert (
        line == f"rank 0 ({node}): step 1 gradient reduce-scatter (backward) failed: {GLOO_RESET}"
    )
    err = failing_fit(first_step=10, at=0, in_backward=False, message=GLOO_TIMEOUT)
    line = postmortem.where_it_failed("ddp", 5, 0, err)
    assert line == f"rank 0 ({node}): step 11 losses' all-reduce {timed_out}"  # sums every step
    assert postmortem.collective_failure(torch.distributed.DistNetworkError("Broken pipe"))
    for other in (ValueError(GLOO), RuntimeError("CUDA out of memory"), KeyboardInterrupt()):
        assert not postmortem.collective_failure(other)


@needs_cluster
def test_a_killed_worker_is_restarted_with_its_peer_from_the_checkpoint(tmp_path, uninterrupted):
    # 2 nodes x 1 worker, c10d, --max-restarts 1: node 1's worker is SIGKILLed after the first
    # checkpoint; torchrun stops node 0's worker too and starts both again, from the checkpoint.
    with running(NAME) as c:
        job = torchrun.job(
            c, train_args(tmp_path), logs=tmp_path / "logs", rdzv="c10d", max_restarts=1
        )
        try:
            first_checkpoint(job)
            os.kill(worker(c, 1), signal.SIGKILL)
            codes = exits(job, [0, 1], JOB_S)
        finally:
            job.stop()
    assert codes == {0: 0, 1: 0}, logs(job)
    assert "failed (exitcode: -9)" in job.log(1), logs(job)  # torchrun saw its worker killed
    resumed(tmp_path, uninterrupted, nproc=2)  # both workers again


@needs_cluster
def test_a_lost_node_leaves_the_survivor_to_finish_on_fewer_ranks(tmp_path, uninterrupted):
    # --nnodes 1:2, FSDP (sharded DCP checkpoints): node 1 is killed after a checkpoint of two
    # ranks' shards; node 0 goes on alone from it, the shards redistributed onto one rank.
    args = train_args(tmp_path, "fsdp")
    with running(NAME) as c:
        job = torchrun.job(
            c, args, logs=tmp_path / "logs", rdzv="c10d", nnodes="1:2", max_restarts=1
        )
        try:
            first_checkpoint(job)
            assert cluster.kill_node(c, 1)
            saved = tmp_path / "checkpoint" / "latest.dcp"
            shards_before = len(list(saved.glob("*.distcp")))  # no save runs until the restart
            codes = exits(job, [0], JOB_S)
        finally:
            job.stop()
    assert codes == {0: 0}, logs(job)
    assert shards_before == 2 and len(list(saved.glob("*.distcp"))) == 1
    assert f"checkpoint: step {STEPS} saved" in job.log(0), logs(job)
    resumed(tmp_path, uninterrupted, nproc=1)


@needs_cluster
def test_a_lost_rendezvous_host_ends_the_job_and_the_survivor_starts_it_again(
    tmp_path, uninterrupted
):
    # Node 0 runs a worker and hosts the c10d rendezvous; it loses power. Node 1's agent can't
    # go on alone (--nnodes 1:2 notwithstanding): the rendezvous is gone with node 0. Its
    # heartbeats wait for answers, and the store's client waits without a time limit once its
    # own has passed (TCPStore's cancelled wait), so the agent stops only when the kernel gives
    # up on the connection: after ~15 minutes by default, here after TCP_RETRIES retransmissions.
    # Then a scheduler's move: the job again on the survivor, at a rendezvous of its own.
    args = train_args(tmp_path)
    with running(NAME) as c:
        tcp_retries(c, 1, TCP_RETRIES)
        job = torchrun.job(
            c, args, logs=tmp_path / "logs", rdzv="c10d", nnodes="1:2", max_restarts=1
        )
        try:
            first_checkpoint(job)
            cluster.kill_node(c, 0, silent=True)
            codes = exits(job, [1], BOUND_S)
        finally:
            job.stop()
        assert codes == {1: 1}, logs(job)
        assert "RendezvousConnectionError" in job.log(1), logs(job)
        again = alone(c, 1, args, tmp_path / "again")
        try:
            codes = exits(again, [1], JOB_S)
        finally:
            again.stop()
    assert codes == {1: 0}, logs(again)
    resumed(tmp_path, uninterrupted, nproc=1)


@needs_cluster
def test_a_cut_link_times_out_on_every_rank_and_the_mended_job_resumes(tmp_path, uninterrupted):
    # Static rendezvous (the agents use node 0's store only to start). Node 1's cable is pulled
    # mid-run: the collective under way waits --timeout seconds on both sides, each rank says
    # where it was, both agents exit. The link mended, the job starts again from the checkpoint.
    args = train_args(tmp_path)
    with running(NAME) as c:
        job = torchrun.job(c, args, logs=tmp_path / "cut", rdzv="static")
        try:
            first_checkpoint(job)
            cluster.set_link(c, 1, False)
            codes = exits(job, [0, 1], BOUND_S)
        finally:
            job.stop()
        assert codes == {0: 1, 1: 1}, logs(job)
        ranks = []
        for node in (0, 1):  # one line each: rank, node, step (after the checkpoint), operation
            said = [m for m in map(WHERE.match, job.log(node).splitlines()) if m]
            assert len(said) == 1, logs(job)
            rank, host, step, operation, outcome = said[0].groups()
            assert host == f"node{node}" and int(step) > EVERY and operation, said[0].string
            assert outcome == "timed out" and f"after {TIMEOUT_S} s: " in said[0].string
            ranks.append(int(rank))
        assert sorted(ranks) == [0, 1]
        cluster.set_link(c, 1, True)
        again = torchrun.job(c, args, logs=tmp_path / "mended", rdzv="static")
        try:
            codes = exits(again, [0, 1], JOB_S)
        finally:
            again.stop()
    assert codes == {0: 0, 1: 0}, logs(again)
    resumed(tmp_path, uninterrupted, nproc=2)
