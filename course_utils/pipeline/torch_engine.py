"""``torch.distributed.pipelining`` as the course's second pipeline engine (lesson 06).

:class:`TorchPipeline` holds this rank's ``PipelineStage`` (or stages, for the interleaved and
V schedules) and its ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``,
``ScheduleZBVZeroBubble`` or ``ScheduleDualPipeV``. It
back-propagates the unscaled microbatch means and then divides the gradients by ``m``
(``scale_grads=True``): the same gradients as the hand-written engine
(:mod:`course_utils.pipeline.hand`). When given a list, it records an :class:`Event` per forward
and backward of each microbatch.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from course_utils.pipeline.schedules import Event


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
            "zbv": pipelining.ScheduleZBVZeroBubble,  # backward split: inputs' grads, then W's
            "dualpipev": pipelining.ScheduleDualPipeV,
        }[schedule]
        # loss_fn: mean over each microbatch; scale_grads=True then divides the summed
        # gradients by num_microbatches: the gradient of the batch mean.
        self.schedule = kind(
            self.stages if len(self.stages) > 1 else self.stages[0],
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
            name = {"F": "forward", "B": "backward", "W": "backward"}[kind]

            def wrapper(i, *args, **kwargs):
                start = time.perf_counter()
                with record_function(name):  # a named span in a profiler's trace
                    out = fn(i, *args, **kwargs)
                if self.events is not None:
                    self.events.append(Event(rank, kind, i, start, time.perf_counter()))
                return out

            return wrapper

        stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
        stage.backward_one_chunk = timed("B", stage.backward_one_chunk)
        # zero-bubble schedules: B computes the inputs' gradients only, W the weights' later
        stage.backward_weight_one_chunk = timed("W", stage.backward_weight_one_chunk)

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
