"""The composing module (course_utils.parallelize): the axes of every command-line layout, their
checks in one place, the order the axes are applied in, activation checkpointing equal to plain
backward, and FSDP sharding block by block."""

import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils.config import RunConfig
from course_utils.parallelize import Axes, checkpoint_activations, parallelize


@pytest.mark.parametrize(
    "flags, axes",
    [
        (dict(), Axes()),
        (dict(parallel="ddp", nproc=4), Axes(dp=4)),
        (dict(parallel="fsdp", nproc=4), Axes(dp=4, data="fsdp")),
        (dict(parallel="tp", nproc=2), Axes(tp=2)),
        (dict(parallel="ddp", nproc=4, tp=2), Axes(dp=2, tp=2)),
        (dict(parallel="fsdp", nproc=8, tp=4), Axes(dp=2, tp=4, data="fsdp")),
        (dict(parallel="pipeline", nproc=3), Axes(pp=3)),
    ],
)
def test_every_layout_of_the_command_line_is_one_set_of_axes(flags, axes):
    cfg = RunConfig(model="transformer", **flags)
    assert Axes.of(cfg) == axes
    assert axes.world_size == cfg.nproc
    assert axes.error(RunConfig(model="transformer", batch_size=64, **flags)) is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(parallel="ddp", nproc=3, tp=2), "--nproc 3 is not a multiple of the tensor-parallel"),
        (dict(parallel="fsdp", nproc=3, batch_size=32), "does not divide among 3 data-parallel"),
        (dict(parallel="ddp", nproc=4, tp=2, model="cnn"), "no tensor-parallel plan"),
        (dict(parallel="tp", nproc=3), "heads (4) does not divide among 3"),
        (dict(parallel="pipeline", nproc=2, microbatches=3, batch_size=64), "microbatches"),
    ],
)
def test_the_axes_are_checked_in_one_place(flags, message):
    cfg = RunConfig(**({"model": "transformer"} | flags))
    error = Axes.of(cfg).error(cfg)
    assert error is not None and message in error
    with pytest.raises(cu.config.UsageError, match=message.split("(")[0]):
        cu.config.validate(cfg)


def loss_and_grads(model, X, y):
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_activation_checkpointing_recomputes_each_block_and_changes_no_gradient(name):
    X, y = cu.data.mnist("train", limit=16)
    X = cu.models.prepare_input(name, X)
    plain = loss_and_grads(cu.models.build(name, seed=0), X, y)
    model = cu.models.build(name, seed=0)
    blocks = model.blocks if hasattr(model, "blocks") else cu.sharding.fsdp_units(model)
    calls, runs = [], []
    blocks[0].register_forward_pre_hook(lambda module, args: calls.append(module))
    inner = type(blocks[0]).forward  # count the runs of the block's own body
    type(blocks[0]).forward = lambda self, *a, **k: runs.append(self) or inner(self, *a, **k)
    try:
        checkpoint_activations(model)
        recomputed = loss_and_grads(model, X, y)
    finally:
        type(blocks[0]).forward = inner
    assert len(calls) == 1  # called once from outside...
    assert sum(run is blocks[0] for run in runs) == 2  # ...and its body ran again in backward
    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6)
    assert recomputed[1].keys() == plain[1].keys()  # the parameters keep their names
    for key, grad in plain[1].items():
        torch.testing.assert_close(recomputed[1][key], grad, rtol=1e-5, atol=1e-7, msg=key)


def sharded_block_by_block_with_recompute(steps: int):
    """On every rank: the transformer through parallelize (FSDP over every rank, activations
    recomputed), trained ``steps`` steps on this rank's half of one batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    axes = Axes(dp=dist.get_world_size(), data="fsdp")
    model = cu.models.build("transformer", seed=0)
    trained = parallelize(model, axes, axes.mesh("cpu"), recompute=True)
    units = [isinstance(block, FSDPModule) for block in model.blocks]
    optimizer = cu.models.make_optimizer(model, 0.1)
    X, y = cu.data.mnist("train", limit=16)
    rank, n = dist.get_rank(), dist.get_world_size()
    losses = []
    for _ in range(steps):
        loss, _ = cu.loop.train_step(trained, optimizer, X[rank::n], y[rank::n])
        dist.all_reduce(loss)
        losses.append(loss.item() / n)
    return units, losses


def test_fsdp_shards_block_by_block_and_composes_with_recompute_like_one_process():
    model = cu.models.build("transformer", seed=0)
    optimizer = cu.models.make_optimizer(model, 0.1)
    X, y = cu.data.mnist("train", limit=16)
    X, y = torch.cat([X[0::2], X[1::2]]), torch.cat([y[0::2], y[1::2]])  # the ranks' halves
    one = [cu.loop.train_step(model, optimizer, X, y)[0].item() for _ in range(3)]
    for units, losses in cu.launch.run(sharded_block_by_block_with_recompute, 2, 3, threads=1):
        assert units == [True] * len(model.blocks)  # one FSDP unit per block
        assert losses == pytest.approx(one, rel=1e-5)
