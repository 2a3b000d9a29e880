"""SLURM on the cluster (``course_utils.cluster.slurm``, ``scripts/slurm_ddp.sbatch``): munged,
slurmctld and a slurmd per node come up in the nodes' namespaces, the course's SLURM script in its
CPU form trains across both nodes with the losses of one process, its tasks ran on both nodes and
its gradients crossed both links, and nothing of SLURM is left afterwards."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster_support import needs_cluster, running, single_process
from conftest import ROOT

from course_utils import cluster, models
from course_utils.cluster import slurm, torchrun

REASON = slurm.unavailable()
pytestmark = [
    needs_cluster,
    pytest.mark.skipif(REASON is not None, reason=f"no SLURM here: {REASON}"),
]
SETTINGS = dict(model="cnn", batch_size=32, steps=20, seed=0)
PER_NODE = (1, 2)  # workers per node: one job each, both at once, each on one core of a node
JOB_TIMEOUT_S = 180  # the two jobs take 15-35 s here, most of it starting Python and torch


def gradient_bytes() -> int:
    return 4 * sum(p.numel() for p in models.MODELS["cnn"]().parameters())


def submit(slurm_: slurm.Slurm, out, per_node: int, port: int) -> str:
    """The course's SLURM script in its CPU form: 2 nodes, ``per_node`` gloo workers on each."""
    settings = {"STEPS": str(SETTINGS["steps"]), "BATCH_SIZE": str(SETTINGS["batch_size"])}
    settings |= {"NPROC_PER_NODE": str(per_node), "MASTER_PORT": str(port), "MAX_RESTARTS": "0"}
    settings |= {"OUT_DIR": str(out), "CHECKPOINT_EVERY": "10", "PYTHON_BIN": sys.prefix + "/bin"}
    args = ["--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}.out"]
    env = torchrun.environment(settings)  # GLOO_SOCKET_IFNAME=eth0: sbatch passes it on
    return slurm_.sbatch([*args, str(ROOT / "scripts" / "slurm_ddp.sbatch")], env=env, cwd=ROOT)


def test_sbatch_trains_across_both_nodes_like_one_process(tmp_path):
    folder = tmp_path / "slurm"
    with running("slurm", 2, "1gbit") as made:
        started = time.perf_counter()
        on = slurm.start(made, folder)
        try:
            took = time.perf_counter() - started  # about 1.5 s here
            assert took < 20 and on.states() == {"node0": "idle", "node1": "idle"}, took
            daemons = slurm.processes(folder, made)
            assert {p.pid for p in on.daemons.values()} <= set(daemons)
            before = [cluster.link_bytes(made, i) for i in range(2)]
            jobs = {n: submit(on, tmp_path / f"x{n}", per_node=n, port=29500 + n) for n in PER_NODE}
            states = {n: on.wait(job, timeout=JOB_TIMEOUT_S) for n, job in jobs.items()}
            after = [cluster.link_bytes(made, i) for i in range(2)]
            outputs = {n: (tmp_path / f"x{n}.out").read_text(errors="replace") for n in jobs}
            assert set(states.values()) == {"COMPLETED"}, outputs
            for node in ("node0", "node1"):  # srun's task started by each node's slurmd
                log = (folder / node / "slurmd.log").read_text()
                assert all(f"launch task StepId={job}.0" in log for job in jobs.values()), node
        finally:
            on.stop()
        assert slurm.processes(folder) == []
    assert slurm.processes(folder) == []  # no daemon, step or task of it anywhere
    reference = single_process(**SETTINGS)
    for n in jobs:
        assert f"2 node(s) x {n} worker(s), head node0, GLOO_SOCKET_IFNAME=eth0" in outputs[n]
        result = json.loads((tmp_path / f"x{n}" / "result.json").read_text())
        assert result["nproc"] == 2 * n
        torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-4, atol=0)
    # Every step's gradients crossed both links, each way, for each job: however an all-reduce
    # goes, a node gets the other's sums of half the gradients and then the other half.
    for node in range(2):
        for way in ("sent", "received"):
            moved = after[node][way] - before[node][way]
            assert moved > len(jobs) * SETTINGS["steps"] * gradient_bytes(), (node, way, moved)


def test_up_status_down_by_hand_and_a_bad_start_names_its_log(tmp_path, monkeypatch, capsys):
    folder, name = cluster.STATE / "slurm2-slurm", ["--name", "slurm2"]
    with running("slurm2", 2, None) as made:
        try:
            command = [sys.executable, "-m", "course_utils.cluster.slurm", "up", *name]
            up = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert up.returncode == 0, up.stderr
            assert f"SLURM_CONF={folder / 'slurm.conf'}" in up.stdout
            assert len(slurm.processes(folder, made)) >= 4  # munged, slurmctld, 2 slurmd
            assert slurm.main(["up", *name]) == 1  # one at a time
            assert slurm.main(["status", *name]) == 0
            assert "idle node[0-1]" in " ".join(capsys.readouterr().out.split())
        finally:
            assert slurm.main(["down", *name]) == 0
        assert not folder.exists() and slurm.processes(folder) == []
        assert slurm.main(["status", *name]) == 1
        # daemons that can't read their configuration: start() says which files to read
        bad = slurm.config
        monkeypatch.setattr(slurm, "config", lambda *a: bad(*a) + "NoSuchKey=1\n")
        with pytest.raises(slurm.SlurmError, match=r"exited with 1: read /.*\.out$") as failed:
            slurm.start(made, tmp_path / "bad")
        printed = Path(str(failed.value).split(" and ")[-1]).read_text()
        assert "NoSuchKey" in printed, printed  # before any log file is opened
        assert slurm.processes(tmp_path / "bad") == []  # what it had started is stopped
