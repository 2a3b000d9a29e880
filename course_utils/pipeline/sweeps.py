"""The measured experiments of lessons 06 and 07, so that the lessons show the technique and not
the plumbing: a pipeline run on CPU workers (:func:`run`), one process's losses to compare with
(:func:`one_process_losses`), what a recorded timeline says (:func:`busy_shares`,
:func:`handoff_waits`), how stages balance (:func:`plan_rows`, :func:`imbalance`,
:func:`stage_names`, :func:`conv2_cut_cost`), the throughput sweep of lesson 06
(:func:`throughput_sweep`), the transformer sweep of lesson 07 (:func:`transformer_sweep`,
:func:`bound_factors`), and the costs the zero-bubble simulation needs (:func:`split_unit_costs`,
:func:`stage_fbw`, :func:`train_step_ms`). Every timing is taken in turns with its baseline
(:func:`course_utils.measure.interleaved`) and kept as a :class:`course_utils.measure.Spread`.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_utils import data, launch, loop, measure, models
from course_utils.pipeline import measured, schedules, stages
from course_utils.pipeline.schedules import Event
from course_utils.pipeline.strategy import config_error


def run(
    model: str,
    microbatches: int,
    schedule: str = "gpipe",
    engine: str = "hand",
    batch_size: int = 64,
    num_steps: int = 4,
    sizes: list[int] | None = None,
    nproc: int = 2,
) -> dict:
    """One measured pipeline run (:func:`course_utils.pipeline.measured.profile`) on ``nproc`` CPU
    workers with one thread each: rank 0's record (samples_per_s, the last step's events,
    losses, sizes)."""
    job = measured.Profile(model, microbatches, schedule, engine, batch_size, num_steps, sizes)
    return launch.run(measured.profile, nproc, job, threads=1, device="cpu")[0]


def one_process_losses(
    name: str, batch_size: int, num_steps: int, lr: float = 0.01, seed: int = 0
) -> list[float]:
    """The per-step losses of the whole model trained in this process: what a pipeline's equal."""
    model = models.build(name, seed=seed)
    X, y = data.mnist("train")
    batches = data.batches(models.prepare_input(name, X), y, batch_size, num_steps, seed=seed)
    optimizer = models.make_optimizer(model, lr)
    return loop.fit(model, optimizer, batches, num_steps, progress=False).losses


def busy_time(events: list[Event]) -> float:
    """Seconds all rows of a recorded step spent computing (the sum of every bar's length)."""
    return sum(e.end - e.start for e in events)


def busy_shares(events: list[Event]) -> list[float]:
    """Per timeline row (stage, or rank where a rank holds several stages): the share of the
    step it was busy. ``1 - mean`` of them is :func:`course_utils.pipeline.schedules.bubble_fraction`."""
    span = schedules.makespan(events)
    rows = sorted({e.row for e in events})
    return [sum(e.end - e.start for e in events if e.row == r) / span for r in rows]


def handoff_waits(events: list[Event]) -> list[float]:
    """For each F (B) whose stage sat idle until the same microbatch's F on the stage before (B
    on the stage after) ended: how long after that end it started (a message and the engine's
    bookkeeping), in seconds."""
    done = {(e.kind, e.stage, e.microbatch): e for e in events}
    waits = []
    for s in {e.stage for e in events}:
        mine = sorted((e for e in events if e.stage == s), key=lambda e: e.start)
        for before, e in zip([None, *mine], mine):
            src = ("F", s - 1, e.microbatch) if e.kind == "F" else ("B", s + 1, e.microbatch)
            source = done.get(src)
            if source is not None and (before is None or before.end <= source.end):
                waits.append(e.start - source.end)
    return waits


def stage_names(names: list[str], sizes: list[int]) -> str:
    """The plan in words: ``"conv1 block | conv2[:16] + fc"``."""
    bounds = [0, *itertools.accumulate(sizes)]
    return " | ".join(" + ".join(names[a:b]) for a, b in itertools.pairwise(bounds))


def imbalance(costs: list[tuple[float, float]], sizes: list[int]) -> float:
    """The slower stage's forward + backward over the faster one's (1.0: even stages)."""
    fwd, bwd = stages.stage_costs(costs, sizes)
    per_stage = [f + b for f, b in zip(fwd, bwd)]
    return max(per_stage) / min(per_stage)


PLAN_HEADERS = ("p", "units per stage", "ms per stage", "at most (x)")  # for plan_rows


