"""Save and resume a run (lesson 05, the entry point's ``--checkpoint DIR``).

A checkpoint holds what the next steps depend on: the weights, the optimizer's state (SGD's
momentum), the number of steps done (the batches are a function of seed and step, so no data
position is needed) and the metrics so far, so that a resumed run reports every step. It is
written atomically: a temporary file, then a rename, so a crash while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from course_utils import loop

CHECKPOINT_NAME = "latest.pt"


def save(
    directory: str | Path, model: nn.Module, optimizer, step: int, history: loop.History
) -> Path:
    """Save after ``step`` steps, atomically. Call it on one rank (the main one) only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    state = {
        "step": step,  # steps completed; the batches are a function of (seed, step)
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # SGD's momentum buffers
        "losses": history.losses,
        "accuracies": history.accuracies,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(directory: str | Path | None, model: nn.Module, optimizer) -> dict | None:
    """Restore model and optimizer from ``directory``'s checkpoint if there is one; return it
    (``step``, ``losses``, ...) or None. ``weights_only=True``: a checkpoint can't run code."""
    if directory is None:
        return None
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state
