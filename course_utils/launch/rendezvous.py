"""Where one launch's workers meet, and what is cleaned up after it, whatever ends it.

- **A folder per launch.** The workers rendezvous at a file in a fresh temporary folder named
  after the launching process (``course-launch-<pid>-...``). It is removed when the launch ends:
  normally, on an error, an interrupt, or a SIGTERM or SIGHUP of the caller (a closed terminal, a
  killed kernel), which :func:`cleanup_on_signals` turns into an orderly exit. A launch also
  sweeps away the folders of launching processes that no longer exist (killed by SIGKILL, which
  nothing can catch).
- **Loopback only.** Workers on one machine talk over the loopback interface: gloo binds to the
  interface its ``GLOO_SOCKET_IFNAME`` names, and without it to whatever the host name resolves
  to, which can be an external interface open to the network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

from course_utils.launch.processes import alive

PREFIX = "course-launch-"


def _owner(folder: Path) -> int | None:
    """The PID a rendezvous folder was made for (from its name), or None."""
    rest = folder.name.removeprefix(PREFIX)
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def sweep(root: str | Path | None = None) -> list[Path]:
    """Remove the rendezvous folders whose launching process is gone; return them."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for folder in root.glob(f"{PREFIX}*"):
        owner = _owner(folder)
        if folder.is_dir() and owner is not None and not alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def folder():
    """A fresh rendezvous folder for one launch, removed afterwards (stale ones swept first)."""
    sweep()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def cleanup_on_signals(signals=(signal.SIGTERM, signal.SIGHUP)):
    """While the block runs, SIGTERM and SIGHUP raise ``SystemExit`` (128 + the signal) instead of
    killing the process outright, so that ``finally`` blocks stop the workers and remove the
    rendezvous folder; the previous handlers come back after. (Only the main thread can set
    signal handlers: elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):  # Windows has no if_nameindex before Python 3.8
        return None
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return next((name for name in names if name.startswith("lo")), None)