def plan_rows(
    costs: list[tuple[float, float]], num_stages: tuple[int, ...] = (2, 3, 4)
) -> list[tuple]:
    """For each p: (p, units per stage, ms per stage, the most p stages can gain: total time
    over the slowest stage), the plan :func:`course_utils.pipeline.stages.plan` makes."""
    total = sum(f + b for f, b in costs)
    rows = []
    for p in num_stages:
        sizes = stages.plan(costs, p)
        fwd, bwd = stages.stage_costs(costs, sizes)
        per_stage = [f + b for f, b in zip(fwd, bwd)]
        ms = " / ".join(f"{1e3 * t:.1f}" for t in per_stage)
        rows.append((p, sizes, ms, total / max(per_stage)))
    return rows


def conv2_cut_cost(model: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The CNN's units with conv2 cut after ``k`` output channels: milliseconds of the slowest
    stage of the best 2-stage plan, measured with one thread."""
    pieces = [
        stages.CNNBlock1(model),
        stages.Conv2Slice(model, 0, k),
        stages.Conv2Slice(model, k, 64),
        stages.Head(model),
    ]
    with loop.num_threads(1):
        costs = stages.unit_costs(pieces, X, y, repeats=5)
    fwd, bwd = stages.stage_costs(costs, stages.plan(costs, 2))
    return 1e3 * max(f + b for f, b in zip(fwd, bwd))


@dataclass
class Sweep:
    """A sweep's measurements: ``rates[key]`` (samples/s Spreads by baseline or "pipeline"),
    ``runs[key]`` (every pipeline run's record), ``sims[key]`` (simulated steps)."""

    rates: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    sims: dict = field(default_factory=dict)

    def speedup(self, key, baseline: str = "one process") -> measure.Spread:
        """The pipeline over ``baseline``, paired round by round."""
        return measure.ratios(self.rates[key]["pipeline"], self.rates[key][baseline])

    def bubbles(self, key) -> measure.Spread:
        """The measured bubble of every run at ``key``."""
        return measure.spread(schedules.bubble_fraction(r["events"]) for r in self.runs[key])

    def work(self, key, batch_size: int, baseline: str = "one process") -> measure.Spread:
        """Per round: the stages' busy time in the recorded step over the baseline's step time
        (1.0: the stages did the baseline's work; above: more)."""
        steps = [batch_size / rate for rate in self.rates[key][baseline].samples]
        return measure.spread(busy_time(r["events"]) / t for r, t in zip(self.runs[key], steps))


def throughput_sweep(
    name: str,
    batch_size: int,
    num_steps: int,
    microbatches: list[int],
    repeats: int,
    sizes: list[int],
    schedule_names: tuple[str, ...] = schedules.SCHEDULES,
    engine: str = "torch",
) -> Sweep:
    """Lesson 06's throughput: for each (schedule, m), a 2-stage pipeline and one process (one
    thread, the whole batch) in turns, ``repeats`` rounds. Settings torch refuses are skipped."""
    out = Sweep()
    base = lambda: measured.one_process_throughput(name, batch_size, 1, num_steps)  # noqa: E731
    keys = [
        (s, m)
        for s in schedule_names
        for m in microbatches
        if config_error(name, 2, batch_size, m, s) is None
    ]
    for key in keys:
        out.runs[key] = []

        def pipe(key=key):
            out.runs[key].append(run(name, key[1], key[0], engine, batch_size, num_steps, sizes))
            return out.runs[key][-1]["samples_per_s"]

        out.rates[key] = measure.interleaved(
            {"one process": base, "pipeline": pipe}, repeats, progress=f"{key[0]}, m={key[1]}"
        )
    return out


WHOLE, SAME = "whole batch", "same m microbatches"  # lesson 07's two baselines


def transformer_sweep(
    batch_size: int,
    num_steps: int,
    microbatches: list[int],
    repeats: int,
    sizes: list[int],
    units: list[nn.Module],
    X: torch.Tensor,
    y: torch.Tensor,
) -> Sweep:
    """Lesson 07's sweep: for each m, the whole batch in one process (:data:`WHOLE`), the same
    m microbatches in one process (:data:`SAME`) and the 2-stage 1F1B pipeline (hand engine), in
    turns, ``repeats`` rounds; and each m's 1F1B step simulated from the units' costs measured
    at its microbatch size (``units`` on ``X, y``)."""
    out = Sweep()

    def one(m):
        return measured.one_process_throughput("transformer", batch_size, 1, num_steps, 0, m)

    for m in microbatches:
        with loop.num_threads(1):
            c = stages.unit_costs(units, X[: batch_size // m], y[: batch_size // m], repeats=5)
        out.sims[m] = schedules.simulate("1f1b", 2, m, *stages.stage_costs(c, sizes))
        out.runs[m] = []

        def pipe(m=m):
            out.runs[m].append(run("transformer", m, "1f1b", "hand", batch_size, num_steps, sizes))
            return out.runs[m][-1]["samples_per_s"]

        out.rates[m] = measure.interleaved(
            {WHOLE: lambda: one(1), SAME: lambda m=m: one(m), "pipeline": pipe},
            repeats,
            progress=f"m={m}",
        )
    return out


def bound_factors(sweep: Sweep, m: int, batch_size: int) -> dict[str, measure.Spread]:
    """The speedup over the same microbatches as a share of the bound, in three factors per
    round (each 1.0 when nothing is lost): ``(1 - bubble) / (1 - formula)``, one process's step
    over the stages' busy time, and the share of a step inside its recorded timeline. Their
    product is the speedup over the bound ``2 (1 - formula)`` for the recorded step."""
    formula = schedules.bubble_formula(2, m)
    idle, work, timeline = [], [], []
    for r, rate in zip(sweep.runs[m], sweep.rates[m][SAME].samples):
        events = r["events"]
        idle.append((1 - schedules.bubble_fraction(events, 2)) / (1 - formula))
        work.append((batch_size / rate) / busy_time(events))
        timeline.append(schedules.makespan(events) * r["samples_per_s"] / batch_size)
    together = [a * b * c for a, b, c in zip(idle, work, timeline)]
    return {
        "idle beyond the formula": measure.spread(idle),
        "extra work": measure.spread(work),
        "outside the timeline": measure.spread(timeline),
        "together": measure.spread(together),
    }


def split_unit_costs(
    pieces: list[nn.Module], X: torch.Tensor, y: torch.Tensor, repeats: int = 5
) -> list[tuple[float, float, float]]:
    """Per unit: (forward, whole backward, W) in seconds, each the median of ``repeats`` after a
    warm-up. W = the whole backward minus the input's gradient alone (the first unit's input
    needs no gradient: its backward is all W)."""
    runs = []
    for _ in range(repeats + 1):
        h, times = X, []
        for k, unit in enumerate(pieces):
            x = h.detach().requires_grad_(k > 0)
            start = time.perf_counter()
            out = unit(x)
            forward = time.perf_counter() - start
            last = k == len(pieces) - 1
            target, grad = (F.cross_entropy(out, y), None) if last else (out, torch.ones_like(out))
            start = time.perf_counter()
            inputs = ([x] if k > 0 else []) + list(unit.parameters())
            torch.autograd.grad(target, inputs, grad, retain_graph=True)  # the whole backward
            whole = time.perf_counter() - start
            b = 0.0  # the input's gradient alone: B (none for the first unit)
            if k > 0:
                start = time.perf_counter()
                torch.autograd.grad(target, x, grad)
                b = time.perf_counter() - start
            times.append((forward, whole, max(whole - b, 0.0)))
            h = out
        runs.append(times)
    return [
        tuple(statistics.median(r[k][j] for r in runs[1:]) for j in range(3))
        for k in range(len(pieces))
    ]


def stage_fbw(
    costs: list[tuple[float, float, float]], sizes: list[int]
) -> tuple[list[float], list[float], list[float]]:
    """Per stage: forward, whole backward and W, the sums of its units' (:func:`split_unit_costs`)."""
    f, b = stages.stage_costs([(f, b) for f, b, _ in costs], sizes)
    w, _ = stages.stage_costs([(w, 0.0) for _, _, w in costs], sizes)
    return f, b, w


def train_step_ms(model: nn.Module, X: torch.Tensor, y: torch.Tensor, num_steps: int) -> float:
    """Milliseconds per training step (forward, backward, SGD with lr 0: the weights stay), one
    thread, after one warm-up step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with loop.num_threads(1):
        loop.train_step(model, optimizer, X, y)  # warm-up
        start = time.perf_counter()
        for _ in range(num_steps):
            loop.train_step(model, optimizer, X, y)
    return 1e3 * (time.perf_counter() - start) / num_steps


BOUND = "the bound m·p/(m+p-1)"  # what cu.readout.against names a speedup's model
FORMULA = "the formula (p-1)/(m+p-1)"  # ... and a bubble's
