"""Where a benchmark writes what it measured: benchmarks/results/<name>.json, with the machine."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import course_utils as cu

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, rows: list, repeats: int, watch, extra: dict | None = None) -> Path:
    """``rows`` of one benchmark, its ``repeats`` and how busy the machine was (``watch``: a
    ``cu.measure.Watch`` around the measurements); ``extra``: settings common to every row."""
    out = {
        "machine": {
            "cores": cu.hardware.num_cores(),
            "python": platform.python_version(),
            "others_busy_cores": watch.others,
        },
        "repeats": repeats,
        **(extra or {}),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=1))
    return path


def skip(name: str, reason: str, repeats: int, watch) -> None:
    """Not measured here (no cluster: ``reason``): the reason in ``<name>.json``, unless it holds
    an earlier measurement, which is kept (a run without root must not wipe a root run's)."""
    path = RESULTS / f"{name}.json"
    if path.is_file() and json.loads(path.read_text()).get("rows"):
        print(f"{name}: not measured ({reason}); {path} keeps its earlier measurements")
        return
    path = save(name, [], repeats, watch, {"skipped": reason})
    print(f"{name}: not measured ({reason}); wrote {path}")
