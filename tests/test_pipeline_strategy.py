"""The pipeline room's face (course_utils.pipeline.strategy), the one every strategy shows the
composing module: config_error (bad input, one line, before any worker starts) and role(cfg, me)
(this rank's stage, and the whole trained model gathered on the main rank), also through the
command line's train_worker, against one process.

Workers are launched with threads=1: this process runs torch ops itself, and a forked worker
that then used several OpenMP threads could hang (GNU OpenMP is not fork-safe)."""

import numpy as np
import pytest
import torch

import course_utils as cu
from course_utils.config import RunConfig
from course_utils.pipeline import config_error, stages


def test_config_errors():
    ok = dict(model="cnn", nproc=2, batch_size=64, microbatches=4, schedule="1f1b")
    assert config_error(**ok) is None
    assert "at most 4 pipeline stages" in config_error(**{**ok, "nproc": 5})
    assert "at most 2" in config_error(**{**ok, "model": "rnn", "nproc": 3})
    assert "does not divide" in config_error(**{**ok, "microbatches": 5})
    assert "at least 1" in config_error(**{**ok, "microbatches": 0})
    assert "1f1b needs" in config_error(**{**ok, "nproc": 4, "microbatches": 2})
    assert config_error(**{**ok, "nproc": 4, "microbatches": 2, "schedule": "gpipe"}) is None
    assert "--schedule" in config_error(**{**ok, "schedule": "zb"})


@pytest.mark.parametrize("name,schedule", [("cnn", "gpipe"), ("rnn", "1f1b")])
def test_train_worker_matches_parallel_none(name, schedule):
    none = cu.train.run(RunConfig(model=name, steps=4, batch_size=32, eval=True), progress=False)
    cfg = RunConfig(
        model=name,
        parallel="pipeline",
        nproc=2,
        steps=4,
        batch_size=32,
        microbatches=4,
        schedule=schedule,
        eval=True,
    )
    result, other = cu.launch.run(cu.train.train_worker, 2, cfg, threads=1)
    assert other is None
    np.testing.assert_allclose(result["losses"], none["losses"], rtol=1e-4)
    np.testing.assert_allclose(result["accuracies"], none["accuracies"])
    assert result["test_accuracy"] == pytest.approx(none["test_accuracy"], abs=2e-3)
    assert result["samples_per_s"] > 0 and sum(result["stage_sizes"]) == stages.max_stages(name)


@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
def test_the_cli_runs_the_v_schedules_like_one_process(schedule):
    from course_utils.config import RunConfig

    common = dict(model="transformer", steps=3, batch_size=32)
    one = cu.train.run(RunConfig(**common), progress=False)
    cfg = RunConfig(**common, parallel="pipeline", nproc=2, schedule=schedule, microbatches=4)
    piped = cu.train.run(cfg, progress=False)
    assert piped["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert len(piped["stages"]) == 4


def face(cfg, num_steps):
    """Worker: this rank's role from the room's face, ``num_steps`` steps through its step_fn,
    then the whole trained model (a collective); what the rank saw."""
    part, whole_model = cu.pipeline.role(cfg, cu.launch.worker("cpu"))
    images, labels = cu.data.mnist("train")
    X = cu.models.prepare_input(cfg.model, images)
    for X_b, y_b in cu.data.batches(X, labels, cfg.batch_size, num_steps):
        part.step_fn(part.module, part.optimizer, X_b, y_b)
    model = whole_model()
    return part.is_main, part.holds_all, part.info, None if model is None else model.state_dict()


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_role_trains_a_stage_and_gives_back_the_whole_trained_model(schedule):
    # The face the composing module calls: role(cfg, me) -> (Role, whole_model). After two steps
    # the model gathered from the stages is the one one process trains in the same two steps.
    name = "transformer"
    cfg = RunConfig(model=name, parallel="pipeline", nproc=2, batch_size=32, schedule=schedule)
    (main, held, info, trained), (other_main, _, _, nothing) = cu.launch.run(
        face, 2, cfg, 2, threads=1, device="cpu"
    )
    assert main and not other_main and not held  # rank 0 speaks; each rank holds a stage only
    assert nothing is None  # the whole model on the main rank only
    assert len(info["stages"]) == len(info["stage_sizes"]) == (4 if schedule == "zbv" else 2)
    assert sum(info["stage_sizes"]) == stages.max_stages(name)
    model = cu.models.build(name, seed=cfg.seed)
    optimizer = cu.models.make_optimizer(model, cfg.lr, cfg.optimizer)
    images, labels = cu.data.mnist("train")
    X = cu.models.prepare_input(name, images)
    for X_b, y_b in cu.data.batches(X, labels, cfg.batch_size, 2):
        cu.loop.train_step(model, optimizer, X_b, y_b)
    assert trained.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=1e-4, atol=1e-6)
