import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MPLBACKEND", "Agg")


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Run ``python -m course_utils.train ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "course_utils.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return run_cli


def workers_left() -> list[int]:
    """This process's live children, less multiprocessing's resource tracker (started once by a
    spawn test, long-lived by design)."""
    from course_utils import launch

    return [
        pid
        for pid in launch.children()
        if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    ]


@pytest.fixture(autouse=True)
def _close_figures():
    """Every test's figures are closed after it (pyplot keeps them otherwise, and warns past 20)."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
