"""The one training loop of the course: single process, data-parallel workers and pipeline stages.

``fit`` runs a number of steps over an iterable of batches and records, per step, the *global*
mean loss, the accuracy and the time taken. A data-parallel worker passes ``reduce`` (a sum across
ranks, e.g. an ``all_reduce``) so that what it records is the loss of the whole global batch, not
just its own shard: rank 0 then logs the same numbers a single process would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from tqdm.auto import tqdm


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite: training diverged (a learning rate far too large)."""


@dataclass
class Role:
    """How one rank takes part in a run: what :func:`fit` trains and how. Each strategy builds
    one (``course_utils.train`` for none and ddp, ``course_utils.pipeline.worker`` for
    pipelines); the training path is then the same for all of them."""

    module: nn.Module  # what fit() trains: the model, its DDP wrapper, or this rank's stage
    optimizer: torch.optim.Optimizer
    model: nn.Module | None = None  # the plain model (not a wrapper) when this rank holds it all
    data_rank: int = 0  # which slice of each global batch this rank reads...
    data_world_size: int = 1  # ...out of how many (1: the whole batch)
    step_fn: Callable = None  # one training step (default: train_step)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # metrics summed over ranks
    is_main: bool = True  # the rank that reports the results (and writes checkpoints)
    params: list = field(default_factory=list)  # (whole-model name, first row, parameter) each
    holds_all: bool = True  # False when the ranks hold slices of the model (pipeline stages)
    sharded: bool = False  # FSDP shards: checkpoints go through torch.distributed.checkpoint
    info: dict = field(default_factory=dict)  # strategy-specific results (e.g. pipeline stages)

    def __post_init__(self):
        self.step_fn = self.step_fn or train_step


@dataclass
class History:
    """Per-step metrics of a run. ``batch_size`` is the global batch (all workers together)."""

    batch_size: int
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        """Global samples per second over the steps after the first (start-up excluded)."""
        times = self.step_times[1:] or self.step_times
        return self.batch_size * len(times) / sum(times) if times and sum(times) > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}

    def __add__(self, later: History) -> History:
        """This history followed by a later run's steps (a resumed run's whole record)."""
        return History(
            batch_size=later.batch_size or self.batch_size,
            losses=self.losses + later.losses,
            accuracies=self.accuracies + later.accuracies,
            step_times=self.step_times + later.step_times,
        )


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: forward, loss, backward, update. Returns the (detached) loss and correct count."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("forward"):  # named spans in a profiler's trace (--profile)
        logits = model(X)  # (B, num_classes)
        loss = F.cross_entropy(logits, y)  # mean over this process's batch
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        optimizer.step()
    return loss.detach(), (logits.argmax(dim=1) == y).sum()


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_steps: int,
    *,
    batch_size: int | None = None,
    step_fn: Callable = train_step,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, History], None] | None = None,
    first_step: int = 0,
    sync_every: int = 1,
) -> History:
    """Train for ``num_steps`` steps and return the :class:`History`.

    ``batch_size`` is the global batch (default: the first batch's size). ``reduce`` sums a small
    tensor across workers (default: nothing to sum, one process). ``step_fn`` lets a strategy
    replace the step (hand-written data parallel, a pipeline schedule) and keep the bookkeeping.
    ``sync_every``: the workers' per-step metrics are summed every this many steps (counted from
    step 0 of the whole run, and at the last step), all of them in one collective: each step's
    global loss is still recorded, without a collective (a meeting of every worker) per step;
    between two sums ``on_step`` sees the history up to the last one. A loss that is not finite
    stops the run (:class:`NonFiniteLoss`, naming the step: counted from ``first_step``, for a
    resumed run), at the next sum."""
    history = History(batch_size=batch_size or 0)
    # where the batches go: the model's device (ZeRO-3's model holds no parameters: its shards')
    first = next(model.parameters(), None)
    device = (first if first is not None else optimizer.param_groups[0]["params"][0]).device
    model.train()
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False)
    pending: list[torch.Tensor] = []  # this worker's [loss * n, correct, n] of unsummed steps
    try:
        for step, (X, y) in zip(range(num_steps), batches):
            X, y = X.to(device), y.to(device)
            start = time.perf_counter()
            loss, correct = step_fn(model, optimizer, X, y)
            # [loss * n, correct, n] summed over workers gives the exact global mean loss.
            pending.append(
                torch.stack([loss * len(y), correct.to(loss.dtype), loss.new_tensor(len(y))])
            )
            done = first_step + step + 1
            if done % sync_every == 0 or step == num_steps - 1:
                _record(history, pending, reduce, first_step)
                pending = []
                bar.set_postfix(loss=f"{history.losses[-1]:.3f}", refresh=False)
            history.step_times.append(time.perf_counter() - start)
            bar.update(1)
            if on_step is not None:
                on_step(step, history)
        if pending:  # the batches ran out before num_steps: record what was trained
            _record(history, pending, reduce, first_step)
    finally:
        bar.close()
    return history


