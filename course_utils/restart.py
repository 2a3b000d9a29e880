"""A torchrun job that survives a killed worker (lesson 13, scripts/README.md): start the
training entry point on two workers under ``torchrun --max-restarts 1``, wait for rank 0's first
checkpoint, SIGKILL one worker, and let torchrun restart both from the checkpoint. Also what the
timed output says about the pace of the steps and the cost of the restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from course_utils import launch

SAVED = "checkpoint: step"  # how rank 0 announces a checkpoint: "checkpoint: step N saved"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_command(steps: int, every: int, batch_size: int, workdir: str | Path) -> list[str]:
    """``torchrun --nproc-per-node 2 --max-restarts 1 -m course_utils.train ...`` on this machine
    only (:data:`course_utils.launch.TORCHRUN_ON_ONE_MACHINE`: nothing listens on the network),
    with a checkpoint every ``every`` steps and the run's JSON written in ``workdir``."""
    torchrun = str(Path(sys.executable).parent / "torchrun")  # installed with torch
    workdir = Path(workdir)
    return [
        torchrun, *launch.TORCHRUN_ON_ONE_MACHINE, "--nproc-per-node", "2", "--max-restarts", "1",
        "-m", "course_utils.train", "--model", "cnn", "--parallel", "ddp",
        "--steps", str(steps), "--batch-size", str(batch_size),
        "--checkpoint", str(workdir / "checkpoint"), "--checkpoint-every", str(every),
        "--json", str(workdir / "run.json"),
    ]  # fmt: skip


def kill_one_worker(
    steps: int, every: int, batch_size: int, workdir: str | Path, timeout: float = 300
) -> dict:
    """Run :func:`torchrun_command`, SIGKILL its last worker once the first checkpoint is saved,
    and wait for the job. Returns ``{"returncode", "killed_pid", "killed_at", "lines", "run"}``:
    ``lines`` are ``(seconds since the start, line)`` of everything torchrun and its workers
    printed, ``run`` the JSON the job wrote (None if it wrote none)."""
    workdir = Path(workdir)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    # restarted gloo workers need a fresh store: the first round's keys point at dead workers
    env.update(launch.TORCHRUN_ENV)
    command = torchrun_command(steps, every, batch_size, workdir)
    started = time.monotonic()
    agent = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in agent.stdout:
            lines.append((time.monotonic() - started, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    try:
        while not any(line.startswith(SAVED) for _, line in lines):
            if agent.poll() is not None or time.monotonic() - started > timeout:
                break
            time.sleep(0.05)
        workers = launch.children(agent.pid)
        if agent.poll() is None and workers:
            killed = workers[-1]
            os.kill(killed, signal.SIGKILL)  # no chance to clean up, like a crashed machine
        killed_at = time.monotonic() - started
        agent.wait(timeout=timeout)
        reader.join(timeout=30)
    finally:
        if agent.poll() is None:  # never leave a job behind
            agent.terminate()
            agent.wait(timeout=30)
    out = workdir / "run.json"
    run = json.loads(out.read_text()) if out.exists() else None
    return {
        "returncode": agent.returncode,
        "killed_pid": killed,
        "killed_at": killed_at,
        "lines": lines,
        "run": run,
    }


def checkpoint_pace(lines: list[tuple[float, str]], killed_at: float, every: int) -> dict:
    """From rank 0's timed "checkpoint: step N saved" lines: ``per_step`` (seconds per step of
    the restarted workers, between their first and last checkpoint), ``restart`` (seconds from the
    kill to the restarted workers' first checkpoint, less the steps they computed meanwhile, which
    begin at the checkpoint before the kill) and ``lost`` (the most work one interval of ``every``
    steps can lose, in seconds). NaN where fewer than two checkpoints followed the kill."""
    saves = [(t, int(line.split()[2])) for t, line in lines if line.startswith(SAVED)]
    before = [step for t, step in saves if t <= killed_at]
    after = [(t, step) for t, step in saves if t > killed_at]
    nan = float("nan")
    if len(after) < 2 or not before:
        return {"per_step": nan, "restart": nan, "lost": nan}
    per_step = (after[-1][0] - after[0][0]) / (after[-1][1] - after[0][1])
    resumed = max(before)
    restart = after[0][0] - killed_at - (after[0][1] - resumed) * per_step
    return {"per_step": per_step, "restart": restart, "lost": every * per_step}
