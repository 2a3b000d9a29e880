"""Lesson 05's panel: the measured speedup of data parallel training over one worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets

from course_utils import config, hardware, measure, plots, train
from course_utils.widgets.base import Panel


class SpeedupPanel(Panel):
    """Choose a model, a number of DDP workers and a global batch; Run trains a few steps with
    :func:`course_utils.train.run` (``--parallel ddp``, one thread per worker) and adds the
    measured speedup over one worker (same model and batch) to a speedup and efficiency plot
    beside the ideal line. Each point is the median of ``repeats`` rounds, each round one worker
    then N workers (so that a burst of load elsewhere hits both): a min-max bar, and a hollow
    marker when the rounds disagree by more than 20%. The first round's point is drawn at once.

    Every point runs on the same kind of worker: GPUs (NCCL) only when there is one for each
    worker of the largest world size offered, CPU processes (gloo) otherwise. (The launcher's
    ``device="auto"`` decides per launch, and would put 1 worker on a lone GPU and 2 on the CPU: a
    "speedup" of CPUs over a GPU.) ``device`` overrides the choice."""

    def __init__(
        self,
        models: Sequence[str] = ("cnn", "rnn"),
        world_sizes: Sequence[int] = (1, 2, 3, 4),
        batch_sizes: Sequence[int] = (48, 96, 192, 384),
        num_steps: int = 10,
        threads: int = 1,
        train: Callable[..., dict] | None = None,
        device: str = "auto",
        repeats: int = 3,
    ):
        self.num_steps, self.threads = num_steps, threads  # threads per worker, baseline too
        self.repeats = repeats  # rounds per point: a median, and a min-max bar
        self.device = hardware.device_kind(device, max(world_sizes))
        self.train = train or self._train  # RunConfig -> the results dict of the CLI contract
        self.baselines: dict[tuple, list] = {}  # (model, batch_size) -> 1 worker's samples/s
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
        if self.device == "cuda":
            where = f"one GPU per worker, {hardware.num_gpus()} GPUs"
        else:
            where = f"CPU workers, {hardware.num_cores()} cores on this machine"
        super().__init__(controls, title=f"Data-parallel speedup ({where})")

    @staticmethod
    def _train(cfg: config.RunConfig) -> dict:
        return train.run(cfg, progress=False, timeout=600)

    def _config(self, model: str, nproc: int, batch_size: int) -> config.RunConfig:
        return config.RunConfig(
            model=model,
            parallel="ddp",
            nproc=nproc,
            batch_size=batch_size,
            steps=self.num_steps,
            threads=self.threads,
            device=self.device,
        )

    def check(self, model: str, nproc: int, batch_size: int) -> str | None:
        try:  # e.g. a batch that does not divide: said before any worker starts
            config.validate(self._config(model, nproc, batch_size))
        except config.UsageError as error:
            return str(error)
        return None

    def compute(self, model: str, nproc: int, batch_size: int) -> dict:
        baseline = self.baselines.setdefault((model, batch_size), [])  # every round's 1 worker
        rates, speedups = [], []
        for round_ in range(self.repeats):
            one = self.train(self._config(model, 1, batch_size))["samples_per_s"]
            baseline.append(one)
            if nproc == 1:
                rate = one
            else:
                rate = self.train(self._config(model, nproc, batch_size))["samples_per_s"]
            rates.append(rate)
            speedups.append(rate / one)  # paired: the same round, the same load elsewhere
            point = self._point(model, nproc, batch_size, rates, speedups, baseline)
            if round_ + 1 < self.repeats:
                self.progress(point, f"round {round_ + 1} of {self.repeats} measured...")
        return point

    def _point(self, model, nproc, batch_size, rates, speedups, baseline) -> dict:
        speedup = measure.spread(speedups)
        return {
            "samples_per_s": measure.spread(rates).median,
            "baseline_samples_per_s": measure.spread(baseline).median,
            **speedup.as_dict("speedup"),
            "speedup_rounds": speedup.samples,  # every round's speedup, for cu.readout.ratio
            "efficiency": speedup.median / nproc,
            "oversubscribed": nproc > self._devices(),
            "label": f"{model}, batch {batch_size}",
        }

    def _devices(self) -> int:
        """How many workers run side by side without sharing a GPU or a core."""
        if self.device == "cuda":
            return hardware.num_gpus()
        return max(hardware.num_cores() // self.threads, 1)

    def draw(self, results: list[dict]):
        threads = f"{self.threads} thread" + ("s" if self.threads > 1 else "")
        per_worker = "one GPU" if self.device == "cuda" else threads
        return plots.speedup(
            results,
            by="label",
            cores=self._devices(),
            title=f"measured DDP speedup ({per_worker} per worker)",
        )
