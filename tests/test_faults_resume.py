"""Runs that resume after a fault, tried on purpose: nothing lost. A corrupt checkpoint is refused
and the previous one resumes exactly, a pipeline resumes every stage exactly (on more stages too),
a save killed half-way leaves nothing behind, a stray RANK variable does not stop the checkpoint,
and a run killed with SIGKILL resumes to the last bit. Part of the fault suite
(``tests/test_faults.py``); checkpoints from someone else, or of another run:
``tests/test_faults_checkpoint.py``."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from faults import HANG_GUARD_S

from course_utils import checkpoint, train
from course_utils.config import RunConfig


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the tensors' data
    path.write_bytes(bytes(raw))


def test_a_corrupt_checkpoint_is_refused_and_the_previous_one_resumes_exactly(tmp_path, capfd):
    common = dict(model="cnn", batch_size=32, seed=2)
    whole = train.run(RunConfig(**common, steps=8), progress=False)
    ckpt = str(tmp_path / "ckpt")
    train.run(RunConfig(**common, steps=6, checkpoint=ckpt, checkpoint_every=2), progress=False)
    flip_a_byte(tmp_path / "ckpt" / "latest.pt")  # step 6; previous.pt holds step 4
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint._read(tmp_path / "ckpt" / "latest.pt")
    resumed = train.run(RunConfig(**common, steps=8, checkpoint=ckpt), progress=False)
    assert "latest.pt is corrupt" in capfd.readouterr().err
    assert resumed["resumed_from_step"] == 4
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=0, atol=0)
    assert (tmp_path / "ckpt" / "latest.pt.corrupt").exists()  # set aside, not deleted


def test_a_pipeline_checkpoints_every_stage_and_resumes_exactly_even_on_more_stages(tmp_path):
    common = dict(model="cnn", parallel="pipeline", batch_size=32, microbatches=4)
    whole = train.run(RunConfig(**common, nproc=2, steps=8), progress=False)
    ckpt = str(tmp_path / "ckpt")
    train.run(RunConfig(**common, nproc=2, steps=5, checkpoint=ckpt), progress=False)
    saved = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    reference = train.models.build("cnn").state_dict()
    assert saved["model"].keys() == reference.keys()  # the whole model, from both stages
    assert saved["optimizer"]["conv2.weight"]["momentum_buffer"].shape == (64, 32, 5, 5)
    resumed = train.run(RunConfig(**common, nproc=2, steps=8, checkpoint=ckpt), progress=False)
    assert resumed["resumed_from_step"] == 5
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=0, atol=0)
    on_four = train.run(RunConfig(**common, nproc=4, steps=10, checkpoint=ckpt), progress=False)
    assert on_four["resumed_from_step"] == 8 and len(on_four["losses"]) == 10


def test_a_half_written_checkpoint_of_a_killed_save_is_cleaned(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    stray = ckpt / f".latest.pt.{dead}.tmp"  # what a SIGKILL during torch.save leaves
    stray.write_bytes(b"half a checkpoint")
    train.run(RunConfig(steps=1, batch_size=16, checkpoint=str(ckpt)), progress=False)
    assert not stray.exists() and (ckpt / "latest.pt").exists()


def test_a_stray_rank_variable_does_not_stop_the_checkpoint(tmp_path):
    proc = run_cli("--steps", "2", "--checkpoint", str(tmp_path / "ckpt"), env={"RANK": "3"})
    assert proc.returncode == 0, proc.stderr
    assert torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)["step"] == 2


def test_a_run_killed_with_sigkill_resumes_to_the_last_bit(tmp_path):
    args = ["--parallel", "ddp", "--nproc", "2", "--batch-size", "32", "--steps", "12"]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.json"
    command = [sys.executable, "-m", "course_utils.train", *args, "--checkpoint", str(ckpt)]
    run = subprocess.Popen([*command, "--checkpoint-every", "2"], cwd=ROOT, text=True,
                           stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    guard = threading.Timer(HANG_GUARD_S, os.killpg, (run.pid, signal.SIGKILL))
    guard.start()
    try:
        for line in run.stderr:  # the parent and its workers die at once, mid-run
            if line.startswith("checkpoint: step 6 saved"):
                os.killpg(run.pid, signal.SIGKILL)
                break
        run.wait(timeout=HANG_GUARD_S)
    finally:
        guard.cancel()
    assert run.returncode == -signal.SIGKILL
    resumed = subprocess.run([*command, "--json", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(out.read_text())
    assert 6 <= result["resumed_from_step"] < 12 and len(result["losses"]) == 12
    whole = train.run(RunConfig(parallel="ddp", nproc=2, batch_size=32, steps=12), progress=False)
    torch.testing.assert_close(result["losses"], whole["losses"], rtol=0, atol=0)
