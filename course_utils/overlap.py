"""Lesson 11's overlap experiment: the same CNN step in several versions (all-reduces after
backward, DDP with one bucket, DDP with small buckets), each profiled on every rank, and read step
by step.

- :func:`profile_steps`: a worker (for :func:`course_utils.launch.run`) that trains the CNN with a
  given step function and profiles a few of its steps (:class:`course_utils.profiling.Recorder`);
- :func:`step_rows`: one row per profiled step of a rank's trace: the step, its compute and
  communication, the share of the communication in the backward span and hidden behind
  backward's arithmetic (:func:`course_utils.profiling.hidden_share`);
- :func:`round_medians`, to pair versions measured in the same rounds, and :func:`overlap_table`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from course_utils import data, loop, models, profiling
from course_utils.measure import spread
from course_utils.readout import Reading, table

__all__ = ["overlap_table", "profile_steps", "round_medians", "step_rows"]


def _length(spans: Sequence[Sequence[float]]) -> float:
    return sum(end - start for start, end in spans)


def step_rows(events: Sequence[dict], num_steps: int, **tags) -> list[dict]:
    """One row per profiled step of one rank's trace: the step's length, its compute (the
    labelled phases) and its communication (ms), the share of that communication inside the
    ``backward`` span (``in_backward``) and behind backward's arithmetic (``hidden``), its number
    of ``gloo:all_reduce`` events, and the ``tags`` given (e.g. ``round=0, rank=1``)."""
    rows = []
    for step in range(1, num_steps + 1):
        one = profiling.step_events(events, step)
        step_span = next(e for e in one if e["name"].startswith("ProfilerStep#"))
        comm = profiling.intervals(one, lambda e: profiling.is_communication(e["name"]))
        backward = profiling.intervals(one, lambda e: profiling.is_phase(e, ("backward",)))
        compute = profiling.intervals(one, profiling.is_phase)
        comm_us = _length(comm)
        rows.append(
            {
                **tags,
                "step": step,
                "step_ms": step_span["dur"] / 1e3,
                "compute_ms": _length(compute) / 1e3,
                "comm_ms": comm_us / 1e3,
                "in_backward": profiling.common_us(comm, backward) / comm_us if comm_us else 0.0,
                "hidden": profiling.hidden_share(one),
                "all_reduces": sum(
                    e.get("ph") == "X" and e["name"] == "gloo:all_reduce" for e in one
                ),
            }
        )
    return rows


def round_medians(rows: Sequence[dict], key: str) -> list[float]:
    """The median of ``key`` over the rows of each round (rows tagged ``round``), in round
    order: one number per round, to pair with another version measured in the same rounds."""
    rounds = sorted({r["round"] for r in rows})
    return [statistics.median(r[key] for r in rows if r["round"] == k) for k in rounds]


def overlap_table(measured: dict[str, list[dict]]) -> Reading:
    """Lesson 11's versions of a step side by side, from their :func:`step_rows` (over ranks,
    steps and rounds): all-reduces per step, the step and its communication (median, lowest,
    highest, ms), and the median shares in the backward span and hidden."""

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    return table(
        ("version", "all-reduces", "step ms", "communication ms", "in backward", "hidden"),
        [
            (
                name,
                f"{med(rows, 'all_reduces'):.0f}",
                spread(r["step_ms"] for r in rows),
                spread(r["comm_ms"] for r in rows),
                f"{med(rows, 'in_backward'):.0%}",
                f"{med(rows, 'hidden'):.0%}",
            )
            for name, rows in measured.items()
        ],
    )


def profile_steps(
    folder: str | Path,
    step_fn: Callable | str,
    bucket_cap_mb: float | None = None,
    num_steps: int = 3,
    batch_size: int = 64,
    warmup_steps: int = 2,
) -> str:
    """A worker (for :func:`course_utils.launch.run`): train the CNN on this rank's slices with
    ``step_fn(model, optimizer, X, y)`` (``"ddp"``: ``DistributedDataParallel``'s step, buckets
    of ``bucket_cap_mb``), profile ``num_steps`` steps after ``warmup_steps``; the trace's path."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    X, y = data.mnist("train", limit=batch_size * (num_steps + warmup_steps))
    model = models.build("cnn", seed=0)
    optimizer = models.make_optimizer(model, lr=0.01)
    trained = model
    if step_fn == "ddp":  # the course's step: labels forward, backward (DDP's all-reduces), ...
        trained = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
        step_fn = loop.train_step
    batches = iter(data.batches(X, y, batch_size, num_steps + warmup_steps, 0, rank, world_size))
    for _ in range(warmup_steps):  # not profiled: the first allocations, DDP's bucket rebuild
        step_fn(trained, optimizer, *next(batches))
    with profiling.Recorder(folder, rank, num_steps, active=num_steps, memory=False) as recorder:
        for X_shard, y_shard in batches:  # (batch_size / world_size, 1, 28, 28) each
            step_fn(trained, optimizer, X_shard, y_shard)
            recorder.step()
    return str(recorder.path)
