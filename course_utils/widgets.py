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
        self.title = title
        for control in controls.values():  # long descriptions ("microbatches") stay readable
            control.style.description_width = "initial"
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


class ScalingLawsPanel(Panel):
    """Lesson 03: Amdahl's and Gustafson's laws for a parallel fraction ``p`` and 1..N workers.

    Redraws as soon as a slider is released (no Run click needed); ``measured`` adds points
    ``{"label": (workers, speedup)}``, e.g. the speedups a lesson measured."""

    button_label = "Redraw"

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
        for control in controls.values():
            control.observe(self._on_change, names="value")
        self._on_click()  # draw the starting setting

    def _on_change(self, _change=None) -> None:
        self._on_click()  # the same path as the button: errors are shown in the panel

    def compute(self, p: float, max_workers: int) -> dict:
        from course_utils import scaling

        laws = scaling.laws(p, max_workers)
        return {
            **laws,
            "amdahl_at_n": float(laws["amdahl"][-1]),
            "gustafson_at_n": float(laws["gustafson"][-1]),
        }

    def current(self) -> dict:
        """The result for the controls' current values (computed by the last run)."""
        return self.cache[tuple(sorted(self.settings().items()))]

    def draw(self, results: list[dict]):
        return plots.scaling_law_curves(self.current(), measured=self.measured)


