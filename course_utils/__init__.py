"""Helpers for the course "Parallel Deep Learning with PyTorch, from one device to many".

Notebooks do ``import course_utils as cu`` and call ``cu.data.mnist(...)``, ``cu.plots.curves(...)``:
where a name comes from stays visible. The light modules load here; the ones that pull in
matplotlib or ipywidgets (``plots``, ``widgets``) or start processes load on first use, so worker
processes and CI never need a screen.
"""

import importlib
import importlib.util
import os
import sys

# PyTorch's OpenMP threads busy-wait between parallel regions by default, spinning on cores that
# another program (a browser, the other worker) needs: on a 2-core laptop with one other busy
# program, 2 threads then run at 0.3-0.7x the speed of 1. A passive wait policy gives the core
# back. OpenMP reads it once, when torch loads: so it is set here, before the imports below, and
# inherited by every worker and subprocess (cu.hardware.wait_policy() says whether it took).
TORCH_LOADED_FIRST = "torch" in sys.modules  # then this process's threads keep torch's policy
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from course_utils import data, hardware, loop, measure, models, readout  # noqa: E402

__all__ = ["data", "hardware", "loop", "measure", "models", "readout", "FAST", "pick"]

_LAZY = {
    "plots",
    "widgets",
    "train",
    "config",
    "checkpoint",
    "launch",
    "collectives",
    "ddp",
    "pipeline",
    "scaling",
    "cost_model",
    "interpret",
    "tensor_parallel",
    "context_parallel",
    "expert_parallel",
    "moe",
    "sharding",
    "profiling",
    "debugging",
}

# The one setting read from the environment: CI sets COURSE_FAST=1 so that every notebook runs
# in seconds. Lessons use pick(full, fast) for their sizes.
FAST: bool = os.environ.get("COURSE_FAST", "0") not in ("", "0", "false", "False")


def pick(full, fast):
    """Return ``fast`` in fast mode (CI), ``full`` otherwise."""
    return fast if FAST else full


def __getattr__(name: str):
    # any submodule or subpackage (the list above, and any a lesson adds) loads on first use
    if name in _LAZY or importlib.util.find_spec(f"course_utils.{name}") is not None:
        return importlib.import_module(f"course_utils.{name}")
    raise AttributeError(f"module 'course_utils' has no attribute {name!r}")
