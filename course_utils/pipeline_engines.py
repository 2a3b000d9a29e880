"""The two engines that run one pipeline stage's share of a training step (lesson 06).

- :func:`hand_step`, written with ``dist.send``/``dist.recv``: runs the stage's forwards and
  backwards in any order a schedule gives it (:mod:`course_utils.pipeline_schedules`), dividing
  each microbatch's loss by ``m`` so that the accumulated gradients are the batch mean's.
- :class:`TorchPipeline`: ``torch.distributed.pipelining``'s ``PipelineStage`` with
  ``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``. It back-propagates the
  unscaled microbatch means and then divides the gradients by ``m`` (``scale_grads=True``): the
  same gradients.

Both record, when given a list, an :class:`Event` (start and end, ``time.perf_counter``: one
clock for every process of a machine) per forward and backward of each microbatch. They run
inside a worker whose default process group is initialised.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_utils.pipeline_schedules import Event


def hand_step(
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
            outputs.pop(i).backward(grad)  # frees this microbatch's activations
            if events is not None:
                events.append(Event(rank, "B", i, start, time.perf_counter()))
            x = inputs.pop(i)
            if not first:
                pending.append((dist.isend(x.grad, dst=rank - 1, tag=i), x.grad))
    for work, _ in pending:
        work.wait()
    return loss_sum, correct


class TorchPipeline:
    """This rank's ``PipelineStage`` (or stages, for the interleaved schedule) and its schedule
    from ``torch.distributed.pipelining``; records Events (one row per rank) when asked."""

    def __init__(
        self,
        stages: list[nn.Module],
        indices: list[int],
        num_stages: int,
        schedule: str,
        num_microbatches: int,
        device,
    ):
        from torch.distributed import pipelining

        self.stages = [
            pipelining.PipelineStage(module, i, num_stages, device)
            for module, i in zip(stages, indices)
        ]
        kind = {
            "gpipe": pipelining.ScheduleGPipe,
            "1f1b": pipelining.Schedule1F1B,
            "interleaved1f1b": pipelining.ScheduleInterleaved1F1B,
        }[schedule]
        # loss_fn: mean over each microbatch; scale_grads=True then divides the summed
        # gradients by num_microbatches: the gradient of the batch mean.
        self.schedule = kind(
            self.stages if schedule == "interleaved1f1b" else self.stages[0],
            n_microbatches=num_microbatches,
            loss_fn=F.cross_entropy,
        )
        self.first = any(stage.is_first for stage in self.stages)
        self.last = any(stage.is_last for stage in self.stages)
        self.events: list[Event] | None = None
        for stage in self.stages:
            self._time(stage, dist.get_rank())

    def _time(self, stage, rank: int) -> None:
        """Wrap the stage's per-microbatch forward/backward to record Events when asked."""

        def timed(kind, fn):
            def wrapper(i, *args, **kwargs):
                start = time.perf_counter()
                out = fn(i, *args, **kwargs)
                if self.events is not None:
                    self.events.append(Event(rank, kind, i, start, time.perf_counter()))
                return out

            return wrapper

        stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
        stage.backward_one_chunk = timed("B", stage.backward_one_chunk)

    def step(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch through the pipeline (no optimizer step); mean loss and correct count."""
        first, last = self.first, self.last
        losses: list[torch.Tensor] = []
        out = self.schedule.step(
            *((X,) if first else ()),
            target=y if last else None,
            losses=losses if last else None,
        )
        if not last:
            return X.new_zeros(()), torch.zeros((), dtype=torch.long, device=X.device)
        loss = torch.stack(losses).mean().detach()  # mean of microbatch means = batch mean
        return loss, (out.argmax(dim=1) == y).sum()