class PipelinePanel(Panel):
    """Lesson 06: choose stages, microbatches, schedule and engine. The simulated timeline (from
    stage costs measured in this process, one thread) redraws at every change; Run trains a few
    steps on real worker processes (:func:`course_utils.launch.run`) and draws the measured
    timeline and the speedup over one process beside it. Runs are cached per setting. Its
    workers are CPU processes even on a GPU box, like the baseline and the simulated costs it is
    compared with (``python -m course_utils.train --parallel pipeline`` uses a GPU per stage)."""

    def __init__(
        self,
        model: str = "cnn",
        batch_size: int = 64,
        num_steps: int = 4,
        microbatches: Sequence[int] = (1, 2, 4, 8, 16),
        baseline: float | None = None,
        launch: Callable[..., dict] | None = None,
        threads: int = 1,
    ):
        from course_utils import pipeline

        self.model_name, self.batch_size, self.num_steps = model, batch_size, num_steps
        self.threads = threads  # per worker; the baseline is one process with as many
        self.baseline = baseline  # samples/s of one process; measured at the first Run if None
        self.launch = launch or self._launch  # (settings...) -> profile_worker's result
        self._costs: dict[tuple, list] = {}  # (microbatch size, split) -> unit (fwd, bwd) s
        controls = {
            "stages": widgets.IntSlider(
                value=2,
                min=1,
                max=pipeline.max_stages(model),
                description="stages",
                continuous_update=False,
            ),
            "microbatches": widgets.Dropdown(
                options=list(microbatches),
                value=list(microbatches)[min(2, len(microbatches) - 1)],
                description="microbatches",
            ),
            "schedule": widgets.Dropdown(options=list(pipeline.SCHEDULES), description="schedule"),
            "engine": widgets.Dropdown(
                options=list(pipeline.ENGINES), value="torch", description="engine"
            ),
        }
        super().__init__(controls, title=f"Pipeline of the {model}, batch {batch_size}")
        for control in controls.values():
            control.observe(self._on_change, names="value")
        self._redraw()  # the simulation is there before any Run

    def simulated(self, stages: int, microbatches: int, schedule: str, **_) -> list:
        """PipelinePanel's simulated timeline, with the stages planned as a real run plans them
        (:func:`course_utils.pipeline.plan`: units per stage and where to split the CNN's conv2),
        from unit costs measured in this process at the microbatch size."""
        from course_utils import data, models, pipeline

        mb = max(self.batch_size // microbatches, 1)
        X, y = data.mnist("train", limit=mb)
        X = models.prepare_input(self.model_name, X)

        def costs(split):  # per-unit (forward, backward) seconds, measured once per setting
            key = (mb, split)
            if key not in self._costs:
                pieces = pipeline.units(
                    self.model_name, models.build(self.model_name, seed=0), split
                )
                with loop.num_threads(self.threads):
                    self._costs[key] = pipeline.unit_costs(pieces, X, y, repeats=2)
            return self._costs[key]

        sizes, split = pipeline.plan(self.model_name, costs(None), stages)
        forward, backward = pipeline.stage_costs(costs(split), sizes)
        return pipeline.simulate(schedule, stages, microbatches, forward, backward)

    def _launch(self, stages: int, microbatches: int, schedule: str, engine: str) -> dict:
        from course_utils import launch, pipeline

        return launch.run(
            pipeline.profile_worker,
            stages,
            self.model_name,
            microbatches,
            schedule,
            engine,
            self.batch_size,
            self.num_steps,
            threads=self.threads,
            timeout=300,
            use_gpu=False,  # CPU workers, like the baseline and the simulation
        )[0]

    def compute(self, stages: int, microbatches: int, schedule: str, engine: str) -> dict:
        from course_utils import data, models, pipeline

        if engine == "torch":  # the hand-written engine runs any setting; torch checks some
            error = pipeline.config_error(
                self.model_name, stages, self.batch_size, microbatches, schedule
            )
            if error:
                raise ValueError(error)
        elif self.batch_size % microbatches:
            raise ValueError(f"{microbatches} microbatches do not divide batch {self.batch_size}")
        if self.baseline is None:
            X, y = data.mnist("train")
            self.baseline = loop.measure_throughput(
                models.build(self.model_name, seed=0),
                models.prepare_input(self.model_name, X),
                y,
                self.batch_size,
                threads=self.threads,
                num_steps=self.num_steps,
            )
        result = self.launch(stages, microbatches, schedule, engine)
        return {
            "samples_per_s": result["samples_per_s"],
            "speedup": result["samples_per_s"] / self.baseline,
            "bound": pipeline.speedup_bound(stages, microbatches),
            "bubble": pipeline.bubble_fraction(result["events"], stages),
            "events": result["events"],
        }

    def draw(self, results: list[dict]):
        from course_utils import pipeline

        settings = self.settings()
        current = self.cache.get(tuple(sorted(settings.items())))
        p, m = settings["stages"], settings["microbatches"]
        fig, axes = plt.subplots(
            1, 3, figsize=(16, 3.4), gridspec_kw={"width_ratios": [1.3, 1.3, 1]}
        )
        sim = self.simulated(**settings)
        plots.gantt(
            sim,
            num_stages=p,
            ax=axes[0],
            title=f"simulated: {settings['schedule']}, p={p}, m={m}, "
            f"bubble {pipeline.bubble_fraction(sim, p):.0%}",
        )
        if current is not None:
            plots.gantt(
                current["events"],
                num_stages=p,
                ax=axes[1],
                title=f"measured ({settings['engine']}): bubble {current['bubble']:.0%}",
            )
        else:
            axes[1].text(0.5, 0.5, "press Run to measure this setting", ha="center", va="center")
            axes[1].set_axis_off()
        same = [r for r in results if r["stages"] == p and r["engine"] == settings["engine"]]
        if same:
            plots.measurements(
                same,
                x="microbatches",
                y="speedup",
                by="schedule",
                ax=axes[2],
                ylabel="speedup over 1 process",
                title=f"p = {p}, measured",
            )
            ms = sorted({r["microbatches"] for r in same})
            bounds = [pipeline.speedup_bound(p, k) for k in ms]
            axes[2].plot(ms, bounds, "k--", label="bound")
            axes[2].set_ylim(0, 1.1 * max(bounds + [r["speedup"] for r in same]))
            axes[2].legend(fontsize=8)
        else:
            axes[2].set_axis_off()
        fig.tight_layout()
        return fig

    def _on_change(self, _change=None) -> None:
        try:
            self._redraw()
            self.status.value = "simulated" if self.figure is not None else ""
        except Exception as error:  # show it in the panel, as a Run error would be
            self.last_error = traceback.format_exc()
            self.status.value = f"<span style='color:red'>error: {error}</span>"


class SpeedupPanel(Panel):
    """Lesson 05: choose a model, a number of DDP workers and a global batch; Run trains a few
    steps with ``cu.train.run`` (``--parallel ddp``, one thread per worker) and adds the measured
    speedup over one worker (same model and batch, measured once and cached) to a speedup and
    efficiency plot beside the ideal line. Runs are cached per setting, so a replay is instant.

    Every point runs on the same kind of worker: GPUs (NCCL) only when there is one for each
    worker of the largest world size offered, CPU processes (gloo) otherwise. (The launcher's
    own default, a GPU per worker when there are enough, would put 1 worker on a lone GPU and 2
    on the CPU: a "speedup" of CPUs over a GPU.) ``use_gpu`` overrides the choice."""

    def __init__(
        self,
        models: Sequence[str] = ("cnn", "rnn"),
        world_sizes: Sequence[int] = (1, 2, 3, 4),
        batch_sizes: Sequence[int] = (48, 96, 192, 384),
        num_steps: int = 10,
        threads: int = 1,
        train: Callable[..., dict] | None = None,
        use_gpu: bool | None = None,
    ):
        self.num_steps, self.threads = num_steps, threads  # threads per worker, baseline too
        if use_gpu is None:
            use_gpu = hardware.num_gpus() >= max(world_sizes)
        self.use_gpu = use_gpu
        self.train = train or self._train  # RunConfig -> the results dict of the CLI contract
        self.baselines: dict[tuple, float] = {}  # (model, batch_size) -> samples/s of 1 worker
        controls = {
            "model": widgets.Dropdown(options=list(models), description="model"),
            "nproc": widgets.Dropdown(
                options=list(world_sizes), value=min(2, max(world_sizes)), description="workers"
            ),
            "batch_size": widgets.Dropdown(
                options=list(batch_sizes),
                value=list(batch_sizes)[1 % len(batch_sizes)],
                description="global batch",
            ),
        }
        if use_gpu:
            where = f"one GPU per worker, {hardware.num_gpus()} GPUs"
        else:
            where = f"CPU workers, {hardware.num_cores()} cores on this machine"
        super().__init__(controls, title=f"Data-parallel speedup ({where})")

    def _train(self, cfg) -> dict:
        from course_utils import train

        return train.run(cfg, progress=False, timeout=600, use_gpu=self.use_gpu)

    def _config(self, model: str, nproc: int, batch_size: int):
        from course_utils.train import RunConfig

        return RunConfig(
            model=model,
            parallel="ddp",
            nproc=nproc,
            batch_size=batch_size,
            steps=self.num_steps,
            threads=self.threads,
        )

    def compute(self, model: str, nproc: int, batch_size: int) -> dict:
        from course_utils import train

        cfg = self._config(model, nproc, batch_size)
        train.validate(cfg)  # a batch that does not divide: a clear error, before any worker
        key = (model, batch_size)
        if key not in self.baselines:  # one worker, measured once: every speedup's reference
            self.baselines[key] = self.train(self._config(model, 1, batch_size))["samples_per_s"]
        samples_per_s = self.baselines[key] if nproc == 1 else self.train(cfg)["samples_per_s"]
        speedup = samples_per_s / self.baselines[key]
        return {
            "samples_per_s": samples_per_s,
            "baseline_samples_per_s": self.baselines[key],
            "speedup": speedup,
            "efficiency": speedup / nproc,
            "oversubscribed": nproc > self._devices(),
            "label": f"{model}, batch {batch_size}",
        }

    def _devices(self) -> int:
        """How many workers run side by side without sharing a GPU or a core."""
        if self.use_gpu:
            return hardware.num_gpus()
        return max(hardware.num_cores() // self.threads, 1)

    def draw(self, results: list[dict]):
        threads = f"{self.threads} thread" + ("s" if self.threads > 1 else "")
        per_worker = "one GPU" if self.use_gpu else threads
        return plots.speedup(
            results,
            by="label",
            cores=self._devices(),
            title=f"measured DDP speedup ({per_worker} per worker)",
        )