def _record(history: History, pending: list, reduce, first_step: int) -> None:
    """Sum the pending steps' metrics over the workers (one collective) and record them."""
    stats = torch.stack(pending)  # (steps, 3)
    if reduce is not None:
        stats = reduce(stats)
    for total_loss, total_correct, n in stats.tolist():
        if not math.isfinite(total_loss):  # every rank sees the same global loss
            raise NonFiniteLoss(
                f"the loss is {total_loss / n} at step {first_step + len(history.losses) + 1}: "
                "training diverged (try a smaller --lr)"
            )
        history.losses.append(total_loss / n)
        history.accuracies.append(total_correct / n)
        if not history.batch_size:
            history.batch_size = int(n)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Accuracy of ``model`` on ``(X, y)``, in [0, 1]."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(X), batch_size):
        logits = model(X[i : i + batch_size].to(device))
        correct += (logits.argmax(dim=1).cpu() == y[i : i + batch_size]).sum().item()
    model.train()
    return correct / len(X)


@contextmanager
def num_threads(threads: int | None):
    """Run a block with ``torch.set_num_threads(threads)``, restoring the old setting after."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_step_phases(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    repeats: int = 5,
) -> dict[str, float]:
    """Mean seconds of each phase of a training step: forward, backward, optimizer (lesson 01)."""
    totals = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i in range(repeats + 1):  # the first repeat warms up and is not counted
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(X), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if i:
            totals["forward"] += t1 - t0
            totals["backward"] += t2 - t1
            totals["optimizer"] += t3 - t2
    return {k: v / repeats for k, v in totals.items()}


def measure_throughput(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    threads: int | None = None,
    num_steps: int = 10,
    lr: float = 0.01,
    microbatches: int = 1,
) -> float:
    """Training samples per second of ``model`` at this batch size and thread count; with
    ``microbatches``, each step accumulates the gradients of that many equal pieces of the batch
    (the arithmetic a pipeline does, on one device).

    Trains a throwaway copy, so the caller's model is untouched."""
    import copy

    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    step_fn = train_step if microbatches == 1 else _accumulating(microbatches)
    with num_threads(threads):
        history = fit(
            model,
            optimizer,
            _cycle(X, y, batch_size),
            num_steps + 1,
            step_fn=step_fn,
            progress=False,
        )
    return history.samples_per_s


def _accumulating(microbatches: int) -> Callable:
    """A step that runs the batch as ``microbatches`` pieces, summing their gradients."""

    def step(model, optimizer, X, y):
        optimizer.zero_grad(set_to_none=True)
        losses, correct = [], 0
        for X_m, y_m in zip(X.chunk(microbatches), y.chunk(microbatches)):
            logits = model(X_m)
            loss = F.cross_entropy(logits, y_m) / microbatches  # its share of the batch mean
            loss.backward()
            losses.append(loss.detach())
            correct = correct + (logits.argmax(dim=1) == y_m).sum()
        optimizer.step()
        return torch.stack(losses).sum(), correct

    return step


def _cycle(X: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Endless batches in order (for timing, where which samples doesn't matter)."""
    while True:
        for i in range(0, len(X) - batch_size + 1, batch_size):
            yield X[i : i + batch_size], y[i : i + batch_size]


OPTIMIZERS = ("sgd", "adamw")  # the choices of --optimizer


def make_optimizer(model, lr: float, kind: str = "sgd") -> torch.optim.Optimizer:
    """The course's optimizers: SGD with momentum 0.9 everywhere by default (the article used
    plain SGD), or AdamW (weight decay 0.05), which transformers train better with. ``model``: a
    module, or the tensors to train (ZeRO's shards)."""
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    # foreach: one call per operation for all tensors together, not one per tensor (PyTorch
    # picks it only on GPUs): on sharded DTensors (FSDP) every call costs a Python dispatch. It
    # can't mix DTensors with plain tensors (tensor parallel leaves the norms whole).
    foreach = len({hasattr(p, "device_mesh") for p in params}) <= 1
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=foreach)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05, foreach=foreach)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


# Large-batch training (lesson 05): the linear scaling rule with gradual warmup, a schedule
# applied through a step_fn, and the time a run took to reach an accuracy.


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
    """``step_fn`` with a learning-rate schedule, a drop-in ``step_fn`` for :func:`fit`: before
    each step every parameter group of the optimizer gets ``schedule(step)``, with steps counted
    from ``first_step`` (a resumed run continues its schedule)."""
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
