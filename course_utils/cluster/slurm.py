"""SLURM on the cluster's nodes (lesson 14, ``scripts/slurm_ddp.sbatch``): Debian's ``munged``,
``slurmctld`` and one ``slurmd`` per node, so that ``sbatch`` allocates nodes and ``srun`` starts
tasks on them the way it does on a real cluster, with every byte between nodes on their links.

What runs where, everything started by :func:`course_utils.cluster.spawn` and so on a node:

- **Authentication**: every SLURM message carries a credential from MUNGE, made and checked with a
  key that all the nodes share. One ``munged``, on node 0, with a key of its own (``munge.key``,
  readable by root only) and its socket in the folder: a socket is a file, and the nodes share
  the file system (only their network and host names are their own), so every node's daemons and
  commands reach it (``AuthInfo=socket=...``). The system's ``/etc/munge`` is never read.
- **The controller**, ``slurmctld`` on node 0 (``SlurmctldHost=node0``): it holds the queue, and
  it hands each job its nodes. ``sbatch``, ``squeue`` and ``scontrol`` ask it, from node 0.
- **One ``slurmd`` per node** (``slurmd -N nodeI``): it starts a job's tasks there (through
  ``slurmstepd``). Every ``slurmd`` listens on the same port, 6818: each listens in its own
  network namespace, on its own address, as on separate machines.

Everything SLURM keeps lives in one folder: its ``slurm.conf`` (and a ``cgroup.conf``), the
controller's state, each node's spool, the logs (``slurmctld.log``, ``nodeI/slurmd.log``,
``munged.log``). Nothing of the system's ``/etc/slurm``, services or daemons is touched.

**Cgroups.** ``slurmd`` looks for cgroups under ``/sys/fs/cgroup``, but ``ip netns exec`` mounts
a fresh ``/sys`` for the node's network, with no cgroups in it; the default (``autodetect``) then
stops ``slurmd`` ("No filesystem mounted on /sys/fs/cgroup", "slurmd initialization failed"). Here
nothing needs cgroups (tasks are tracked through ``/proc``: ``proctrack/linuxproc``,
``task/none``), so ``cgroup.conf`` names the v1 plugin outright, at a mount point that does not
exist: the plugin looks there only to constrain a job, and nothing does.

``python -m course_utils.cluster.slurm up|status|down`` does it on a cluster made by
``scripts/cluster up`` (the folder: ``/run/course-cluster/<name>-slurm``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from course_utils import cluster as nodes

PARTITION = "course"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}
FINAL |= {"BOOT_FAIL", "PREEMPTED"}  # a job in one of these states runs no more
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")


class SlurmError(RuntimeError):
    """SLURM did not come up or did not answer: says what, and which log to read."""


def unavailable() -> str | None:
    """None where SLURM can run on a cluster here; else why not, in one line."""
    problem = nodes.unavailable()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if problem is None and missing:
        problem = f"SLURM needs {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)"
    return problem


def environment(conf: Path, extra: dict | None = None) -> dict:
    """This environment with ``SLURM_CONF`` naming ``conf`` and no job's or launcher's variables."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    return env | (extra or {}) | {"SLURM_CONF": str(conf)}


