"""What a bigger global batch does to training (lesson 05, section 10): one training run of the
CNN on a fixed budget of samples, with the linear scaling rule and gradual warmup (Goyal et al.
2017, arXiv:1706.02677), tested as it goes; and a race of such runs to a target accuracy on 1 and
N workers, measured in turns.

The rules themselves are small functions: :func:`scaled_lr` (the linear scaling rule),
:func:`warmup_lr` (gradual warmup), :func:`scheduled` (a schedule applied before each step, as a
``step_fn`` for :func:`course_utils.loop.fit`) and :func:`time_to_target`.

:func:`train` runs in this process, or on every worker of a process group: then each rank takes
its shard of every global batch and :func:`course_utils.ddp.hand_step` averages the gradients, so
the arithmetic is the same as one process's (lesson 05, section 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from course_utils import collectives, data, ddp, launch, loop, measure, models


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD",
    arXiv:1706.02677): a batch ``k`` times bigger gets a learning rate ``k`` times bigger."""
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"batch sizes must be at least 1, got {batch_size} and {base_batch_size}")
    return base_lr * batch_size / base_batch_size


def warmup_lr(step: int, lr: float, warmup_steps: int, start_lr: float) -> float:
    """The learning rate of ``step`` (counted from 0) under gradual warmup: ``start_lr`` at step
    0, rising by the same amount each step to ``lr`` at step ``warmup_steps``, then ``lr``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    return start_lr + (lr - start_lr) * step / warmup_steps


def scheduled(step_fn: Callable, schedule: Callable[[int], float], first_step: int = 0) -> Callable:
    """``step_fn`` with a learning-rate schedule, a drop-in ``step_fn`` for
    :func:`course_utils.loop.fit`: before each step every parameter group of the optimizer gets
    ``schedule(step)``, with steps counted from ``first_step`` (a resumed run continues its
    schedule)."""
    step = first_step

    def step_with_schedule(model, optimizer, X, y):
        nonlocal step
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        step += 1
        return step_fn(model, optimizer, X, y)

    return step_with_schedule


def time_to_target(curve: Iterable[tuple[float, float]], target: float) -> float | None:
    """The first time of ``curve`` (``(seconds, accuracy)`` pairs, in order) at which the accuracy
    reached ``target``; None if it never did."""
    for seconds, accuracy in curve:
        if accuracy >= target:
            return seconds
    return None


def train(
    batch_size: int,
    lr: float,
    num_samples: int,
    warmup_steps: int = 0,
    target: float | None = None,
    eval_every: int | None = None,
    *,
    start_lr: float = 0.01,
    test_size: int = 500,
    seed: int = 0,
) -> dict:
    """Train the CNN on ``num_samples`` samples in global batches of ``batch_size`` (so a bigger
    batch takes fewer steps), the learning rate ramping from ``min(start_lr, lr)`` to ``lr`` over
    ``warmup_steps``. Test on ``test_size`` test images every ``eval_every`` samples (None: at the
    end only); with a ``target`` accuracy, stop at the first test that reaches it.

    Returns ``curve`` ((samples seen, seconds of training, test accuracy) at each test; the
    seconds are the steps' own, testing excluded), the last ``accuracy``, ``steps``,
    ``samples_per_s`` (to the last test) and ``diverged`` (the loss turned NaN or infinite)."""
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    X, y = data.mnist("train")
    X_test, y_test = data.mnist("test", limit=test_size)
    X_test, y_test = X_test[rank::world_size], y_test[rank::world_size]  # each tests a part
    model = models.build("cnn", seed=seed)
    optimizer = models.make_optimizer(model, lr)
    num_steps = num_samples // batch_size

    def schedule(step: int) -> float:  # gradual warmup, then lr
        return warmup_lr(step, lr, warmup_steps, min(start_lr, lr))

    curve: list[tuple[int, float, float]] = []

    def test_accuracy() -> float:
        counts = torch.tensor([loop.evaluate(model, X_test, y_test) * len(y_test), len(y_test)])
        if distributed:
            dist.all_reduce(counts)  # [correct, tested] over all ranks
        return (counts[0] / counts[1]).item()

    def on_step(i: int, history) -> None:  # test every `eval_every` samples, and at the end
        seen, every = (i + 1) * batch_size, eval_every or num_samples
        if seen // every > (seen - batch_size) // every or i + 1 == num_steps:
            curve.append((seen, sum(history.step_times), test_accuracy()))

    def batches():  # this rank's shards, until the target is reached (every rank sees it)
        for batch in data.batches(X, y, batch_size, num_steps, seed, rank, world_size):
            if target is not None and curve and curve[-1][2] >= target:
                return
            yield batch

    step = ddp.hand_step if distributed else loop.train_step
    try:
        loop.fit(
            model,
            optimizer,
            batches(),
            num_steps,
            batch_size=batch_size,
            step_fn=scheduled(step, schedule),
            reduce=collectives.all_reduce_sum if distributed else None,
            on_step=on_step,
            progress=False,
        )
        diverged = False
    except loop.NonFiniteLoss:  # the learning rate was too large
        diverged = True
    seen, seconds, accuracy = curve[-1] if curve and not diverged else (0, 0.0, test_accuracy())
    return {
        "curve": curve,
        "accuracy": accuracy,
        "steps": num_steps,
        "samples_per_s": seen / seconds if seconds > 0 else float("nan"),
        "diverged": diverged,
    }


def samples_to_target(curve: Sequence[tuple], target: float) -> int | None:
    """The samples seen at the first test of ``curve`` that reached ``target``; None if none."""
    return next((seen for seen, _, accuracy in curve if accuracy >= target), None)


def race(
    recipes: dict[int, dict],
    workers: Sequence[int],
    num_samples: int,
    target: float,
    eval_every: int,
    repeats: int,
    progress: str | None = None,
) -> dict[str, dict]:
    """Every (workers, batch) setting trains to ``target`` with its batch's recipe (``lr``,
    ``warmup_steps``), on CPU workers of one thread, the settings in turns for ``repeats`` rounds.

    Returns, per setting ("2 workers, batch 128"): ``samples_per_s`` (a Spread), ``seconds`` (a
    Spread of the training seconds to the target, or None when a repeat never reached it) and
    ``samples`` (samples seen to the target, the same in every repeat, or None)."""
    results: dict[str, list] = {}

    def entrant(nproc: int, batch_size: int):
        recipe, runs = recipes[batch_size], results.setdefault(_name(nproc, batch_size), [])

        def run() -> float:
            args = (batch_size, recipe["lr"], num_samples, recipe["warmup_steps"], target)
            result = launch.run(train, nproc, *args, eval_every, threads=1, device="cpu")[0]
            runs.append(result)
            return result["samples_per_s"]

        return run

    settings = {_name(n, b): entrant(n, b) for b in recipes for n in workers}
    rates = measure.interleaved(settings, repeats, progress=progress)
    out = {}
    for name, runs in results.items():
        times = [time_to_target([(s, a) for _, s, a in r["curve"]], target) for r in runs]
        out[name] = {
            "samples_per_s": rates[name],
            "seconds": measure.spread(times) if None not in times else None,
            "samples": samples_to_target(runs[0]["curve"], target),
        }
    return out


def _name(nproc: int, batch_size: int) -> str:
    return f"{nproc} worker{'s' if nproc > 1 else ''}, batch {batch_size}"
