"""Inside a worker: who this process is in a run, its process group, and how it leaves.

Ranks come from the environment, as under ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``.
Which device a worker computes on is a parameter (``"auto"``, ``"cpu"`` or ``"cuda"``), passed by
the caller: :func:`course_utils.launch.run` hands its choice to each worker it starts, and the
training entry point passes ``--device``. Inside a process group, the group's backend tells
(gloo: the CPU; NCCL: ``cuda:LOCAL_RANK``), so worker code that asks :func:`worker` without a
device gets the one its group was made for.
"""

from __future__ import annotations

import datetime
import multiprocessing.util
import os
import pickle
import signal
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course_utils import hardware
from course_utils.launch import rendezvous

GROUP_TIMEOUT_S = 60.0  # a collective that a rank skips fails after this, not gloo's 30 minutes

_launched_kind: str | None = (
    None  # "cpu" or "cuda": set in a worker that course_utils.launch started
)


@dataclass(frozen=True)
class Worker:
    """Who this process is in a run: read from the environment torchrun (or :func:`run`) sets."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _kind(device: str | None) -> str:
    """``"cpu"`` or ``"cuda"`` for this process: an explicit choice, else the launcher's, else
    the process group's backend, else ``"auto"`` (a GPU when there is one)."""
    if device not in (None, "auto"):
        return hardware.device_kind(device)
    if _launched_kind is not None:
        return _launched_kind
    if dist.is_available() and dist.is_initialized():
        return "cuda" if dist.get_backend() == "nccl" else "cpu"
    return hardware.device_kind("auto", int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def worker(device: str | None = None) -> Worker:
    """This process's place in the run (rank 0 of 1 when not launched at all). ``device``:
    ``"cpu"``, ``"cuda"``, or ``"auto"``/None for the launcher's (or the process group's) choice."""
    rank, local_rank, world_size = 0, 0, 1  # not launched: the only process
    if launched():  # RANK alone (a stray variable) does not make this process a worker
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ["WORLD_SIZE"])
    kind = _kind(device)
    return Worker(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        backend=hardware.backend(kind),
        device=hardware.device(local_rank, kind),
    )


def launched() -> bool:
    """True inside a worker started by torchrun or :func:`course_utils.launch.run`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def environment_error() -> str | None:
    """Why this process's launcher variables (torchrun's) can't work, in one line, or None."""
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(name)
        if raw is not None:
            try:
                values[name] = int(raw)
            except ValueError:
                return f"{name}={raw!r} is not a whole number (it is torchrun's to set)"
    if not launched():
        return None
    rank, world_size = values["RANK"], values["WORLD_SIZE"]
    if world_size < 1 or not 0 <= rank < world_size:
        return f"RANK={rank} does not fit WORLD_SIZE={world_size} (ranks are 0..WORLD_SIZE-1)"
    if not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        return (
            "RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not: start the "
            "workers with torchrun (it sets all four), or unset RANK and WORLD_SIZE and use --nproc"
        )
    return None


@contextmanager
def process_group(
    device: str | None = None, timeout_s: float = GROUP_TIMEOUT_S, store: str | None = None
):
    """``init_process_group`` with ranks from the environment, always with a timeout, and
    ``destroy_process_group`` in ``finally``; yields this process's :class:`Worker`. The backend
    follows the device (NCCL for ``cuda``, gloo for ``cpu``); the CUDA device is set from the
    *local* rank. Ranks meet at ``store`` (a file: :func:`course_utils.launch.run`'s workers), or
    at the TCP store of ``MASTER_ADDR``/``MASTER_PORT`` (``env://``: torchrun's)."""
    me = worker(device)
    if me.device.type == "cuda":
        torch.cuda.set_device(me.device)
    timeout = datetime.timedelta(seconds=timeout_s)
    meet = {"init_method": f"file://{store}"} if store else _env_rendezvous(me, timeout)
    dist.init_process_group(
        me.backend, rank=me.rank, world_size=me.world_size, timeout=timeout, **meet
    )
    try:
        yield me
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _env_rendezvous(me: Worker, timeout: datetime.timedelta) -> dict:
    """``env://``, kept on loopback when ``MASTER_ADDR`` is a loopback address (torchrun on one
    machine): then every rank is here, so rank 0's store and gloo listen on loopback only (a
    ``TCPStore`` and gloo would otherwise listen on every interface, or the host name's)."""
    host = rendezvous.loopback_address(os.environ.get("MASTER_ADDR", ""))
    if host is None:
        return {"init_method": "env://"}
    interface = rendezvous.loopback_interface()
    if me.backend == "gloo" and interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, not ours
        return {"init_method": "env://"}
    port = os.environ.get("MASTER_PORT", "")
    if not port.isdigit():  # env:// says what is wrong with it
        return {"init_method": "env://"}
    store = rendezvous.loopback_store(host, int(port), me.rank, me.world_size, timeout)
    return {"store": store}


