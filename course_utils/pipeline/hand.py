"""The hand-written pipeline engine (lesson 06): one stage's share of a training step, with
``dist.send``/``dist.recv`` between neighbouring stages, in any order a schedule gives it
(:mod:`course_utils.pipeline.schedules`).

Each microbatch's loss is divided by ``m`` before its backward, so that the gradients accumulated
in ``.grad`` are the batch mean's. When given a list, it records an :class:`Event` (start and end,
``time.perf_counter``: one clock for every process of a machine) per forward and backward. It runs
inside a worker whose default process group is initialised.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from course_utils.pipeline.schedules import Event


def step(
    stage: nn.Module,
    order: list[tuple[str, int]],
    X: torch.Tensor,
    y: torch.Tensor,
    num_microbatches: int,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    events: list[Event] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of every microbatch of ``(X, y)`` through this rank's ``stage``, in
    ``order``, with send/recv between neighbouring stages; gradients accumulate in ``.grad``.
    ``in_shape``/``out_shape``: one sample's input/output of the stage. Returns the batch's mean
    loss and correct count (on the last stage; zeros elsewhere). Appends to ``events``."""
    rank, num_stages = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == num_stages - 1
    mb = len(y) // num_microbatches  # microbatch size
    xs, ys = X.chunk(num_microbatches), y.chunk(num_microbatches)  # only first/last use them
    inputs, outputs, pending = {}, {}, []  # pending: (work, tensor) of unfinished sends
    loss_sum = torch.zeros((), device=X.device)
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    for kind, i in order:
        if kind == "F":
            if first:
                x = xs[i]
            else:
                x = torch.empty(mb, *in_shape, device=X.device)
                dist.recv(x, src=rank - 1, tag=i)  # the previous stage's activation
                x.requires_grad_()
            start = time.perf_counter()
            with record_function("forward"):
                out = stage(x)  # (mb, *out_shape)
                if last:
                    correct += (out.argmax(dim=1) == ys[i]).sum()
                    out = F.cross_entropy(out, ys[i]) / num_microbatches  # its share of the mean
                    loss_sum += out.detach()
            if events is not None:
                events.append(Event(rank, "F", i, start, time.perf_counter()))
            if not last:
                act = out.detach()
                pending.append((dist.isend(act, dst=rank + 1, tag=i), act))
            inputs[i], outputs[i] = x, out  # keep the graph until this microbatch's backward
        else:
            grad = None
            if not last:
                grad = torch.empty(mb, *out_shape, device=X.device)
                dist.recv(grad, src=rank + 1, tag=i)  # d loss / d (our output)
            start = time.perf_counter()
            with record_function("backward"):
                outputs.pop(i).backward(grad)  # frees this microbatch's activations
            if events is not None:
                events.append(Event(rank, "B", i, start, time.perf_counter()))
            x = inputs.pop(i)
            if not first:
                pending.append((dist.isend(x.grad, dst=rank - 1, tag=i), x.grad))
    for work, _ in pending:
        work.wait()
    return loss_sum, correct
