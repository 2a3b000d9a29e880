"""Finding processes: the children of a process (torchrun's workers, the launcher's), and whether
one is still alive. Linux reads ``/proc``; elsewhere ``pgrep -P`` (macOS) answers. Also what a
spawned process re-runs of its parent's ``__main__``."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after ``(comm)``: state, ppid, ... (None: gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:  # it ended while we looked
        return None
    return stat.rsplit(")", 1)[1].split()


def children(pid: int | None = None) -> list[int]:
    """PIDs of the live (not zombie) children of ``pid`` (default: this process), sorted."""
    pid = os.getpid() if pid is None else pid
    if not (PROC / "self" / "stat").exists():
        listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return sorted(int(p) for p in listed.stdout.split())
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def state(pid: int) -> str | None:
    """The scheduler's one-letter state of process ``pid`` (``R`` running, ``S`` sleeping, ``T``
    stopped by a signal, ``t`` held by a debugger, ``Z`` a zombie), or None once it is gone."""
    if (PROC / "self" / "stat").exists():
        fields = _stat_fields(pid)
        return fields[0] if fields else None
    shown = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return shown.stdout.strip()[:1] or None


def environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` started with (Linux; empty where it can't be read)."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


@contextmanager
def main_without_a_missing_file(method: str):
    """A spawned interpreter re-runs the caller's ``__main__`` from its file; a script read from
    standard input (``python - <<EOF``) names ``<stdin>``, which no file holds. While workers
    start, such a ``__main__`` is shown without a file, like a notebook's: its functions then
    travel by value."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if method != "spawn" or path is None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def cores_of(rank: int, threads: int, nproc: int) -> list[int] | None:
    """The cores rank ``rank`` is pinned to, or None where the workers don't fit one per core."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if threads * nproc > len(cores):
        return None
    return cores[rank * threads : (rank + 1) * threads]


PRELOAD = ("torch._dynamo",)  # what DDP's constructor would import in every worker


def preload() -> None:
    """Import in the caller what every forked worker would import by itself."""
    import importlib

    for name in PRELOAD:
        if name not in sys.modules:
            importlib.import_module(name)
