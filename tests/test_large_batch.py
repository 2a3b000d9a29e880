"""Large-batch training (lesson 05): the linear scaling rule, gradual warmup, a learning-rate
schedule as a step_fn, and the time a run took to reach a target accuracy."""

import pytest
import torch

from course_utils import collectives, data, ddp, large_batch, launch, loop, models


def test_the_linear_scaling_rule_multiplies_the_learning_rate_with_the_batch():
    assert large_batch.scaled_lr(0.1, 256, 256) == pytest.approx(0.1)
    assert large_batch.scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)  # Goyal et al.'s ImageNet
    assert large_batch.scaled_lr(0.01, 16, 32) == pytest.approx(0.005)  # smaller batch, smaller lr
    with pytest.raises(ValueError):
        large_batch.scaled_lr(0.1, 0, 256)


def test_warmup_ramps_linearly_from_the_start_rate_then_holds():
    lrs = [large_batch.warmup_lr(step, 0.4, 4, start_lr=0.1) for step in range(7)]
    assert lrs == pytest.approx([0.1, 0.175, 0.25, 0.325, 0.4, 0.4, 0.4])
    assert large_batch.warmup_lr(0, 0.4, 0, start_lr=0.1) == 0.4  # no warmup: the rate at once


def test_scheduled_sets_the_rate_before_each_step_and_counts_from_first_step():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    def spy(model, optimizer, X, y):
        seen.append(optimizer.param_groups[0]["lr"])
        return loop.train_step(model, optimizer, X, y)

    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    step_fn = large_batch.scheduled(spy, lambda step: 0.1 * (step + 1))
    history = loop.fit(model, optimizer, iter([(X, y)] * 4), 4, step_fn=step_fn, progress=False)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4]) and len(history.losses) == 4
    resumed = large_batch.scheduled(spy, lambda step: 0.1 * (step + 1), first_step=10)
    resumed(model, optimizer, X, y)
    assert seen[-1] == pytest.approx(1.1)


def test_a_schedule_changes_the_training_as_the_plain_rate_would():
    # One step at lr 0.05 through the schedule equals one step with the optimizer built at 0.05.
    X, y = data.mnist("train", limit=32)
    scheduled_model, plain_model = models.build("cnn", seed=0), models.build("cnn", seed=0)
    opt_a = models.make_optimizer(scheduled_model, lr=99.0)  # overridden by the schedule
    opt_b = models.make_optimizer(plain_model, lr=0.05)
    large_batch.scheduled(loop.train_step, lambda step: 0.05)(scheduled_model, opt_a, X, y)
    loop.train_step(plain_model, opt_b, X, y)
    for a, b in zip(scheduled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def warmed_up_data_parallel(batch_size: int, steps: int) -> list[torch.Tensor]:
    me = launch.worker()
    X, y = data.mnist("train")
    model = models.build("cnn", seed=0)
    optimizer = models.make_optimizer(model, lr=0.01)
    lr = large_batch.scaled_lr(0.01, batch_size, 16)  # 4 times the batch of 16: 4 times the rate
    schedule = lambda step: large_batch.warmup_lr(step, lr, steps, start_lr=0.01)  # noqa: E731
    step = ddp.hand_step if me.world_size > 1 else loop.train_step  # hand_step: all-reduce
    loop.fit(
        model,
        optimizer,
        data.batches(X, y, batch_size, steps, 0, me.rank, me.world_size),
        steps,
        step_fn=large_batch.scheduled(step, schedule),
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
    assert large_batch.time_to_target(curve, 0.9) == 3.0
    assert large_batch.time_to_target(curve, 0.5) == 1.0
    assert large_batch.time_to_target(curve, 0.96) is None
    assert large_batch.time_to_target([], 0.1) is None


def test_large_batch_train_on_2_workers_is_the_one_process_run():
    args = (64, 0.04, 256, 2)  # batch, lr, budget, warmup steps: 4 steps
    single = large_batch.train(*args, eval_every=128, test_size=64)
    per_rank = launch.run(large_batch.train, 2, *args, None, 128, test_size=64, threads=1,
                          device="cpu")  # fmt: skip
    assert single["steps"] == 4 and not single["diverged"]
    assert [seen for seen, _, _ in single["curve"]] == [128, 256]
    assert per_rank[0]["accuracy"] == per_rank[1]["accuracy"]  # all-reduced counts
    assert abs(per_rank[0]["accuracy"] - single["accuracy"]) <= 1 / 64  # one image, at most
    assert per_rank[0]["samples_per_s"] > 0


def test_large_batch_train_stops_at_the_target_and_reports_divergence():
    stopped = large_batch.train(32, 0.01, 512, target=0.0, eval_every=64, test_size=32)
    assert [seen for seen, _, _ in stopped["curve"]] == [64]  # reached at the first test
    assert large_batch.samples_to_target(stopped["curve"], 0.0) == 64
    assert large_batch.samples_to_target([(64, 1.0, 0.5), (128, 2.0, 0.8)], 0.7) == 128
    assert large_batch.samples_to_target([(64, 1.0, 0.5)], 0.9) is None
    wild = large_batch.train(32, float("inf"), 256, test_size=32)  # NaN weights after a step
    assert wild["diverged"] and wild["curve"] == []


def test_race_measures_each_setting_in_turns_and_reads_time_to_target(monkeypatch):
    seen = []

    def fake_run(fn, nproc, batch_size, lr, num_samples, warmup, target, eval_every, **_):
        seen.append((nproc, batch_size, lr))
        curve = [(64, 1.0 * nproc, 0.5), (128, 2.0 / nproc, 0.9)]  # 2 workers: sooner
        return [{"curve": curve, "samples_per_s": 64.0 * nproc}]

    monkeypatch.setattr(large_batch.launch, "run", fake_run)
    recipes = {32: {"lr": 0.01, "warmup_steps": 0}}
    out = large_batch.race(recipes, [1, 2], 256, 0.8, 64, repeats=2)
    assert seen == [(1, 32, 0.01), (2, 32, 0.01)] * 2
    assert out["1 worker, batch 32"]["seconds"].samples == (2.0, 2.0)
    assert out["2 workers, batch 32"]["seconds"].median == 1.0
    assert out["2 workers, batch 32"]["samples"] == 128
    never = large_batch.race(recipes, [1], 256, 0.95, 64, repeats=1)
    assert never["1 worker, batch 32"]["seconds"] is None
