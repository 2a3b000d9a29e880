"""Recording a trace: :class:`Recorder` profiles a few steps of a rank and writes its
``torch.profiler`` trace, ``DIR/trace_rank<r>.json`` (:func:`trace_path`; ``--profile DIR``);
:func:`label` opens a named span in it. Reading one is :mod:`course_utils.profiling.trace`.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

__all__ = ["Recorder", "label", "trace_path"]

label = record_function  # ``with label("forward"): ...``: a named span in every trace


def trace_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"trace_rank{rank}.json"


class Recorder:
    """Profile ``active`` steps of a run on this rank, after skipping the first ones where the run
    is long enough; call :meth:`step` after every training step and :meth:`stop` at the end. The
    trace is written when the active steps are done (or at :meth:`stop`, if the run was shorter).
    ``memory``: record allocations too (for memory over time)."""

    def __init__(
        self, directory: str | Path, rank: int, num_steps: int, active: int = 3, memory: bool = True
    ):
        self.path = trace_path(directory, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the first step builds buffers, the second DDP's buckets (in the order gradients came):
        # skip both where the run is long enough, then warm the profiler up for one step
        wait = 1 if num_steps > active + 2 else 0
        warmup = 1 if num_steps > active + 1 else 0
        self.active = max(1, min(active, num_steps - warmup - wait))
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.written = False
        with warnings.catch_warnings():  # "won't be using warmup": a short run has no spare step
            warnings.simplefilter("ignore", UserWarning)
            self.profiler = profile(
                activities=activities,
                schedule=schedule(wait=wait, warmup=warmup, active=self.active, repeat=1),
                on_trace_ready=self._write,
                profile_memory=memory,  # the memory events (each rank then warns once, in C++,
            )  # that it saw memory freed whose allocation happened before it started)

    def _write(self, prof) -> None:
        prof.export_chrome_trace(str(self.path))
        self.written = True

    def __enter__(self) -> Recorder:
        with _quiet_stderr():
            self.profiler.start()
        return self

    def step(self) -> None:
        with _quiet_stderr():  # the schedule starts and stops the recording inside step()
            self.profiler.step()

    def stop(self) -> Path:
        with _quiet_stderr():
            self.profiler.stop()  # writes the trace if the schedule had not finished
        return self.path

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def _quiet_stderr():
    """PyTorch's profiler library prints lines to the process's stderr (file descriptor 2, out
    of Python's reach) whenever it starts and stops recording, and a warning about memory
    allocated before it started; every rank of every run would show three. They go to /dev/null
    while the profiler changes state."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
