"""Lesson 06's panel: a pipeline simulated at every change of its controls, measured on Run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets

from course_utils import launch, plots
from course_utils.measure import spread
from course_utils.pipeline import config_error, measured, schedules
from course_utils.pipeline import stages as pipeline_stages
from course_utils.pipeline.engine import ENGINES
from course_utils.widgets.base import Panel


class PipelinePanel(Panel):
    """Choose stages, microbatches, schedule and engine. The simulated timeline (from unit costs
    measured in this process with the workers' thread count) redraws at every change; Run trains
    a few steps on real worker processes (:func:`course_utils.pipeline.measured.profile`) and draws
    the measured timeline and the speedup over one process beside it: the median of ``repeats``
    rounds (one process, then the pipeline), with a min-max bar. Its workers are CPU
    processes even on a GPU box, like the baseline and the simulated costs it is compared with
    (``python -m course_utils.train --parallel pipeline`` uses a GPU per stage)."""

    on_change = "redraw"

    def __init__(
        self,
        model: str = "cnn",
        batch_size: int = 64,
        num_steps: int = 4,
        microbatches: Sequence[int] = (1, 2, 4, 8, 16),
        baseline: float | None = None,
        launch: Callable[..., dict] | None = None,
        threads: int = 1,
        repeats: int = 2,
    ):
        self.model_name, self.batch_size, self.num_steps = model, batch_size, num_steps
        self.threads = threads  # per worker; the baseline is one process with as many
        self.baseline = baseline  # samples/s of one process; measured in each round if None
        self.repeats = repeats  # rounds per point (one process, then the pipeline, each round)
        self.launch = launch or self._launch  # (stages, microbatches, schedule, engine) -> dict
        self._costs: dict[int, list] = {}  # microbatch size -> unit (forward, backward) seconds
        controls = {
            "stages": widgets.IntSlider(
                value=2,
                min=1,
                max=pipeline_stages.max_stages(model),
                description="stages",
                continuous_update=False,
            ),
            "microbatches": widgets.Dropdown(
                options=list(microbatches),
                value=list(microbatches)[min(2, len(microbatches) - 1)],
                description="microbatches",
            ),
            "schedule": widgets.Dropdown(options=list(schedules.SCHEDULES), description="schedule"),
            "engine": widgets.Dropdown(options=list(ENGINES), value="torch", description="engine"),
        }
        super().__init__(controls, title=f"Pipeline of the {model}, batch {batch_size}")
        self._on_control()  # the simulation is there before any Run

    def simulated(self, stages: int, microbatches: int, schedule: str, **_) -> list:
        """The timeline a real run would take, on paper (unit costs measured once per
        microbatch size, stages planned from them as a real run plans them)."""
        mb = max(self.batch_size // microbatches, 1)
        if mb not in self._costs:
            self._costs[mb] = pipeline_stages.measured_unit_costs(self.model_name, mb, self.threads)
        return pipeline_stages.simulate_plan(self._costs[mb], schedule, stages, microbatches)

    def _launch(self, stages: int, microbatches: int, schedule: str, engine: str) -> dict:
        run = measured.Profile(
            model=self.model_name,
            microbatches=microbatches,
            schedule=schedule,
            engine=engine,
            batch_size=self.batch_size,
            num_steps=self.num_steps,
        )
        # CPU workers, like the baseline and the simulation they are compared with
        return launch.run(
            measured.profile, stages, run, threads=self.threads, timeout=300, device="cpu"
        )[0]

    def check(self, stages: int, microbatches: int, schedule: str, engine: str) -> str | None:
        if engine == "torch":  # the hand-written engine runs any setting; torch's refuses some
            return config_error(self.model_name, stages, self.batch_size, microbatches, schedule)
        if self.batch_size % microbatches:
            return f"{microbatches} microbatches do not divide the batch of {self.batch_size}"
        return None

    def compute(self, stages: int, microbatches: int, schedule: str, engine: str) -> dict:
        rates, speedups = [], []
        for round_ in range(self.repeats):
            base = self.baseline or measured.one_process_throughput(
                self.model_name, self.batch_size, self.threads, self.num_steps
            )
            result = self.launch(stages, microbatches, schedule, engine)
            rates.append(result["samples_per_s"])
            speedups.append(result["samples_per_s"] / base)  # paired: the same round
            point = {
                "samples_per_s": spread(rates).median,
                **spread(speedups).as_dict("speedup"),
                "bound": schedules.speedup_bound(stages, microbatches),
                "bubble": schedules.bubble_fraction(result["events"], stages),
                "events": result["events"],  # the last round's timeline
            }
            if round_ + 1 < self.repeats:
                self.progress(point, f"round {round_ + 1} of {self.repeats} measured...")
        return point

    def draw(self, results: list[dict]):
        settings = self.settings()
        same = [
            r
            for r in results
            if r["stages"] == settings["stages"] and r["engine"] == settings["engine"]
        ]
        return plots.pipeline_panel(self.simulated(**settings), self.current(), same, **settings)
