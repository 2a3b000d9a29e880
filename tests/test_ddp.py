"""Data parallel: N workers with batch B/N each do what one process does with batch B."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT

import course_utils as cu
from course_utils import collectives, data, ddp, hardware, launch, loop, models
from course_utils.train import RunConfig, UsageError, run


def losses(**kwargs) -> list[float]:
    return run(RunConfig(**kwargs), progress=False)["losses"]


@pytest.mark.parametrize("model", ["cnn", "rnn"])
def test_ddp_on_2_and_3_workers_has_the_losses_of_one_process(model):
    steps = 6
    single = losses(model=model, batch_size=48, steps=steps)
    for nproc in (2, 3):  # 3 workers oversubscribe 2 cores: slower, same arithmetic
        parallel = losses(model=model, parallel="ddp", nproc=nproc, batch_size=48, steps=steps)
        torch.testing.assert_close(parallel, single, rtol=1e-4, atol=0)
    assert single[-1] < single[0]  # and it is training, not comparing constants


def hand_written_vs_ddp(model_name: str, batch_size: int, steps: int):
    me = launch.worker()
    X, y = data.mnist("train")
    X = models.prepare_input(model_name, X)
    out = {}
    for name in ("hand", "ddp"):
        model = models.build(model_name, seed=me.rank)  # different on purpose: sync must fix it
        if name == "hand":
            ddp.broadcast_parameters(model)
            trained, step_fn = model, ddp.hand_step
        else:
            trained, step_fn = torch.nn.parallel.DistributedDataParallel(model), loop.train_step
        optimizer = models.make_optimizer(model, lr=0.01)
        batches = data.batches(X, y, batch_size, steps, 0, me.rank, me.world_size)
        history = loop.fit(
            trained,
            optimizer,
            batches,
            steps,
            step_fn=step_fn,
            reduce=collectives.all_reduce_sum,
            progress=False,
        )
        out[name] = (history.losses, [p.detach().clone() for p in model.parameters()])
    return out


def where_am_i():
    me = launch.worker()
    return str(me.device), me.backend, dist.get_backend()


def test_the_device_is_a_parameter_not_an_environment_variable(monkeypatch):
    # Pretend this machine has one GPU: "auto" takes it for one worker, not for two (workers of
    # one run never mix a GPU with CPUs); "cpu" keeps a run on the CPU, here or in workers.
    monkeypatch.setattr(hardware, "num_gpus", lambda: 1)
    assert hardware.device_kind("auto", 1) == "cuda" and hardware.device_kind("auto", 2) == "cpu"
    assert launch.worker().device == torch.device("cuda", 0)  # "auto", one process
    environment = dict(os.environ)
    result = run(RunConfig(model="cnn", batch_size=16, steps=1, device="cpu"), progress=False)
    assert result["device"] == "cpu"
    assert launch.run(where_am_i, 2, device="auto") == [("cpu", "gloo", "gloo")] * 2
    assert launch.run(where_am_i, 1, device="cpu") == [("cpu", "gloo", "gloo")]
    assert dict(os.environ) == environment  # nothing travelled through the environment
    monkeypatch.setattr(hardware, "num_gpus", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        hardware.device_kind("cuda")
    with pytest.raises(UsageError, match="--device cuda"):
        run(RunConfig(steps=1, device="cuda"), progress=False)


def test_hand_written_data_parallel_equals_ddp_and_replicas_stay_identical():
    per_rank = launch.run(hand_written_vs_ddp, 2, "cnn", 32, 4, timeout=120)
    for rank_out in per_rank:
        torch.testing.assert_close(rank_out["hand"][0], rank_out["ddp"][0], rtol=1e-5, atol=0)
        for a, b in zip(rank_out["hand"][1], rank_out["ddp"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(per_rank[0]["ddp"][1], per_rank[1]["ddp"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the replicas are bit-identical


def test_average_gradients_is_the_mean_over_ranks():
    def grads():
        model = torch.nn.Linear(3, 1, bias=False)
        model.weight.grad = torch.full((1, 3), float(dist.get_rank() + 1))
        ddp.average_gradients(model)
        return model.weight.grad.tolist()

    assert launch.run(grads, 3) == [[[2.0, 2.0, 2.0]]] * 3  # (1 + 2 + 3) / 3


@pytest.mark.parametrize("parallel,nproc", [("none", 1), ("ddp", 2)])
def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, parallel, nproc):
    common = dict(model="cnn", parallel=parallel, nproc=nproc, batch_size=32, seed=3)
    whole = run(RunConfig(**common, steps=8), progress=False)
    ckpt = str(tmp_path / "ckpt")
    first = run(RunConfig(**common, steps=5, checkpoint=ckpt, checkpoint_every=2), progress=False)
    assert first["resumed_from_step"] == 0
    saved = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    assert saved["step"] == 5  # the end of a run is always saved
    resumed = run(RunConfig(**common, steps=8, checkpoint=ckpt, checkpoint_every=2), progress=False)
    assert resumed["resumed_from_step"] == 5
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=1e-5, atol=0)
    final = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    model = models.build("cnn", seed=3)
    model.load_state_dict(final["model"])
    reference = models.build("cnn", seed=3)
    optimizer = models.make_optimizer(reference, 0.01)
    X, y = data.mnist("train")
    loop.fit(reference, optimizer, data.batches(X, y, 32, 8, seed=3), 8, progress=False)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(parallel="ddp", nproc=3, batch_size=64),
            "does not divide among 3 data-parallel replicas",
        ),
        (dict(parallel="ddp", nproc=0), "--nproc must be at least 1"),
    ],
)
def test_bad_ddp_input_fails_before_any_worker_starts(kwargs, message):
    with pytest.raises(UsageError, match=message):
        run(RunConfig(model="cnn", steps=2, **kwargs), progress=False)


def test_the_cli_starts_its_own_workers_and_writes_the_contract(tmp_path, cli):
    out = tmp_path / "ddp.json"
    proc = cli(
        "--model", "cnn", "--parallel", "ddp", "--nproc", "2", "--steps", "4", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["nproc"] == 2 and result["backend"] == "gloo" and len(result["losses"]) == 4
    assert result["samples_per_s"] > 0 and result["wall_s"] > 0


def test_the_same_module_runs_unchanged_under_torchrun(tmp_path, cli):
    torchrun = Path(sys.executable).parent / "torchrun"  # installed with torch
    out = tmp_path / "torchrun.json"
    args = ["--model", "rnn", "--parallel", "ddp", "--steps", "5", "--batch-size", "32"]
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "-m", "course_utils.train", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["nproc"] == 2  # torchrun's world size, not the --nproc default
    single = cli(
        "--model", "rnn", "--steps", "5", "--batch-size", "32", "--json", str(tmp_path / "one.json")
    )
    assert single.returncode == 0, single.stderr
    reference = json.loads((tmp_path / "one.json").read_text())["losses"]
    torch.testing.assert_close(result["losses"], reference, rtol=1e-4, atol=0)


def test_the_loop_sums_the_workers_metrics_every_few_steps_and_keeps_every_step():
    X, y = cu.data.mnist("train", limit=320)
    calls = []

    def counted_sum(stats):  # one process's reduce: count the collectives it would be
        calls.append(tuple(stats.shape))
        return stats

    def run(sync_every, lr=0.01):
        model = cu.models.build("cnn", seed=0)
        optimizer = cu.models.make_optimizer(model, lr)
        batches = cu.data.batches(X, y, 32, 10, 0)
        return cu.loop.fit(
            model, optimizer, batches, 10, reduce=counted_sum, progress=False, sync_every=sync_every
        )

    every_step = run(1)
    assert len(calls) == 10
    calls.clear()
    batched = run(4)
    assert calls == [(4, 3), (4, 3), (2, 3)]  # steps 1-4, 5-8, and the last two
    assert batched.losses == every_step.losses and len(batched.step_times) == 10
    with pytest.raises(cu.loop.NonFiniteLoss, match=r"at step \d+:"):
        run(4, lr=1e12)
    model = cu.models.build("cnn", seed=0)  # fewer batches than steps: every trained step kept
    short = cu.loop.fit(
        model,
        cu.models.make_optimizer(model, 0.01),
        cu.data.batches(X, y, 32, 6, 0),
        10,
        progress=False,
        sync_every=4,
    )
    assert short.losses == every_step.losses[:6]
