"""Lesson 03's panel: Amdahl's and Gustafson's laws for a parallel fraction p and 1..N workers."""

from __future__ import annotations

import ipywidgets as widgets

from course_utils import plots, scaling
from course_utils.widgets.base import Panel


class ScalingLawsPanel(Panel):
    """Both laws at one ``p``, redrawn as soon as a slider is released (no Run click needed);
    ``measured`` adds points ``{"label": (workers, speedup)}``, e.g. what a lesson measured."""

    button_label = "Redraw"
    on_change = "run"

    def __init__(
        self,
        p: float = 0.9,
        max_workers: int = 16,
        measured: dict[str, tuple[float, float]] | None = None,
        max_workers_limit: int = 128,
    ):
        self.measured = dict(measured or {})
        controls = {
            "p": widgets.FloatSlider(
                value=p,
                min=0.0,
                max=1.0,
                step=0.01,
                readout_format=".2f",
                description="parallel p",
                continuous_update=False,
            ),
            "max_workers": widgets.IntSlider(
                value=max_workers,
                min=1,
                max=max_workers_limit,
                description="workers N",
                continuous_update=False,
            ),
        }
        super().__init__(controls, title="Amdahl vs Gustafson: speedup on N workers")
        self._on_click()  # draw the starting setting

    def compute(self, p: float, max_workers: int) -> dict:
        laws = scaling.laws(p, max_workers)
        return {
            **laws,
            "amdahl_at_n": float(laws["amdahl"][-1]),
            "gustafson_at_n": float(laws["gustafson"][-1]),
        }

    def draw(self, results: list[dict]):
        return plots.scaling_law_curves(self.current(), measured=self.measured)