def exit_cleanly(code: int = 0) -> None:
    """Flush, run multiprocessing's exit finalizers, and leave without interpreter teardown: gloo
    sometimes aborts at interpreter exit ("terminate called without an active exception") after
    DDP, once the work is done.

    ``os._exit`` skips everything Python does at exit, multiprocessing's finalizers among them.
    One of them unlinks each named semaphore the process created: tqdm makes one for its lock with
    a process's first progress bar (shown or not), a named one where the start method is spawn
    (a spawned worker's). Skipped, every such semaphore outlives its worker, and when the
    launching program ends, Python's resource tracker warns "There appear to be N leaked
    semaphore objects". So they run first: the finalizers a normal exit runs before it joins
    threads and child processes (priority 0 and up: unlinking semaphores, closing queues), not
    those joins, which could wait for ever."""
    sys.stdout.flush()
    sys.stderr.flush()
    multiprocessing.util._run_finalizers(0)
    os._exit(code)


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (no orphans)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


_stack_file = None  # kept open for faulthandler, which writes to it from a signal handler


def _dump_stack_on_signal(path: str | None) -> None:
    """On SIGUSR1, write every thread's Python stack to ``path``: the launcher asks a worker
    that is still running at its timeout where it is stuck (a skipped collective, a deadlock)."""
    global _stack_file
    if path is None or not hasattr(signal, "SIGUSR1"):
        return
    import faulthandler

    _stack_file = open(path, "w")  # noqa: SIM115 (open for the life of the process)
    faulthandler.register(signal.SIGUSR1, file=_stack_file, all_threads=True)


def child_main_by_value(package: bytes, setup: dict, conn) -> None:
    """:func:`child_main` for a function sent by value (``cloudpickle``: a notebook's function in
    a spawned worker)."""
    try:
        fn, args, kwargs = pickle.loads(package)
    except BaseException as err:  # e.g. a module the function needs is missing here
        message = f"the function could not be rebuilt in the worker: {err!r}"
        conn.send_bytes(pickle.dumps(("error", (type(err).__name__, message, ""))))
        conn.close()
        exit_cleanly(1)
    child_main(fn, args, kwargs, setup, conn)


def child_main(fn, args, kwargs, setup: dict, conn) -> None:
    """Body of each worker process that :func:`course_utils.launch.run` starts: set up, run
    ``fn``, send ("ok"|"error", payload) through ``conn``, exit.
    ``setup``: ``env`` (the torchrun-style variables), ``threads``, ``kind`` ("cpu"/"cuda"),
    ``store`` (the rendezvous file), ``init_group`` and ``group_timeout``."""
    global _launched_kind
    _die_with_parent()
    os.environ.update(setup["env"])
    torch.set_num_threads(setup["threads"])
    if setup.get("cores"):  # pinned: these cores, and no others
        os.sched_setaffinity(0, setup["cores"])
    _launched_kind = setup["kind"]  # what cu.launch.worker() answers in this process
    _dump_stack_on_signal(setup.get("stack_file"))
    status, payload, failure, phase = "ok", None, None, "setup"
    try:
        if setup["init_group"]:
            with process_group(timeout_s=setup["group_timeout"], store=setup["store"]):
                phase = "run"
                payload = fn(*args, **kwargs)
        else:
            phase = "run"
            payload = fn(*args, **kwargs)
    except BaseException as err:  # report everything, KeyboardInterrupt included
        status, payload = "error", (type(err).__name__, str(err), traceback.format_exc(), phase)
        # Kept until exit_cleanly: freeing it frees its frames' objects, and a DDP model's
        # process group can deadlock in its destructor after a timeout (a gloo thread waits for
        # the GIL this thread holds), before the error is sent.
        failure = err
    try:
        # Plain pickle, sent as bytes: multiprocessing's own pickler would share tensors through
        # file descriptors that vanish when this process exits right after sending.
        conn.send_bytes(pickle.dumps((status, payload)))
    except Exception as err:  # e.g. a result that can't be pickled
        message = ("ResultError", f"its result could not be sent back: {err!r}", "")
        conn.send_bytes(pickle.dumps(("error", message)))
    conn.close()
    exit_cleanly(0 if failure is None else 1)
