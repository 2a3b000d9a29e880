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


def notebook_functions(notebook: Path, names, namespace: dict) -> dict:
    """The functions ``names`` as a lesson's code cells define them, executed alone in
    ``namespace`` (the rest of each cell measures things, which a test must not): by name."""
    import ast
    import json

    wanted = set(names)
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if not any(f"def {name}(" in source for name in wanted):
            continue
        defs = [n for n in ast.parse(source).body if getattr(n, "name", None) in wanted]
        exec(compile(ast.Module(body=defs, type_ignores=[]), str(notebook), "exec"), namespace)
    missing = wanted - set(namespace)
    assert not missing, f"{notebook.name} no longer defines {sorted(missing)}"
    return {name: namespace[name] for name in names}


# what makes, changes or reads a cluster: a lesson run without one must call none of them
CLUSTER_COMMANDS = ("up", "down", "existing", "spawn", "status", "link_bytes", "set_rate")


def lesson_without_a_cluster(notebook: Path, monkeypatch) -> dict:
    """Every code cell of a cluster lesson, in order, in one namespace (returned), where no
    cluster can be made ("the cluster needs root (test)"): a cell that still calls one of
    ``CLUSTER_COMMANDS`` fails the test."""
    import json

    from course_utils import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("no cluster command may run here")

    monkeypatch.setattr(cluster, "unavailable", lambda: "the cluster needs root (test)")
    for name in CLUSTER_COMMANDS:
        monkeypatch.setattr(cluster, name, refuse)
    namespace = {"__name__": "__lesson__"}
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(notebook), "exec"), namespace)
    return namespace