def config(cluster: nodes.Cluster, folder: Path) -> str:
    """slurm.conf: controller on node 0, a node line per node, no accounting, no cgroups."""
    cpus = os.cpu_count() or 1  # every node sees all of the machine's cores
    lines = [
        f"ClusterName={cluster.name}",
        f"SlurmctldHost={cluster.hostname(0)}({cluster.address(0)})",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge.socket'}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",  # the same on every node: each listens in its own namespace
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdSpoolDir={folder / '%n' / 'spool'}",
        f"SlurmdPidFile={folder / '%n' / 'slurmd.pid'}",
        f"SlurmdLogFile={folder / '%n' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",  # tasks found through /proc: no cgroups
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "EnforcePartLimits=ALL",  # a job that can never fit is refused when submitted
        "MpiDefault=none",
        "ReturnToService=2",  # a node that answers again is used again
        "MailProg=/bin/true",  # no mail is sent (the default program is not installed)
    ]
    for i in range(cluster.nodes):
        name, address = cluster.hostname(i), cluster.address(i)
        lines.append(f"NodeName={name} NodeAddr={address} NodeHostname={name} CPUs={cpus}")
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@dataclass
class Slurm:
    """A running SLURM on ``cluster``: its folder and its daemons (munged, slurmctld, nodeI)."""

    cluster: nodes.Cluster
    folder: Path
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def run(self, argv: list[str], env: dict | None = None, cwd=None, timeout: float = 30.0) -> str:
        """A SLURM command on node 0 (sinfo, scontrol, sbatch...): what it printed."""
        proc = nodes.spawn(
            self.cluster, 0, argv, env=environment(self.conf, env), cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SlurmError(f"{' '.join(argv)}: no answer in {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)}: {(err or out).strip()}")
        return out

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        """Submit a batch job from node 0 (``env``: the job's environment, ``cwd``: its submit
        folder); returns its id."""
        return self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, NodeList, ExitCode, Reason, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id])
        return dict(word.split("=", 1) for word in out.split() if "=" in word)

    def wait(self, job_id: str, timeout: float = 300.0) -> str:
        """Poll the job until it ends; its final state (COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "?")
            if state in FINAL:
                return state
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} still {state} ({info.get('Reason')}) after {timeout:.0f} s: "
                    f"read its output and {self.folder / 'slurmctld.log'}"
                )
            time.sleep(0.5)

    def states(self) -> dict[str, str]:
        """Each node's state as sinfo says it (idle, alloc, down*, ...)."""
        out = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], timeout=10)
        return dict(line.split() for line in out.splitlines() if line.strip())

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop the daemons (SIGTERM, then SIGKILL), then whatever of its jobs is left on the
        nodes. The folder stays, with the logs."""
        for name in sorted(self.daemons, key=lambda name: name == "munged"):  # munged last
            daemon = self.daemons[name]
            if daemon.poll() is None:
                daemon.terminate()
            try:
                daemon.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        _kill(processes(self.folder, self.cluster))


def start(cluster: nodes.Cluster, folder: str | Path, timeout: float = 30.0) -> Slurm:
    """Bring SLURM up on ``cluster``, keeping everything in ``folder`` (absent or empty): key,
    munged, slurm.conf, slurmctld on node 0, a slurmd on each node. Returns once ``sinfo`` shows
    every node idle; on failure stops what it started and raises SlurmError naming the log."""
    problem = unavailable()
    if problem:
        raise SlurmError(problem)
    folder = Path(folder).absolute()
    if folder.exists() and any(folder.iterdir()):
        raise SlurmError(f"{folder} is not empty: give SLURM a folder of its own")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o711)  # others may reach the munge socket, not list the folder
    for i in range(cluster.nodes):
        (folder / cluster.hostname(i) / "spool").mkdir(parents=True)
    (folder / "state").mkdir()
    slurm = Slurm(cluster, folder)
    try:
        _start(slurm, timeout)
    except BaseException:
        slurm.stop()
        raise
    return slurm


def _start(slurm: Slurm, timeout: float) -> None:
    folder, cluster = slurm.folder, slurm.cluster
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    slurm.conf.write_text(config(cluster, folder))
    # no cgroups in a node's /sys (see the module's docstring); this plugin looks only when asked
    (folder / "cgroup.conf").write_text(
        f"CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nCgroupMountpoint={folder / 'no-cgroup'}\n"
    )
    munged = ["munged", "--foreground", "--force", f"--socket={folder / 'munge.socket'}"]
    munged += [f"--key-file={key}", f"--seed-file={folder / 'munged.seed'}"]
    munged += [f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}"]
    _daemon(slurm, "munged", 0, munged)
    _until(lambda: (folder / "munge.socket").exists(), timeout, slurm)
    _daemon(slurm, "slurmctld", 0, ["slurmctld", "-D", "-f", slurm.conf])
    for i in range(cluster.nodes):
        host = cluster.hostname(i)
        _daemon(slurm, host, i, ["slurmd", "-D", "-N", host, "-f", slurm.conf])

    def all_idle() -> bool:
        try:
            states = slurm.states()
        except SlurmError:
            return False  # the controller is not listening yet
        return all(states.get(cluster.hostname(i)) == "idle" for i in range(cluster.nodes))

    _until(all_idle, timeout, slurm)


def logs(slurm: Slurm, name: str) -> list[Path]:
    """Where daemon ``name`` writes: its log, and what it printed (a bad slurm.conf is reported
    there only, before the log opens; in the foreground munged prints its log)."""
    if name == "munged":
        return [slurm.folder / "munged.log"]
    stem = slurm.folder / name / "slurmd" if name.startswith("node") else slurm.folder / name
    return [stem.with_suffix(".log"), stem.with_suffix(".out")]


def _daemon(slurm: Slurm, name: str, node: int, argv: list) -> None:
    """Start one daemon in the foreground on ``node``."""
    with open(logs(slurm, name)[-1], "ab") as out:
        slurm.daemons[name] = nodes.spawn(
            slurm.cluster, node, argv, env=environment(slurm.conf),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C or hang-up is not for the daemons
        )  # fmt: skip


def _until(ready, timeout: float, slurm: Slurm) -> None:
    """Wait until ``ready()``; a daemon that exits, or the timeout, raises SlurmError naming the
    logs to read."""
    deadline = time.monotonic() + timeout
    while not ready():
        for name, daemon in slurm.daemons.items():
            if daemon.poll() is not None:
                read = " and ".join(map(str, logs(slurm, name)))
                raise SlurmError(f"{name} exited with {daemon.returncode}: read {read}")
        if time.monotonic() > deadline:
            try:
                seen = f"nodes {slurm.states()}"
            except SlurmError as err:
                seen = str(err)
            read = ", ".join(str(p) for name in slurm.daemons for p in logs(slurm, name))
            raise SlurmError(f"SLURM not ready after {timeout:.0f} s ({seen}): read {read}")
        time.sleep(0.2)


def processes(folder: str | Path, cluster: nodes.Cluster | None = None) -> list[int]:
    """The processes of the SLURM in ``folder``: the daemons (their arguments name the folder) and
    what they started (``SLURM_CONF`` names its slurm.conf); only those on ``cluster``'s nodes
    when it is given."""
    folder = Path(folder).absolute()
    mark, conf = str(folder).encode(), b"SLURM_CONF=" + str(folder / "slurm.conf").encode()
    if cluster is None:
        pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    else:
        pids = [pid for i in range(cluster.nodes) for pid in nodes.pids(cluster.namespace(i))]
    found = []
    for pid in set(pids) - {os.getpid()}:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        values = [arg.split(b"=", 1)[-1] for arg in args]  # --socket=PATH: PATH
        if conf in env or any(v == mark or v.startswith(mark + b"/") for v in values):
            found.append(pid)
    return sorted(found)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``up``: SLURM on a running cluster; ``status``: its nodes; ``down``: stop it, remove its
    folder (the cluster stays)."""
    p = argparse.ArgumentParser(prog="python -m course_utils.cluster.slurm", description=__doc__)
    p.add_argument("action", choices=("up", "status", "down"))
    p.add_argument("--name", default=nodes.NAME, help="the cluster's name (default: course)")
    args = p.parse_args(argv)
    folder = nodes.STATE / f"{args.name}-slurm"
    made = nodes.find(args.name)
    if args.action == "down":
        _kill(processes(folder, made) if made else [])
        shutil.rmtree(folder, ignore_errors=True)
        print(f"slurm on {args.name}: stopped, {folder} removed")
        return 0
    if made is None:
        print(f"slurm: cluster {args.name} is not up (scripts/cluster up)", file=sys.stderr)
        return 1
    running = processes(folder, made)
    try:
        if args.action == "status":
            print(Slurm(made, folder).run(["sinfo"]) if running else "slurm: not running\n", end="")
            return 0 if running else 1
        if running:
            print(f"slurm on {args.name}: already up ({folder})", file=sys.stderr)
            return 1
        shutil.rmtree(folder, ignore_errors=True)  # what a stopped one left: logs, state
        start(made, folder)
    except SlurmError as err:
        print(f"slurm: {err}", file=sys.stderr)
        return 1
    print(f"slurm on {args.name}: up, every node idle; its files in {folder}")
    print(f"  export SLURM_CONF={folder / 'slurm.conf'}")
    print("  scripts/cluster run 0 -- sinfo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
