"""Timing the command line as a user runs it: a ``RunConfig`` as ``python -m course_utils.train``
flags, in a fresh process (or several at once), its ``--json`` read back.

A fresh process, not ``course_utils.train.run`` inside the benchmark's own: a process that has
trained before is not the one a user starts. Its allocator holds the pieces of earlier runs (on
the machine the course was built on, ten steps of the CNN at batch 256 ran about 8% slower in a
process that had already run the same configuration a few times), and forked workers inherit
that state. So every configuration, baseline included, starts as the command line starts it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from course_utils.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def argv(cfg: RunConfig) -> list[str]:
    """The flags that give ``cfg``: every field that differs from its default."""
    words = []
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name == "json" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return words


def start(cfg: RunConfig, json_path: Path) -> subprocess.Popen:
    """``python -m course_utils.train`` with ``cfg``'s flags, writing ``json_path``."""
    command = [sys.executable, "-m", "course_utils.train", *argv(cfg), "--json", str(json_path)]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def run(*configs: RunConfig, timeout: float = 1800) -> list[dict]:
    """Each configuration in a fresh process of its own, all started together; their results
    (the ``--json`` object). Raises ``RuntimeError`` with the failed run's last lines."""
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"run{i}.json" for i in range(len(configs))]
        procs = [start(cfg, path) for cfg, path in zip(configs, paths)]
        try:
            for proc, cfg in zip(procs, configs):
                _, err = proc.communicate(timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv(cfg))} failed:\n{err[-2000:]}")
        finally:
            for proc in procs:  # the others, when one failed: stopped (each stops its workers)
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        return [json.loads(path.read_text()) for path in paths]
