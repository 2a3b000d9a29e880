"""Interactive panels for the lessons: a few controls, a Run button, and an output area.

Each panel is thin: its button calls a plain function (the measurement a lesson has already
taught, e.g. :func:`course_utils.loop.measure_throughput`) and a plot from :mod:`course_utils.plots`.
Tests drive a panel without a browser: set ``panel.controls[...].value``, call
``panel.run_button.click()``, and read ``panel.results``.

A new lesson adds a panel by subclassing :class:`Panel` and writing ``compute`` (settings → one
result) and ``draw`` (all results → a figure).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from IPython.display import display

from course_utils import hardware, loop, plots


class Panel:
    """Controls + a Run button + an output area; results cached per setting.

    Subclasses set ``self.controls`` (name → widget, the names are the keyword arguments of
    ``compute``) and implement ``compute(**settings) -> dict`` and ``draw(results) -> Figure``.
    """

    button_label = "Run"

    def __init__(self, controls: dict[str, widgets.ValueWidget], title: str = ""):
        self.controls = controls
        self.results: list[dict] = []  # one dict per distinct setting, in the order measured
        self.cache: dict[tuple, dict] = {}  # setting → its result, so a repeat click is instant
        self.last_error: str | None = None  # the traceback of the last failed run, if any
        self.figure = None  # the last figure drawn
        self.run_button = widgets.Button(description=self.button_label, button_style="primary")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.run_button.on_click(self._on_click)
        header = [widgets.HTML(f"<b>{title}</b>")] if title else []
        self.widget = widgets.VBox(
            [*header, *controls.values(), widgets.HBox([self.run_button, self.status]), self.output]
        )

    def settings(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def compute(self, **settings) -> dict:
        raise NotImplementedError

    def draw(self, results: list[dict]):
        raise NotImplementedError

    def run(self) -> dict:
        """Measure the current setting (or take it from the cache), record it and redraw."""
        settings = self.settings()
        key = tuple(sorted(settings.items()))
        cached = key in self.cache
        if not cached:
            self.cache[key] = {**settings, **self.compute(**settings)}
            self.results.append(self.cache[key])
        self.status.value = "cached" if cached else "measured"
        self._redraw()
        return self.cache[key]

    def _redraw(self) -> None:
        if self.figure is not None:
            plt.close(self.figure)
        self.figure = self.draw(self.results)
        self.output.clear_output(wait=True)
        with self.output:
            display(self.figure)
        plt.close(self.figure)  # shown once, in the panel; not again by the notebook's backend

    def _on_click(self, _button=None) -> None:
        # An exception in a widget callback would only reach the kernel log: show it in the panel.
        self.run_button.disabled = True
        self.status.value = "running..."
        try:
            self.run()
            self.last_error = None
        except Exception as error:
            self.last_error = traceback.format_exc()
            self.status.value = f"<span style='color:red'>error: {error}</span>"
            with self.output:
                print(self.last_error)
        finally:
            self.run_button.disabled = False

    def _ipython_display_(self) -> None:
        display(self.widget)


class ThroughputPanel(Panel):
    """Lesson 01: training samples/s of a model at a chosen batch size and torch thread count."""

    button_label = "Measure"

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        batch_sizes: Sequence[int] = (16, 32, 64, 128, 256),
        num_steps: int = 10,
        measure: Callable[..., float] = loop.measure_throughput,
    ):
        self.model, self.X, self.y = model, X, y
        self.num_steps = num_steps
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
        samples_per_s = self.measure(
            self.model, self.X, self.y, batch_size, threads=threads, num_steps=self.num_steps
        )
        return {"samples_per_s": float(samples_per_s)}

    def draw(self, results: list[dict]):
        return plots.measurements(
            results, x="batch_size", y="samples_per_s", by="threads", xlabel="batch size"
        )
