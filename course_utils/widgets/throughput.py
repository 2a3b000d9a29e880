"""Lesson 01's panel: training samples/s at a chosen batch size and torch thread count."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets
import torch
import torch.nn as nn

from course_utils import hardware, plots
from course_utils.measure import spread, throughput
from course_utils.widgets.base import Panel


class ThroughputPanel(Panel):
    """Training samples/s of a model at a chosen batch size and torch thread count: the median of
    ``repeats`` measurements, with their min-max bar (hollow when they disagree by over 20%)."""

    button_label = "Measure"

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        batch_sizes: Sequence[int] = (16, 32, 64, 128, 256),
        num_steps: int = 10,
        measure: Callable[..., float] = throughput,
        repeats: int = 3,
    ):
        self.model, self.X, self.y = model, X, y
        self.num_steps, self.repeats = num_steps, repeats
        self.measure = measure  # (model, X, y, batch_size, threads, num_steps) -> samples/s
        cores = hardware.num_cores()
        controls = {
            "batch_size": widgets.Dropdown(
                options=list(batch_sizes), value=list(batch_sizes)[0], description="batch size"
            ),
            "threads": widgets.IntSlider(
                value=cores, min=1, max=cores, description="threads", continuous_update=False
            ),
        }
        super().__init__(controls, title=f"Training throughput ({cores} cores on this machine)")

    def compute(self, batch_size: int, threads: int) -> dict:
        rates = [
            self.measure(
                self.model, self.X, self.y, batch_size, threads=threads, num_steps=self.num_steps
            )
            for _ in range(self.repeats)
        ]
        return spread(rates).as_dict("samples_per_s")

    def draw(self, results: list[dict]):
        return plots.measurements(
            results, x="batch_size", y="samples_per_s", by="threads", xlabel="batch size"
        )
