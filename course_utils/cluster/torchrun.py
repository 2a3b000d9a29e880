"""torchrun across the cluster's nodes: one agent per node, as on a real cluster, started in the
node's namespaces with the node's link named for gloo (``GLOO_SOCKET_IFNAME=eth0``).

Two ways for the agents to meet (``rdzv``):

- ``"static"``: each agent is told its node rank and node 0's address (``--master-addr``), where
  node 0's agent hosts the store. Fixed number of nodes; no restarts across a lost node.
- ``"c10d"``: the agents meet at a rendezvous on node 0 (``--rdzv-endpoint node0:PORT``) and get
  their ranks there; with ``nnodes="1:2"`` the job goes on with one node when the other is lost,
  and ``--max-restarts`` restarts the workers after a failure. Each round gets a fresh store
  (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: pytorch/pytorch#135712).

The command the agents run is the course's entry point, unchanged (``python -m
course_utils.train``); :func:`job` starts them, :func:`finish` waits for them, and :func:`results`
waits, cleans up and reads what rank 0 wrote (``--json``), or raises with every node's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from course_utils.cluster import LINK, Cluster, spawn

PORT = 29500  # node 0's rendezvous port (on the cluster's link; nothing listens on the host)
# c10d's defaults wait 15 s to notice a lost node (3 missed heartbeats, 5 s apart), then 30 s for
# late joiners once enough nodes are in (the last call): on a one-machine cluster, seconds will do.
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=5"
TORCHRUN = Path(sys.executable).parent / "torchrun"  # beside this environment's python


def environment(extra: dict | None = None) -> dict:
    """A node's environment: this one without a launcher's rank variables, with gloo on the link,
    sleeping OpenMP threads, a fresh rendezvous store per round, and no warnings about reverse
    lookups of addresses (the nodes have no DNS)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"GLOO_SOCKET_IFNAME": LINK, "OMP_WAIT_POLICY": "PASSIVE"}
    env |= {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}
    return env | (extra or {})


def command(
    cluster: Cluster,
    node: int,
    train_args: list[str],
    nnodes: str = "2",
    nproc_per_node: int = 1,
    rdzv: str = "static",
    max_restarts: int = 0,
    job_id: str = "course",
    port: int = PORT,
    rdzv_conf: str = RDZV_CONF,
    head: int = 0,
) -> list[str]:
    """The torchrun command for ``node`` (run there with :func:`course_utils.cluster.spawn`);
    the rendezvous is on node ``head`` (another one when node 0 is lost and the job starts again
    on the nodes that are left)."""
    if rdzv not in ("static", "c10d"):
        raise ValueError(f"rdzv must be 'static' or 'c10d', got {rdzv!r}")
    head = cluster.address(head)
    argv = [str(TORCHRUN), "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node)]
    if rdzv == "static":
        argv += ["--node-rank", str(node), "--master-addr", head, "--master-port", str(port)]
    else:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:{port}"]
        argv += ["--rdzv-id", job_id, "--local-addr", cluster.address(node)]
        argv += ["--rdzv-conf", rdzv_conf] if rdzv_conf else []
    argv += ["--max-restarts", str(max_restarts)]
    return argv + ["-m", "course_utils.train", *train_args]


@dataclass
class Job:
    """A torchrun agent per node, each writing what it prints to a file."""

    cluster: Cluster
    agents: dict[int, subprocess.Popen] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)

    def log(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def stop(self) -> None:
        """Kill every agent still running and its workers (what is in each node stays there)."""
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def job(
    cluster: Cluster,
    train_args: list[str],
    nodes: list[int] | None = None,
    logs: str | Path | None = None,
    env: dict | None = None,
    **options,
) -> Job:
    """Start one torchrun agent on each of ``nodes`` (default: every node) running the entry point
    with ``train_args``; ``options`` go to :func:`command`. Output goes to ``logs/node<i>.log``."""
    folder = Path(logs or tempfile.mkdtemp(prefix="cluster-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = Job(cluster)
    for node in range(cluster.nodes) if nodes is None else nodes:
        path = folder / f"node{node}.log"
        with open(path, "wb") as out:
            argv = command(cluster, node, train_args, **options)
            started.agents[node] = spawn(
                cluster, node, argv, stdout=out, stderr=subprocess.STDOUT, env=environment(env)
            )
        started.logs[node] = path
    return started


def finish(started: Job, timeout: float = 300.0) -> dict[int, int]:
    """Wait for every agent (killing all of them ``timeout`` seconds from now); exit codes by node."""
    codes, deadline = {}, time.monotonic() + timeout
    try:
        for node, agent in started.agents.items():
            codes[node] = agent.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        started.stop()
        raise
    return codes


def results(started: Job, timeout: float, out: str | Path, lost: int | None = None) -> dict:
    """What rank 0 of ``started`` wrote to ``out`` (the entry point's ``--json``), once every agent
    has ended (:func:`finish`; whatever is left after ``timeout`` seconds is stopped). Raises
    RuntimeError with the end of every node's log when the job ran past ``timeout``, an agent
    failed (but the ``lost`` node's, one killed on purpose) or nothing was written. Each agent's
    exit code stays in its ``returncode``."""
    try:
        codes = finish(started, timeout)
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        started.stop()
    if codes is None:
        what = f"ran past {timeout:.0f} s"
    elif any(code for node, code in codes.items() if node != lost):
        what = f"failed (exit codes {codes})"
    elif not Path(out).exists():
        what = f"wrote no {out}"
    else:
        return json.loads(Path(out).read_text())
    tails = "\n".join(f"node{node}: {started.log(node)[-1500:]}" for node in started.logs)
    raise RuntimeError(f"the job {what}:\n{tails}")
