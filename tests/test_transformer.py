"""The transformer under every strategy: the same losses as one process; augmentation and AdamW
keep that true, and checkpoints of AdamW runs resume exactly."""

import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils.config import RunConfig, UsageError
from course_utils.pipeline import stages
from course_utils.pipeline.engine import Pipeline

COMMON = dict(model="transformer", batch_size=32, steps=4, seed=2, optimizer="adamw", lr=1e-3)


def one_step(sizes, m, schedule, engine):
    pipe = Pipeline("transformer", sizes, m, schedule, engine, seed=0)
    X, y = next(cu.data.batches(*cu.data.mnist("train"), 32, 1, seed=0))
    loss, _ = pipe.step_fn(None, torch.optim.SGD(pipe.stage.parameters(), lr=0.0), X, y)
    return float(loss), pipe.full_grads()


@pytest.mark.parametrize("engine,schedule", [("hand", "gpipe"), ("torch", "1f1b")])
def test_a_transformer_pipeline_of_balanced_stages_equals_one_process(engine, schedule):
    model = cu.models.build("transformer", seed=0)
    X, y = next(cu.data.batches(*cu.data.mnist("train"), 32, 1, seed=0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    costs = [(1.0, 2.0)] + [(10.0, 20.0)] * 4 + [(1.0, 2.0)]  # tokens, 4 equal blocks, head
    assert stages.plan(costs, 2) == [3, 3] and stages.plan(costs, 3) == [2, 2, 2]
    results = cu.launch.run(one_step, 2, [3, 3], 4, schedule, engine, threads=1)
    assert results[-1][0] == pytest.approx(loss.item(), rel=1e-5)
    grads = results[0][1]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "extra",
    [
        dict(parallel="ddp", nproc=2),
        dict(parallel="pipeline", nproc=2, microbatches=4, schedule="1f1b"),
        dict(parallel="tp", nproc=2),
    ],
    ids=["ddp", "pipeline", "tp"],
)
def test_every_strategy_trains_the_augmented_transformer_like_one_process(extra):
    one = cu.train.run(RunConfig(**COMMON, augment=True), progress=False)
    split = cu.train.run(RunConfig(**COMMON, augment=True, **extra), progress=False)
    torch.testing.assert_close(split["losses"], one["losses"], rtol=1e-4, atol=0)
    plain = cu.train.run(RunConfig(**COMMON), progress=False)  # augmentation changes the run
    assert plain["losses"][1:] != one["losses"][1:]


def test_an_adamw_run_resumes_exactly_and_refuses_another_optimizer(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    whole = cu.train.run(RunConfig(**{**COMMON, "steps": 6}), progress=False)
    cu.train.run(RunConfig(**COMMON, checkpoint=ckpt), progress=False)
    saved = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    adam = saved["optimizer"]["blocks.0.attn.q.weight"]
    assert set(adam) == {"step", "exp_avg", "exp_avg_sq"} and float(adam["step"]) == 4
    resumed = cu.train.run(RunConfig(**{**COMMON, "steps": 6}, checkpoint=ckpt), progress=False)
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=0, atol=0)
    with pytest.raises(UsageError, match="--optimizer adamw, not sgd"):
        cu.train.run(RunConfig(**{**COMMON, "steps": 8, "optimizer": "sgd"}, checkpoint=ckpt))
