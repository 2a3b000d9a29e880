"""Scaling out with torchrun (lesson 13, scripts/README.md): the multi-node form of the training
entry point, run on one machine, and a worker killed mid-run that torchrun restarts from the last
checkpoint. Both end with the per-step losses of one process training alone."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from course_utils import launch, restart
from course_utils.train import RunConfig, run

TORCHRUN = Path(sys.executable).parent / "torchrun"  # installed with torch, beside this python
AGENT_TIMEOUT_S = 120  # a torchrun job here takes 4-15 s; a TCP connect can stall 5 s
HAS_PROC = Path("/proc/self/stat").exists()  # Linux: find workers and their ranks in /proc


def single_process(**kwargs) -> dict:
    """What ``--parallel none`` reports for the same batch, seed and steps (in this process)."""
    return run(RunConfig(model="cnn", parallel="none", **kwargs), progress=False)


def single_process_losses(**kwargs) -> list[float]:
    return single_process(**kwargs)["losses"]


def train_args(*extra: str) -> list[str]:
    return ["-m", "course_utils.train", "--model", "cnn", "--parallel", "ddp", *extra]


def clean_env() -> dict:
    """This process's environment without a launcher's rank variables (torchrun sets its own)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in names}


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave worker ``pid`` (from its environment), or None."""
    rank = launch.processes.environ(pid).get("RANK")
    return None if rank is None else int(rank)


def stop(agents: list[subprocess.Popen]) -> None:
    """Stop torchrun agents and their workers (which run in sessions of their own), leaving none."""
    workers = [pid for agent in agents for pid in launch.children(agent.pid)]
    for agent in agents:
        if agent.poll() is None:
            agent.terminate()  # torchrun stops its workers on SIGTERM
    for agent in agents:
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_torchrun_agents_as_two_nodes_train_like_one_process(tmp_path):
    # Static rendezvous, as on a SLURM allocation: node 0's agent hosts the store at a known
    # address; here both "nodes" are this machine. (c10d works too, but its joins took ~15 s here.)
    port = launch.free_port()
    out = tmp_path / "two_nodes.json"  # the same path on both "nodes": only global rank 0 writes
    agents = []
    try:
        for node_rank in (0, 1):
            command = [
                TORCHRUN,
                "--nnodes", "2",
                "--nproc-per-node", "1",
                "--node-rank", str(node_rank),
                "--master-addr", "127.0.0.1",
                "--master-port", str(port),
                *train_args("--steps", "5", "--batch-size", "32", "--json", str(out)),
            ]  # fmt: skip
            agents.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=clean_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = [agent.communicate(timeout=AGENT_TIMEOUT_S)[0] for agent in agents]
        for agent, log in zip(agents, logs):
            assert agent.returncode == 0, log[-3000:]
    finally:
        stop(agents)
    result = json.loads(out.read_text())
    assert result["nproc"] == 2 and result["backend"] == "gloo"  # one worker on each "node"
    reference = single_process_losses(batch_size=32, steps=5)
    torch.testing.assert_close(result["losses"], reference, rtol=1e-4, atol=0)


@pytest.mark.skipif(not HAS_PROC, reason="finds the worker to kill through /proc (Linux)")
def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_checkpoint(tmp_path):
    # lesson 13's run: torchrun, 2 workers, one SIGKILLed after rank 0's first checkpoint.
    # Restarted gloo workers must not meet in the store the first attempt used: its stale keys
    # send them to the dead workers' addresses and they hang (pytorch/pytorch#135712); the
    # helper sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE so that every round gets a fresh store.
    steps, every, batch_size = 80, 10, 64
    job = restart.kill_one_worker(steps, every, batch_size, tmp_path, timeout=2 * AGENT_TIMEOUT_S)
    log = "".join(line for _, line in job["lines"])[-3000:]
    assert job["killed_pid"] is not None and job["returncode"] == 0, log
    assert not launch.processes.alive(job["killed_pid"])
    result = job["run"]
    # the run was restarted, and resumed from a checkpoint (a multiple of `every`), not step 0
    assert result["resumed_from_step"] > 0 and result["resumed_from_step"] % every == 0, log
    assert result["resumed_from_step"] < steps
    assert len(result["losses"]) == steps  # every step of the run, before and after the restart
    # An uninterrupted run of the same arithmetic: 2 data-parallel workers of 1 thread, as here.
    # (Against one process the losses agree to float32 rounding, which 80 steps can grow past
    # 1e-4; against the same two workers a resumed run must agree to the last bit.)
    whole = run(
        RunConfig(parallel="ddp", nproc=2, batch_size=batch_size, steps=steps), progress=False
    )
    torch.testing.assert_close(result["losses"], whole["losses"], rtol=0, atol=0)
    pace = restart.checkpoint_pace(job["lines"], job["killed_at"], every)
    assert pace["per_step"] > 0 or math.isnan(pace["per_step"])


def test_checkpoint_pace_times_the_restarted_steps_and_the_restart():
    lines = [
        (0.5, "some other line\n"),
        (1.0, "checkpoint: step 10 saved\n"),
        (5.0, "checkpoint: step 20 saved\n"),  # after the kill at 1.5 s: resumed from step 10
        (6.0, "checkpoint: step 30 saved\n"),
    ]
    pace = restart.checkpoint_pace(lines, killed_at=1.5, every=10)
    assert pace["per_step"] == pytest.approx(0.1)
    assert pace["restart"] == pytest.approx(5.0 - 1.5 - 10 * 0.1)
    assert pace["lost"] == pytest.approx(1.0)
    assert math.isnan(restart.checkpoint_pace(lines[:3], killed_at=1.5, every=10)["per_step"])


def test_the_torchrun_command_checkpoints_and_restarts_once(tmp_path):
    command = restart.torchrun_command(40, 10, 64, tmp_path)
    assert Path(command[0]).name == "torchrun"
    joined = " ".join(command)
    assert "--max-restarts 1" in joined and "--checkpoint-every 10" in joined
    assert f"--checkpoint {tmp_path / 'checkpoint'}" in joined and "-m course_utils.train" in joined


def test_the_slurm_script_runs_the_entry_point_through_srun_and_torchrun(tmp_path):
    """scripts/slurm_ddp.sbatch on a pretend one-node allocation: ``srun`` and ``scontrol`` are
    stand-ins that run the command here and name this machine; torchrun and training are real."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    stubs = {
        "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done\n'
        'exec "$@"\n',  # drop srun's options, run the command once (one node)
        "scontrol": "#!/bin/sh\necho 127.0.0.1\n",  # `scontrol show hostnames`: the head node
    }
    for name, text in stubs.items():
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    out_dir = tmp_path / "runs"
    env = {
        **clean_env(),
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-a",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "PYTHON_BIN": str(TORCHRUN.parent),
        "NPROC_PER_NODE": "2",  # CPU workers stand in for the node's GPUs
        "MASTER_PORT": str(launch.free_port()),
        "STEPS": "4",
        "BATCH_SIZE": "32",
        "CHECKPOINT_EVERY": "2",
        "OUT_DIR": str(out_dir),
    }
    proc = subprocess.run(
        ["bash", ROOT / "scripts" / "slurm_ddp.sbatch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT_S,
        cwd=tmp_path,  # the script goes to SLURM_SUBMIT_DIR itself
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((out_dir / "result.json").read_text())
    assert result["nproc"] == 2
    assert torch.load(out_dir / "checkpoint" / "latest.pt", weights_only=True)["step"] == 4
    reference = single_process(batch_size=32, steps=4, eval=True)
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-4, atol=0)
    assert result["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=2e-3)
