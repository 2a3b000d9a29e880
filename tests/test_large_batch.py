"""Large-batch training (lesson 05): the linear scaling rule, gradual warmup, a learning-rate
schedule as a step_fn, and the time a run took to reach a target accuracy."""

import pytest
import torch

from course_utils import collectives, data, ddp, launch, loop, models


def test_the_linear_scaling_rule_multiplies_the_learning_rate_with_the_batch():
    assert loop.scaled_lr(0.1, 256, 256) == pytest.approx(0.1)
    assert loop.scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)  # Goyal et al.'s ImageNet case
    assert loop.scaled_lr(0.01, 16, 32) == pytest.approx(0.005)  # smaller batch, smaller lr
    with pytest.raises(ValueError):
        loop.scaled_lr(0.1, 0, 256)


def test_warmup_ramps_linearly_from_the_start_rate_then_holds():
    lrs = [loop.warmup_lr(step, 0.4, 4, start_lr=0.1) for step in range(7)]
    assert lrs == pytest.approx([0.1, 0.175, 0.25, 0.325, 0.4, 0.4, 0.4])
    assert loop.warmup_lr(0, 0.4, 0, start_lr=0.1) == 0.4  # no warmup: the rate at once


def test_scheduled_sets_the_rate_before_each_step_and_counts_from_first_step():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    def spy(model, optimizer, X, y):
        seen.append(optimizer.param_groups[0]["lr"])
        return loop.train_step(model, optimizer, X, y)

    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    step_fn = loop.scheduled(spy, lambda step: 0.1 * (step + 1))
    history = loop.fit(model, optimizer, iter([(X, y)] * 4), 4, step_fn=step_fn, progress=False)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4]) and len(history.losses) == 4
    resumed = loop.scheduled(spy, lambda step: 0.1 * (step + 1), first_step=10)
    resumed(model, optimizer, X, y)
    assert seen[-1] == pytest.approx(1.1)


def test_a_schedule_changes_the_training_as_the_plain_rate_would():
    # One step at lr 0.05 through the schedule equals one step with the optimizer built at 0.05.
    X, y = data.mnist("train", limit=32)
    scheduled_model, plain_model = models.build("cnn", seed=0), models.build("cnn", seed=0)
    opt_a = loop.make_optimizer(scheduled_model, lr=99.0)  # overridden by the schedule
    opt_b = loop.make_optimizer(plain_model, lr=0.05)
    loop.scheduled(loop.train_step, lambda step: 0.05)(scheduled_model, opt_a, X, y)
    loop.train_step(plain_model, opt_b, X, y)
    for a, b in zip(scheduled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def warmed_up_data_parallel(batch_size: int, steps: int) -> list[torch.Tensor]:
    me = launch.worker()
    X, y = data.mnist("train")
    model = models.build("cnn", seed=0)
    optimizer = loop.make_optimizer(model, lr=0.01)
    lr = loop.scaled_lr(0.01, batch_size, 16)  # 4 times the batch of 16: 4 times the rate
    schedule = lambda step: loop.warmup_lr(step, lr, steps, start_lr=0.01)  # noqa: E731
    step = ddp.hand_step if me.world_size > 1 else loop.train_step  # hand_step: all-reduce
    loop.fit(
        model,
        optimizer,
        data.batches(X, y, batch_size, steps, 0, me.rank, me.world_size),
        steps,
        step_fn=loop.scheduled(step, schedule),
        reduce=collectives.all_reduce_sum if me.world_size > 1 else None,
        progress=False,
    )
    return [p.detach().clone() for p in model.parameters()]


def test_warmup_on_2_workers_trains_what_one_process_trains():
    steps, batch = 4, 64
    single = launch.run(warmed_up_data_parallel, 1, batch, steps, threads=1, device="cpu")[0]
    per_rank = launch.run(warmed_up_data_parallel, 2, batch, steps, threads=1, device="cpu")
    for p_parallel, p_single in zip(per_rank[0], single):
        torch.testing.assert_close(p_parallel, p_single, rtol=1e-4, atol=1e-5)


def test_time_to_target_is_the_first_time_the_accuracy_reached_it():
    curve = [(1.0, 0.5), (2.0, 0.89), (3.0, 0.91), (4.0, 0.88), (5.0, 0.95)]
    assert loop.time_to_target(curve, 0.9) == 3.0
    assert loop.time_to_target(curve, 0.5) == 1.0
    assert loop.time_to_target(curve, 0.96) is None
    assert loop.time_to_target([], 0.1) is None
