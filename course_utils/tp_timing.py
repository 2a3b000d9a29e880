"""Measuring tensor parallelism (lesson 09): training steps of the transformer split by hand, with
DTensor, or whole; a width x batch sweep of them measured in turns; the speedup points the lesson's
figure draws; and the bytes of activations autograd keeps for the backward pass.

- :func:`timed_steps`: in a worker, per step: seconds, and the hand-written all-reduces' calls,
  bytes and seconds (:data:`course_utils.tensor_parallel.COMM`);
- :func:`sweep`: every (how, width, batch) launched ``repeats`` times, in turns
  (:func:`course_utils.measure.interleaved`), each worker pinned to a core of its own;
- :func:`speedup_points`: one process's step time over the split one's, paired round by round,
  and the communication share, as points for :func:`course_utils.plots.tp_speedups`;
- :func:`saved_activation_bytes`: what one forward pass leaves for the backward, weights excluded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from course_utils import data, launch, loop, measure, models
from course_utils import tensor_parallel as tp

HOWS = ("one process", "by hand", "DTensor")  # whole, split by hand, split by DTensor's plan


def timed_steps(how: str, width: int, batch: int, steps: int, seed: int = 0) -> list[dict]:
    """In a worker: one untimed warm-up step, then ``steps`` SGD steps of the transformer of this
    width (4 heads, MLP width 4 x width), ``how`` in :data:`HOWS`: per step, ``step_s`` and the
    increase of :data:`course_utils.tensor_parallel.COMM` (``calls``, ``bytes``, ``comm_s``)."""
    torch.manual_seed(seed)
    model = models.Transformer(dim=width, heads=4, hidden=4 * width)
    if how == "by hand":
        tp.parallelize_by_hand(model)
    elif how == "DTensor":
        from torch.distributed.device_mesh import init_device_mesh

        tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    elif how != "one process":
        raise ValueError(f"how must be one of {HOWS}, got {how!r}")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    X, y = data.mnist("train", limit=batch)
    record = []
    for step in range(steps + 1):
        before = dict(tp.COMM)
        start = time.perf_counter()
        loop.train_step(model, optimizer, X, y)
        step_s = time.perf_counter() - start
        if step:  # the first step warms up (allocations, gloo's buffers): not timed
            record.append(
                {
                    "step_s": step_s,
                    "comm_s": tp.COMM["seconds"] - before["seconds"],
                    "calls": tp.COMM["calls"] - before["calls"],
                    "bytes": tp.COMM["bytes"] - before["bytes"],
                }
            )
    return record


def sweep(
    widths: Sequence[int],
    batch_sizes: Sequence[int],
    steps: int,
    repeats: int,
    hows: Sequence[str] = HOWS,
    progress: str | None = None,
    launcher: Callable = launch.run,
) -> tuple[dict, dict]:
    """Every (how, width, batch) launched ``repeats`` times, all in turns, 1 thread per worker,
    pinned: ``step_times[how, width, batch]``, a Spread of each launch's median step (seconds),
    and ``records[how, width, batch]``, each launch's :func:`timed_steps` record (rank 0's)."""
    records: dict[tuple, list] = {}

    def measure_one(how: str, width: int, batch: int) -> float:
        nproc = 1 if how == "one process" else 2
        record = launcher(
            timed_steps, nproc, how, width, batch, steps, threads=1, device="cpu", pin=True
        )[0]
        records.setdefault((how, width, batch), []).append(record)
        return statistics.median(s["step_s"] for s in record)

    settings = [(how, w, b) for w in widths for b in batch_sizes for how in hows]
    measures = {key: (lambda key=key: measure_one(*key)) for key in settings}
    step_times = measure.interleaved(measures, repeats, progress=progress)
    return step_times, records


def speedup_points(step_times: dict, records: dict) -> list[dict]:
    """Per width, batch and split (not "one process"): the speedup, one process's step time over
    the split one's paired launch by launch, and for "by hand" the share (%) of a step in its
    all-reduces (each launch's median), as :meth:`Spread.as_dict` fields."""
    points = []
    for how, width, batch in step_times:
        if how == "one process":
            continue
        one = step_times["one process", width, batch]
        point = {"width": width, "batch": batch, "layers": how}
        point |= measure.ratios(one, step_times[how, width, batch]).as_dict("speedup")
        if how == "by hand":
            shares = (
                100 * statistics.median(s["comm_s"] / s["step_s"] for s in record)
                for record in records[how, width, batch]
            )
            point |= measure.spread(shares).as_dict("comm_share")
        points.append(point)
    return points


def saved_activation_bytes(model: nn.Module, X: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward in one forward pass of ``model`` on ``X`` (this
    rank's, each storage once), the model's parameters excluded."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    weights = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = local(t).untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(X)
    return sum(storages.values())
