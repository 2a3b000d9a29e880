"""Pipeline parallelism (lessons 06 and 07): real pipelines against one process, with both
engines (hand-written send/recv and torch.distributed.pipelining) and every schedule they run
(course_utils.pipeline.engine), and a measured run's timeline (course_utils.pipeline.measured).

Workers are launched with threads=1: this process runs torch ops itself, and a forked worker
that then used several OpenMP threads could hang (GNU OpenMP is not fork-safe)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pipeline_schedules import check_timeline

import course_utils as cu
from course_utils.config import RunConfig
from course_utils.pipeline import config_error, measured, schedules, stages
from course_utils.pipeline.engine import ENGINES, Pipeline
from course_utils.pipeline.zero_bubble import V_SCHEDULES


def one_step(name, sizes, m, schedule, engine, batch_size):
    """Worker: one batch forward and backward through the pipeline; loss (last stage), the full
    model's gradients (rank 0) and this rank's timeline."""
    pipe = Pipeline(name, sizes, m, schedule, engine, seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(cu.models.prepare_input(name, X), y, batch_size, 1, seed=0))
    pipe.events = []
    loss, _ = pipe.step_fn(None, torch.optim.SGD(pipe.stage.parameters(), lr=0.0), X, y)
    return float(loss), pipe.full_grads(), pipe.events


@pytest.mark.filterwarnings("ignore:4 workers on")  # 4 stages on fewer cores: still exact
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("schedule", schedules.SCHEDULES)
@pytest.mark.parametrize("name,sizes", [("cnn", [2, 2]), ("rnn", [1, 1]), ("cnn", [1, 1, 1, 1])])
def test_pipeline_equals_one_process(name, sizes, schedule, engine):
    if len(sizes) == 4 and engine == "hand":
        pytest.skip("4 stages: one engine is enough")
    batch_size, m = 32, 4
    model = cu.models.build(name, seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(cu.models.prepare_input(name, X), y, batch_size, 1, seed=0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    results = cu.launch.run(
        one_step, len(sizes), name, sizes, m, schedule, engine, batch_size, threads=1
    )
    assert results[-1][0] == pytest.approx(loss.item(), rel=1e-5)
    grads = results[0][1]
    assert grads.keys() == dict(model.named_parameters()).keys()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)
    for rank, (_, _, events) in enumerate(results):  # the order run is the schedule's order
        ran = [(e.kind, e.microbatch) for e in sorted(events, key=lambda e: e.start)]
        assert ran == schedules.stage_order(schedule, len(sizes), m, rank)


def test_profile_records_every_rank_and_trains_like_one_process():
    run = measured.Profile("cnn", microbatches=4, schedule="1f1b", engine="torch", batch_size=32)
    run.num_steps = 3
    result, other = cu.launch.run(measured.profile, 2, run, threads=1)
    assert other is None
    check_timeline(result["events"], 2, 4)  # the last step: every F and B of both stages
    assert result["samples_per_s"] > 0 and sum(result["sizes"]) == stages.max_stages("cnn")
    none = cu.train.run(RunConfig(steps=3, batch_size=32), progress=False)
    np.testing.assert_allclose(result["losses"], none["losses"], rtol=1e-4)


def test_interleaved_1f1b_equals_one_process():
    # 4 stages on 2 ranks: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    batch_size, m = 32, 4
    model = cu.models.build("cnn", seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(X, y, batch_size, 1, seed=0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    results = cu.launch.run(
        one_step, 2, "cnn", [1, 1, 1, 1], m, "interleaved1f1b", "torch", 32, threads=1
    )
    assert results[-1][0] == pytest.approx(loss.item(), rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(results[0][1][k], p.grad, rtol=1e-4, atol=1e-6)
    assert sorted((e.kind, e.microbatch) for e in results[0][2]) == sorted(
        (k, i)
        for k in "FB"
        for i in range(m)
        for _ in range(2)  # each microbatch on 2 stages
    )
    assert "2 stages per worker" in config_error("rnn", 2, 32, 4, "interleaved1f1b")
    assert config_error("cnn", 2, 32, 4, "interleaved1f1b") is None


@pytest.mark.parametrize("schedule", V_SCHEDULES)
def test_zero_bubble_v_schedules_equal_one_process(schedule):
    # 4 stages on 2 ranks in a V: rank 0 holds stages 0 and 3 (the loss), rank 1 stages 1 and 2
    batch_size, m = 32, 4
    model = cu.models.build("transformer", seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(cu.models.prepare_input("transformer", X), y, batch_size, 1, 0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    results = cu.launch.run(
        one_step, 2, "transformer", [2, 1, 1, 2], m, schedule, "torch", 32, threads=1
    )
    assert results[0][0] == pytest.approx(loss.item(), rel=1e-5)  # rank 0 holds the last stage
    for k, p in model.named_parameters():
        torch.testing.assert_close(results[0][1][k], p.grad, rtol=1e-4, atol=1e-6)
    for rank, (_, _, events) in enumerate(results):
        kinds = [(e.kind, e.microbatch) for e in events]
        for i in range(m):  # each microbatch forward and backward on both of this rank's stages
            assert kinds.count(("F", i)) == 2 and kinds.count(("B", i)) == 2
        assert all(e.stage == rank for e in events)
    weights = [e for _, _, events in results for e in events if e.kind == "W"]
    if schedule == "zbv":  # its backward is split: the weights' gradients run as steps of their own
        assert len(weights) == 2 * 2 * m
    assert "2 stages per worker" in config_error("cnn", 3, 36, 6, schedule)
    assert "--microbatches >= 2 x --nproc" in config_error("transformer", 2, 32, 2, schedule)
