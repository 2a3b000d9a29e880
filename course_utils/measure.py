"""Measuring on a machine that is never idle: repeats and their spread, turns, and what else ran.

A learner's laptop always runs something else (a browser, at least), and a timing taken once is a
sample of that noise as much as of the code. So the course measures like this:

- :class:`Spread`: the median of repeated measurements, with their minimum and maximum; a point
  whose repeats disagree by more than :data:`NOISY` (20%) is *noisy*, and the plots mark it;
- :func:`interleaved`: several settings measured in turns (A B C, A B C, ...), so that a burst of
  load elsewhere hits them alike, and :func:`ratios` of paired repeats (A_i / B_i);
- :class:`Watch`: how many cores *other* programs kept busy while a block of measurements ran,
  and :meth:`Watch.note`, one line to print beside a figure;
- :func:`throughput` and :func:`step_phases`: what one training step costs on this machine,
  in samples per second through :func:`course_utils.loop.fit`, and in seconds of its forward,
  backward and optimizer phases (lesson 01).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_utils import loop

NOISY = 0.20  # repeats that differ by more than this (max / min - 1) make a point noisy
QUIET_CORES = 0.25  # other programs using less than this many cores: a quiet machine


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one thing: ``median`` (what a figure shows), ``low``/``high``
    (the error bar), and whether they disagree too much to read closely (``noisy``)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def noisy(self) -> bool:
        return len(self.samples) > 1 and self.low > 0 and self.high / self.low - 1 > NOISY

    def __float__(self) -> float:
        return self.median

    def as_dict(self, name: str) -> dict:
        """``{name: median, name_min: low, name_max: high, name_noisy: noisy}``, for a point."""
        return {
            name: self.median,
            f"{name}_min": self.low,
            f"{name}_max": self.high,
            f"{name}_noisy": self.noisy,
        }

    def __str__(self) -> str:
        if len(self.samples) == 1:
            return _number(self.median)
        flag = ", noisy" if self.noisy else ""
        return f"{_number(self.median)} ({_number(self.low)}-{_number(self.high)}{flag})"


def _number(x: float) -> str:
    """Three significant digits, trailing zeros kept (1.00, 0.918, 12.5); 1,850 for large ones."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}".rstrip(".")


def spread(samples: Iterable[float]) -> Spread:
    """A :class:`Spread` of measurements (at least one)."""
    samples = tuple(float(s) for s in samples)
    if not samples:
        raise ValueError("a spread needs at least one measurement")
    return Spread(samples)


def interleaved(
    measures: dict[str, Callable[[], float]], repeats: int, progress: str | None = None
) -> dict[str, Spread]:
    """Run every measure once per round, in turns, for ``repeats`` rounds; their spreads.
    ``progress``: a description for a progress bar over the runs (none when ``None``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    samples: dict[str, list[float]] = {name: [] for name in measures}
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm  # only where a bar is asked for: this module stays light

        bar = tqdm(total=repeats * len(measures), desc=progress, leave=False)
    for _ in range(repeats):
        for name, measure in measures.items():
            if bar is not None:
                bar.set_postfix_str(str(name))
            samples[name].append(float(measure()))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return {name: spread(values) for name, values in samples.items()}


def ratios(a: Spread, b: Spread) -> Spread:
    """The paired ratios ``a_i / b_i`` of two interleaved spreads (same round, same noise)."""
    if len(a.samples) != len(b.samples):
        raise ValueError("ratios pair the repeats of two spreads: they need as many")
    return spread(x / y for x, y in zip(a.samples, b.samples))


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat (Linux), or None."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks[:8]) - idle, sum(ticks[:8])


class Watch:
    """A context manager: how many cores other programs kept busy during the block (``others``,
    in cores), beside ``cores`` and the block's ``seconds``. This process's own CPU time and that
    of the worker processes it started and waited for during the block are not counted."""

    def __init__(self):
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.others: float | None = None  # cores other programs kept busy, on average
        self.total: float | None = None  # cores busy in all, this process and its workers too
        self.own: float | None = None  # cores this process and the workers it waited for used
        self.seconds = 0.0

    def __enter__(self) -> Watch:
        self._start = (time.perf_counter(), _busy_jiffies(), os.times())
        return self

    def __exit__(self, *_exc) -> None:
        t0, busy0, own0 = self._start
        self.seconds = time.perf_counter() - t0
        busy1, own1 = _busy_jiffies(), os.times()
        if busy0 is None or busy1 is None or self.seconds <= 0:  # not Linux: the load average
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            self.others = max(0.0, load - 1.0)  # the measurement itself keeps about one core busy
            return
        hz = os.sysconf("SC_CLK_TCK")
        all_busy = (busy1[0] - busy0[0]) / hz
        own = sum(own1[:4]) - sum(own0[:4])  # user + system, of this process and its children
        self.total, self.own = all_busy / self.seconds, own / self.seconds
        self.others = max(0.0, all_busy - own) / self.seconds

    @property
    def quiet(self) -> bool:
        return self.others is not None and self.others < QUIET_CORES

    def note(self) -> str:
        """One line on how busy the machine was, to print beside what was measured."""
        if self.others is None:
            return "(not measured: use `with cu.measure.Watch() as watch:` around the timings)"
        busy = f"other programs kept {self.others:.2f} of this machine's {self.cores} cores busy"
        if self.quiet:
            return f"The machine was quiet while measuring: {busy}."
        return (
            f"While measuring, {busy}: parallel speedups measured meanwhile may be lower and "
            "noisier than on a quiet machine."
        )


def step_phases(
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


def throughput(
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
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    step_fn = loop.train_step if microbatches == 1 else _accumulating(microbatches)
    with loop.num_threads(threads):
        history = loop.fit(
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
