"""The one training loop of the course: single process, data-parallel workers and pipeline stages.

It reads like nanoGPT's: for each batch, a step (forward, backward, update), then a record of the
step. Two parts make it parallel, and :func:`fit` shows both:

- ``step_fn``, the step itself (:func:`train_step` by default), which a strategy replaces: a
  hand-written data-parallel step that averages the gradients, a pipeline schedule;
- ``reduce``, a sum across ranks (e.g. an ``all_reduce``), so that what a data-parallel worker
  records is the loss of the whole global batch, not just its own shard: rank 0 then logs the same
  numbers a single process would. :class:`Metrics` sums several steps in one collective.

A strategy says how a rank takes part in a run with a :class:`Role`: what ``fit`` trains, with
which step and which sum.
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

from course_utils import moe, precision


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite: training diverged (a learning rate far too large)."""


@dataclass
class Role:
    """How one rank takes part in a run: what :func:`fit` trains and how. Each strategy's room
    builds one (its ``role``); the training path is then the same for all of them."""

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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    amp: precision.Mixed = precision.FP32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: forward, loss, backward, update. Returns the (detached) loss and correct count.
    ``amp``: the precision (``--precision``, :mod:`course_utils.precision`): the forward under
    autocast, and under fp16 the loss scaled and a step with inf or NaN gradients skipped."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("forward"), amp.autocast(X.device.type):  # spans in a profiler's trace
        logits = model(X)  # (B, num_classes)
        loss = F.cross_entropy(logits, y)  # mean over this process's batch (float32 under autocast)
    with record_function("backward"):
        amp.backward(loss + moe.auxiliary_loss(model))  # + a mixture of experts' balancing loss
    with record_function("optimizer"):
        amp.step(optimizer)
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

    ``batch_size`` is the global batch (default: the first batch's size). ``step_fn`` lets a
    strategy replace the step (hand-written data parallel, a pipeline schedule) and keep the
    bookkeeping. ``reduce`` sums a small tensor across workers (default: nothing to sum, one
    process), every ``sync_every`` steps and at the last (:class:`Metrics`): between two sums
    ``on_step`` sees the history up to the last one. A loss that is not finite stops the run
    (:class:`NonFiniteLoss`, naming the step: counted from ``first_step``, for a resumed run), at
    the next sum."""
    history = History(batch_size=batch_size or 0)
    metrics = Metrics(history, sync_every, first_step)
    device = _device(model, optimizer)
    model.train()
    with tqdm(total=num_steps, desc=desc, disable=not progress, leave=False) as bar:
        for step, (X, y) in zip(range(num_steps), batches):
            X, y = X.to(device), y.to(device)
            start = time.perf_counter()
            loss, correct = step_fn(model, optimizer, X, y)  # forward, backward, update
            metrics.add(loss, correct, len(y))  # this worker's share of the global batch
            if metrics.due(step) or step == num_steps - 1:
                metrics.record(reduce)  # summed over the workers: one collective
                bar.set_postfix(loss=f"{history.losses[-1]:.3f}", refresh=False)
            history.step_times.append(time.perf_counter() - start)
            bar.update(1)
            if on_step is not None:
                on_step(step, history)
        metrics.record(reduce)  # the batches ran out before num_steps: record what was trained
    return history


def _device(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.device:
    """Where the batches go: the model's device (ZeRO-3's model holds no parameters: its
    shards', which the optimizer steps)."""
    first = next(model.parameters(), None)
    return (first if first is not None else optimizer.param_groups[0]["params"][0]).device


class Metrics:
    """Every step's mean loss and accuracy over the *global* batch, with one collective for
    several steps rather than one per step (a meeting of every worker: a measured 2-4% of a
    data-parallel step).

    Each worker keeps its own ``[loss * n, correct, n]`` per step (:meth:`add`); summed over the
    workers they give the global batch's exact mean loss. Every ``sync_every`` steps (counted from
    step 0 of the whole run), :meth:`record` sums all the steps kept since the last sum at once
    and appends them to the history."""

    def __init__(self, history: History, sync_every: int = 1, first_step: int = 0):
        self.history, self.sync_every, self.first_step = history, sync_every, first_step
        self.unsummed: list[torch.Tensor] = []  # this worker's [loss * n, correct, n] per step

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Keep one step's numbers on this worker (no communication)."""
        self.unsummed.append(torch.stack([loss * n, correct.to(loss.dtype), loss.new_tensor(n)]))

    def due(self, step: int) -> bool:
        """Whether the steps kept so far are summed after ``step`` (counted in this call of fit)."""
        return (self.first_step + step + 1) % self.sync_every == 0

    def record(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Sum the kept steps over the workers with ``reduce`` (one call for all of them) and
        append each step's global loss and accuracy to the history."""
        if not self.unsummed:
            return
        totals = torch.stack(self.unsummed)  # (steps, 3)
        self.unsummed = []
        if reduce is not None:
            totals = reduce(totals)
        for total_loss, total_correct, n in totals.tolist():
            if not math.isfinite(total_loss):  # every rank sees the same global loss
                step = self.first_step + len(self.history.losses) + 1
                raise NonFiniteLoss(
                    f"the loss is {total_loss / n} at step {step}: "
                    "training diverged (try a smaller --lr)"
                )
            self.history.losses.append(total_loss / n)
            self.history.accuracies.append(total_correct / n)
            if not self.history.batch_size:
                self.history.batch_size = int(n)


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
