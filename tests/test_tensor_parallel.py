"""Tensor parallelism (lesson 09): Megatron's split by hand, DTensor's plan, and a 2-D mesh, each
equal to one process (outputs, gradients, a few training steps); the CLI's --parallel tp and --tp."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import course_utils as cu
from course_utils import tensor_parallel as tp
from course_utils.config import RunConfig, UsageError


def batch(n=16):
    X, y = cu.data.mnist("train", limit=n)
    return X, y


def one_process(steps=0):
    """Loss and gradients of the whole transformer on one batch (after ``steps`` SGD steps)."""
    model = cu.models.build("transformer", seed=0)
    loss = train_then_backward(model, steps)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, model


def train_then_backward(model, steps: int) -> float:
    """``steps`` SGD steps on one batch, then the loss of one more forward, its gradients left
    in ``.grad``."""
    X, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(X), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    return loss.item()


def by_hand():
    model = tp.parallelize_by_hand(cu.models.build("transformer", seed=0))
    X, y = batch()
    before = dict(tp.COMM)
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    calls = tp.COMM["calls"] - before["calls"]
    return loss.item(), tp.gather_by_hand(model, grads=True), calls


def test_megatron_by_hand_equals_one_process_and_sends_four_all_reduces_per_block():
    loss, grads, _ = one_process()
    for (hand_loss, hand_grads, calls), rank in zip(cu.launch.run(by_hand, 2, threads=1), (0, 1)):
        assert hand_loss == pytest.approx(loss, rel=1e-5), rank
        assert hand_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(hand_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
        assert calls == 4 * 4  # 4 blocks: f and g in attention and in the MLP, forward + backward


def with_dtensor(sequence_parallel, steps):
    from torch.distributed.tensor import DTensor

    mesh = cu.parallelize.Axes(tp=dist.get_world_size()).mesh()["tp"]
    model = cu.models.build("transformer", seed=0)
    tp.apply(model, mesh, sequence_parallel)
    loss = train_then_backward(model, steps)
    full = {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
    }
    return loss, full


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_dtensor_plan_equals_one_process_even_after_training_steps(sequence_parallel):
    loss, grads, _ = one_process(steps=3)
    for dt_loss, dt_grads in cu.launch.run(with_dtensor, 2, sequence_parallel, 3, threads=1):
        assert dt_loss == pytest.approx(loss, rel=1e-4)
        for name, g in grads.items():
            torch.testing.assert_close(dt_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_bad_tensor_parallel_settings_are_one_line():
    assert tp.config_error("transformer", 2, 4) is None
    assert "no tensor-parallel plan" in tp.config_error("cnn", 2, 2)
    assert "not a multiple" in tp.config_error("transformer", 3, 4)
    assert "heads (4) does not divide among 3" in tp.config_error("transformer", 3, 3)
    with pytest.raises(UsageError, match="no tensor-parallel plan"):
        cu.train.run(RunConfig(model="rnn", parallel="tp", nproc=2, steps=1))
    with pytest.raises(UsageError, match="not a multiple"):
        cu.train.run(RunConfig(model="transformer", parallel="ddp", nproc=3, tp=2, steps=1))


@pytest.mark.parametrize(
    "parallel, nproc, tp_size", [("tp", 2, 1), ("ddp", 4, 2)], ids=["tp on 2", "dp 2 x tp 2"]
)
def test_the_cli_trains_tensor_parallel_like_one_process(parallel, nproc, tp_size):
    common = dict(model="transformer", batch_size=32, steps=4, seed=1, optimizer="adamw", lr=1e-3)
    one = cu.train.run(RunConfig(**common, eval=True), progress=False)
    cfg = RunConfig(**common, parallel=parallel, nproc=nproc, tp=tp_size, eval=True)
    split = cu.train.run(cfg, progress=False)
    torch.testing.assert_close(split["losses"], one["losses"], rtol=1e-4, atol=0)
    assert split["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2e-3)
    assert json.loads(json.dumps(split))["mesh"] == {
        "dp": nproc // max(tp_size, 1) if parallel == "ddp" else 1,
        "tp": tp_size if parallel == "ddp" else nproc,
        "cp": 1,
        "ep": 1,
    }
