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
- **Under torchrun, too.** PyTorch's ``TCPStore`` listens on every interface (``::``) whatever
  host it is given; only a socket bound beforehand (``master_listen_fd``) keeps it on one address.
  So for a job on one machine, torchrun meets through a file (:data:`TORCHRUN_ON_ONE_MACHINE`:
  c10d rendezvous on a private temporary file, no shared store, ``MASTER_ADDR`` 127.0.0.1), and
  when ``MASTER_ADDR`` is a loopback address the workers' own store (:func:`loopback_store`) and
  gloo stay on loopback: every rank is on this machine, or it could not reach that address.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import torch.distributed as dist

from course_utils.launch.processes import alive

PREFIX = "course-launch-"
# torchrun on one machine with nothing listening beyond loopback (scripts/README.md): the
# rendezvous is a c10d store in a private temporary file, the workers' store is their own (the
# variable), and rank 0's address, hence the workers' store and gloo, is 127.0.0.1
TORCHRUN_ON_ONE_MACHINE = (
    "--rdzv-backend", "c10d", "--rdzv-conf", "store_type=file", "--local-addr", "127.0.0.1",
)  # fmt: skip
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free right now (port 0 asks it to choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def loopback_address(host: str) -> str | None:
    """``host`` as a numeric loopback address (``127.0.0.1``, ``::1``; ``localhost`` resolved),
    or None when it is not one. Other names are not looked up: they are another machine's."""
    if host == "localhost":
        try:
            host = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
        except (OSError, IndexError):
            return None
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def loopback_store(
    host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta
) -> dist.TCPStore:
    """What ``env://`` builds, but listening on loopback only: rank 0 hosts the store on a socket
    it bound to ``host:port`` itself (a ``TCPStore`` binds every interface), the others connect."""
    use_libuv = os.environ.get("USE_LIBUV", "1") == "1"  # as env:// reads it (Windows: 0)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout, use_libuv=use_libuv)
    listener = socket.create_server((host, port), family=_family(host))
    return dist.TCPStore(
        host,
        port,
        world_size,
        True,
        timeout,
        multi_tenant=True,
        master_listen_fd=listener.detach(),
        use_libuv=use_libuv,
    )  # fmt: skip: the store owns the socket now, and closes it when it is destroyed


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
