"""Where a benchmark writes what it measured: benchmarks/results/<name>.json, with the machine."""

from __future__ import annotations

import json
import platform
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import course_utils as cu
from course_utils import cluster

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


def check_link(p, args, short_steps: int) -> None:
    """Refuse, through the parser ``p``, steps too few to leave a difference over the short run's
    (``short_steps``) and a link rate ``tc`` would not take."""
    if args.steps <= short_steps:
        p.error(f"--steps must be above {short_steps} (the bytes per step are a difference)")
    try:
        cluster.rate_bytes(args.rate)
    except ValueError as err:
        p.error(str(err))


def on_cluster(name: str, measure: Callable[[Path], object]) -> tuple[object, str | None]:
    """``measure(folder)`` (a fresh temporary folder) with the benchmark's own cluster ``name``:
    an earlier run's leftover of that name removed first, and ``name`` taken down afterwards,
    SIGTERM included. ``(what measure returned, None)``, or ``(None, why)`` where no cluster can
    be made here (no root, no namespaces)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally takes it down
    reason = cluster.unavailable()
    if reason is not None:
        return None, reason
    with tempfile.TemporaryDirectory() as folder:
        try:
            cluster.down(name)  # an earlier run's leftover (this benchmark's only)
            return measure(Path(folder)), None
        except cluster.ClusterError as err:  # the cluster can't be made here
            return None, str(err)
        finally:
            cluster.down(name)
