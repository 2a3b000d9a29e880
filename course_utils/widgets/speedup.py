"""Lesson 05's panel: the measured speedup of data parallel training over one worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets

from course_utils import config, hardware, plots, train
from course_utils.widgets.base import Panel


class SpeedupPanel(Panel):
    """Choose a model, a number of DDP workers and a global batch; Run trains a few steps with
    :func:`course_utils.train.run` (``--parallel ddp``, one thread per worker) and adds the
    measured speedup over one worker (same model and batch, measured once and cached) to a
    speedup and efficiency plot beside the ideal line.

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
    ):
        self.num_steps, self.threads = num_steps, threads  # threads per worker, baseline too
        self.device = hardware.device_kind(device, max(world_sizes))
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
        key = (model, batch_size)
        if key not in self.baselines:  # one worker, measured once: every speedup's reference
            self.baselines[key] = self.train(self._config(model, 1, batch_size))["samples_per_s"]
        if nproc == 1:
            samples_per_s = self.baselines[key]
        else:
            samples_per_s = self.train(self._config(model, nproc, batch_size))["samples_per_s"]
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
