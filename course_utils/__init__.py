"""Helpers for the course "Parallel Deep Learning with PyTorch, from one device to many".

Notebooks do ``import course_utils as cu`` and call ``cu.data.mnist(...)``, ``cu.plots.curves(...)``:
where a name comes from stays visible. The light modules load here; the ones that pull in
matplotlib or ipywidgets (``plots``, ``widgets``) or start processes load on first use, so worker
processes and CI never need a screen.
"""

import importlib
import os

from course_utils import data, hardware, loop, models

__all__ = ["data", "hardware", "loop", "models", "FAST", "pick"]

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
    "faq",
}

# The one setting read from the environment: CI sets COURSE_FAST=1 so that every notebook runs
# in seconds. Lessons use pick(full, fast) for their sizes.
FAST: bool = os.environ.get("COURSE_FAST", "0") not in ("", "0", "false", "False")


def pick(full, fast):
    """Return ``fast`` in fast mode (CI), ``full`` otherwise."""
    return fast if FAST else full


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"course_utils.{name}")
    raise AttributeError(f"module 'course_utils' has no attribute {name!r}")
