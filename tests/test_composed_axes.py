"""Context and expert parallelism on the command line, composed with the other axes through
course_utils.parallelize: every layout trains like one process on the same global batch, and a
layout that can't run is refused in one line before any worker starts."""

import pytest
import torch

import course_utils as cu
from course_utils.config import RunConfig, UsageError
from course_utils.parallelize import Axes

COMMON = dict(batch_size=16, steps=3, seed=2, optimizer="adamw", lr=3e-3)
ONE = {}  # model -> the one-process run, computed once


def one_process(model: str) -> dict:
    if model not in ONE:
        ONE[model] = cu.train.run(RunConfig(model=model, **COMMON), progress=False)
    return ONE[model]


@pytest.mark.parametrize(
    "model, flags, mesh",
    [
        ("pixels", dict(parallel="none", nproc=2, cp=2), dict(dp=1, ep=1, cp=2, tp=1)),
        ("pixels", dict(parallel="ddp", nproc=4, cp=2), dict(dp=2, ep=1, cp=2, tp=1)),
        ("pixels", dict(parallel="fsdp", nproc=2, cp=2), dict(dp=1, ep=1, cp=2, tp=1)),
        ("moe", dict(parallel="none", nproc=2, ep=2), dict(dp=1, ep=2, cp=1, tp=1)),
        ("moe", dict(parallel="ddp", nproc=4, ep=2), dict(dp=2, ep=2, cp=1, tp=1)),
        (
            "pixels",
            dict(parallel="ddp", nproc=8, cp=2, tp=2, oversubscribe=True),
            dict(dp=2, ep=1, cp=2, tp=2),
        ),
    ],
    ids=["cp 2", "dp 2 x cp 2", "fsdp over cp 2", "ep 2", "dp 2 x ep 2", "dp 2 x cp 2 x tp 2"],
)
def test_every_layout_trains_like_one_process(model, flags, mesh):
    """The losses of every step equal one process's on the same global batch (float32 sums in
    another order: 1e-4 of the loss), and the run reports its mesh."""
    run = cu.train.run(RunConfig(model=model, **COMMON, **flags), progress=False)
    torch.testing.assert_close(run["losses"], one_process(model)["losses"], rtol=1e-4, atol=0)
    assert run["mesh"] == mesh
    assert Axes.of(RunConfig(model=model, **flags)).world_size == flags["nproc"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(model="pixels", parallel="none", nproc=3, cp=3), "do not divide into 6"),
        (dict(model="cnn", parallel="none", nproc=2, cp=2), "--model cnn"),
        (dict(model="moe", parallel="none", nproc=3, ep=3, batch_size=63), "experts"),
        (dict(model="transformer", parallel="none", nproc=2, ep=2), "--model transformer"),
        (dict(model="moe", parallel="ddp", nproc=4, ep=2, cp=2), "--ep composes with"),
        (dict(model="moe", parallel="fsdp", nproc=2, ep=2), "--ep composes with"),
        (dict(model="pixels", parallel="ddp", nproc=6, cp=4), "not a multiple of the context"),
        (dict(model="pixels", parallel="none", nproc=4, cp=2), "runs one replica, 2 processes"),
        (dict(model="moe", parallel="none", nproc=2, ep=2, batch_size=15), "does not divide"),
    ],
)
def test_bad_layouts_are_refused_in_one_line_before_any_worker_starts(flags, message):
    with pytest.raises(UsageError, match=message) as refused:
        cu.train.run(RunConfig(steps=1, **flags), progress=False)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parallel", "pipeline", "--nproc", "2", "--cp", "2"], "--cp is for --parallel none"),
        (["--parallel", "tp", "--nproc", "2", "--ep", "2"], "--ep is for --parallel none"),
    ],
)
def test_cp_and_ep_flags_go_with_data_parallelism_only(argv, message):
    with pytest.raises(UsageError, match=message):
        cu.config.parse(argv)
