"""Run a function on N worker processes, from a notebook cell or a shell; get results (or the
first error, with its rank and traceback) back in the caller.

How it works, and why:
- **Ranks come from the environment, as under torchrun.** Each worker gets ``RANK``,
  ``WORLD_SIZE`` and ``LOCAL_RANK``, so worker code runs unchanged under ``torchrun``. Only the
  rendezvous differs: this launcher's workers, all on one machine, meet at a file in a fresh
  temporary folder (:mod:`~course_utils.launch.rendezvous`), so no port can collide and no TCP
  connect can stall (about one ``env://`` connect in 30 took 5 s on the machine this course was
  built on). ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` (never 29500) are set too, for
  worker code that calls a bare ``dist.init_process_group("gloo")`` (``init_group=False``).
- **The device is a parameter.** ``device="auto"`` gives each worker a GPU (NCCL) when there is
  one per worker, and the CPU (gloo) otherwise; ``"cpu"`` or ``"cuda"`` force the choice. Every
  worker of a launch gets the same kind, so no comparison mixes a GPU with CPUs.
- **Fork where it is safe, spawn where it isn't.** A forked child already has the caller's
  functions in memory, and forking a kernel that has imported torch takes ~0.1 s. Fork is unsafe
  once CUDA is initialised in the caller, and missing on Windows: then the launcher spawns (fresh
  interpreters, ~2 s more). A function a spawned interpreter can't import (one defined in a notebook
  cell) travels *by value*: ``cloudpickle`` serialises its code and the globals it uses.
  ``start_method="spawn"`` (or the environment variable ``COURSE_START_METHOD=spawn``) forces
  spawning. ``COURSE_SEND_BY_VALUE=1`` sends such functions by value to *forked* workers too,
  which then run the copy, not the caller's memory: CI runs every lesson that way, which
  shows at fork's cost that a lesson's workers need nothing a spawned interpreter lacks.
- **A forked worker gets one thread, or is spawned.** PyTorch's CPU build uses GNU OpenMP, whose
  thread pool does not survive ``fork``: a forked child that runs a parallel region with more than
  one thread, after its parent has used the pool, hangs for ever. So a launch that wants more than
  one thread per worker spawns (fresh interpreters, ~2 s more) when ``fn`` is importable, and
  otherwise forks with one thread per worker and says so once. (As with any spawn, a script that
  launches needs the ``if __name__ == "__main__":`` guard.)
- **Forked workers start warm.** ``DistributedDataParallel`` imports ``torch._dynamo`` the first
  time it is built, ~1 s. The launcher imports it once in the caller, so forked workers inherit it
  and a DDP launch takes ~0.05 s instead of ~1 s every time.
- **Nothing is left behind.** The first worker to fail, or the timeout, or an interrupt of the
  kernel, stops every worker (SIGTERM, then SIGKILL), and the caller raises. On Linux a worker also
  dies with its parent.
- **A group that fails to form is started again, once.** Gloo's transport now and then fails to
  connect its mesh of ranks on a loaded machine; such a launch starts afresh, with a warning
  (``SETUP_RETRIES``). An error after the work began is never retried.
- **Workers exit cleanly.** A worker sends its result and leaves through
  :func:`~course_utils.launch.worker.exit_cleanly` (no interpreter teardown, where gloo sometimes
  aborts after DDP; its named semaphores unlinked first). The caller lets workers that have sent
  their results leave by themselves (up to ``EXIT_GRACE_S``): stopped on their way out, they
  would leave semaphores behind ("There appear to be N leaked semaphore objects").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import wait

import torch

from course_utils import hardware
from course_utils.launch import postmortem, processes, rendezvous
from course_utils.launch.postmortem import LaunchTimeout, WorkerError
from course_utils.launch.rendezvous import free_port
from course_utils.launch.worker import GROUP_TIMEOUT_S, child_main, child_main_by_value

MAX_WORKERS_PER_CORE = 4  # more is a typo (--nproc 1000), not an experiment
EXIT_GRACE_S = 5.0  # a worker that has sent its result gets this long to leave by itself
# A signal (Ctrl-C) the kernel hands to another thread (gloo's, a browser driver's) only sets
# Python's flag, which the main thread acts on when its wait returns: so it waits at most this long
WAKE_S = 0.5
_START_LOCK = threading.Lock()
SETUP_RETRIES = 1  # gloo's "Connection closed by peer" while the group forms, before any work
_MESH_FAILURES = ("connectFullMesh", "Connection closed by peer", "Connection reset by peer")


def default_start_method() -> str:
    """``COURSE_START_METHOD`` when set (``fork`` or ``spawn``); else ``fork`` when it is safe
    here (Linux/macOS, CUDA not yet initialised), else ``spawn``."""
    chosen = os.environ.get("COURSE_START_METHOD", "").strip()
    if chosen:
        return chosen
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _by_value(work: tuple) -> bytes:
    """``(fn, args, kwargs)`` serialised with the code of what a fresh interpreter can't import."""
    import cloudpickle

    try:
        return cloudpickle.dumps(work)
    except Exception as err:
        raise ValueError(f"{_name(work[0])} can't be sent to spawned workers: {err}") from err


def _always_by_value() -> bool:
    """``COURSE_SEND_BY_VALUE=1``: a notebook's functions go by value to forked workers too."""
    return os.environ.get("COURSE_SEND_BY_VALUE", "").strip() == "1"


def _method(asked: str | None) -> str:
    method = asked or default_start_method()
    if method not in ("fork", "spawn") or method not in mp.get_all_start_methods():
        raise ValueError(
            f"start method {method!r}: choose 'fork' or 'spawn' (available here: "
            f"{', '.join(mp.get_all_start_methods())})"
        )
    if method == "fork" and torch.cuda.is_initialized():
        raise ValueError("CUDA is initialised in this process: its workers can't be forked")
    return method


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _importable(fn: Callable) -> bool:
    """Can a spawned interpreter find ``fn`` by importing its module?"""
    module = getattr(fn, "__module__", None)
    return module not in (None, "__main__") and "<locals>" not in _name(fn)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _stop(procs: list, grace: float = 0.0) -> None:
    """After ``grace`` seconds for the workers to exit by themselves, SIGTERM every live worker
    (and SIGCONT, so that a stopped one acts on it), then SIGKILL what is left; reap them all."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            if hasattr(signal, "SIGCONT"):
                os.kill(p.pid, signal.SIGCONT)
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def run(
    fn: Callable,
    nproc: int,
    *args,
    timeout: float = 300.0,
    threads: int | None = None,
    init_group: bool = True,
    group_timeout: float = GROUP_TIMEOUT_S,
    device: str = "auto",
    oversubscribe: bool = False,
    pin: bool = False,
    start_method: str | None = None,
    **kwargs,
) -> list:
    """Run ``fn(*args, **kwargs)`` on ``nproc`` worker processes; return their results by rank.

    With ``init_group`` (the default) each worker's default process group is ready when ``fn``
    starts (``dist.get_rank()`` etc. work) and destroyed after. ``threads``: torch threads per
    worker (default cores // nproc, at least 1; a forked worker of a notebook function gets 1, see
    the module docstring). ``device``: ``"auto"`` (a GPU per worker when there are ``nproc`` of
    them, else the CPU), ``"cpu"`` or ``"cuda"``. More than ``MAX_WORKERS_PER_CORE`` workers per
    core are refused unless ``oversubscribe``. ``pin``: give each worker cores of its own
    (rank r: cores r*threads ..), where they fit and the OS allows it: no worker migrates, nor
    shares a core with another; on a machine busy with other programs it can also hurt, since a
    pinned worker cannot move to a free core. ``start_method``: ``"fork"`` or ``"spawn"``
    (default: see :func:`default_start_method`). Raises :class:`WorkerError` (first failure) or
    :class:`LaunchTimeout`.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if not timeout > 0:  # also refuses NaN
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    cores = hardware.num_cores()
    if nproc > MAX_WORKERS_PER_CORE * cores and not oversubscribe:
        raise ValueError(
            f"{nproc} workers on {cores} cores is far too many (at most "
            f"{MAX_WORKERS_PER_CORE * cores}); pass oversubscribe=True to run them anyway"
        )
    if nproc > cores:
        _warn_once(
            "oversubscribe",
            f"{nproc} workers on {cores} cores: they take turns on the cores, so their timings "
            "say little about speed (results are still correct).",
        )
    kind = hardware.device_kind(device, nproc)
    asked_for_threads = threads is not None
    threads = threads or hardware.threads_per_worker(nproc)
    method = _method(start_method)
    if (
        method == "fork" and threads > 1 and start_method is None
    ):  # see "A forked worker gets one thread" above
        if _importable(fn):
            method = "spawn"
        else:
            threads = 1
            if asked_for_threads:
                _warn_once(
                    "threads",
                    f"{_name(fn)} is defined in a notebook (or inside a function), so its "
                    "workers are forked, and a forked worker must run with 1 thread (OpenMP's "
                    "thread pool does not survive fork). Move it into a .py module to give each "
                    "worker more threads.",
                )
    # a notebook's function, as the work or among its arguments: sent by value (cloudpickle)
    sent = (fn, *args, *kwargs.values())
    by_value = (method == "spawn" or _always_by_value()) and any(
        callable(f) and not _importable(f) for f in sent
    )
    work = (fn, args, kwargs)
    package = _by_value(work) if by_value else None
    ctx = mp.get_context(method)
    port = free_port()  # only for worker code that calls a bare init_process_group (env://)
    loopback = rendezvous.loopback_interface() if kind == "cpu" else None
    common = {  # what torchrun would set: worker code runs unchanged under it
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": str(threads),
    }
    if loopback:  # gloo's own setting: one machine, so listen on loopback only
        common["GLOO_SOCKET_IFNAME"] = loopback
    setup = {"threads": threads, "kind": kind, "init_group": init_group}
    setup.update(group_timeout=group_timeout, pin=pin)
    target, sent = (child_main_by_value, (package,)) if by_value else (child_main, work)
    for attempt in range(1 + SETUP_RETRIES):
        procs, readers = [], {}
        with rendezvous.cleanup_on_signals(), rendezvous.folder() as meeting:
            try:
                # One launch starts its processes at a time: forking while another thread holds
                # the import lock (a first DDP import, say) would leave the child deadlocked.
                with _START_LOCK, processes.main_without_a_missing_file(method):
                    if method == "fork":
                        processes.preload()
                    for rank in range(nproc):
                        reader, p = _start(ctx, target, sent, rank, nproc, common, setup, meeting)
                        procs.append(p)
                        readers[reader] = rank
                try:
                    results = _collect(procs, readers, timeout, meeting)
                except WorkerError as err:
                    if attempt == SETUP_RETRIES or not _group_did_not_form(err):
                        raise
                    warnings.warn(
                        f"the workers' process group did not form ({err.kind}: "
                        f"{err.message.splitlines()[0]}); starting them again",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue  # the finally below stops this attempt's workers
                _stop(procs, grace=EXIT_GRACE_S)  # see "Workers exit cleanly" above
                return results
            finally:
                _stop(procs)
                for reader in readers:
                    reader.close()


def _start(ctx, target, sent: tuple, rank: int, nproc: int, common: dict, setup: dict, meeting):
    """Start rank ``rank``'s process; return the reading end of its pipe, and the process."""
    setup = {
        **setup,
        "env": {"RANK": str(rank), "LOCAL_RANK": str(rank), **common},
        "cores": processes.cores_of(rank, setup["threads"], nproc) if setup["pin"] else None,
        "store": str(meeting / "store"),
        "stack_file": str(meeting / f"stack{rank}.txt"),  # dumped on SIGUSR1
    }
    reader, writer = ctx.Pipe(duplex=False)
    p = ctx.Process(
        target=target, args=(*sent, setup, writer), name=f"course-worker-{rank}", daemon=True
    )
    p.start()
    writer.close()  # the child holds the writing end now
    return reader, p


def _collect(procs: list, readers: dict, timeout: float, meeting=None) -> list:
    """Wait for every rank's message; raise on the first error (a collective's timeout names the
    ranks it waited for), a silent death, or the timeout (with the late ranks' stacks, from the
    files in ``meeting``)."""
    results: dict[int, object] = {}
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    pending = dict(readers)
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            late = sorted(pending.values())
            stacks = postmortem.stacks(procs, late, meeting)
            where = "".join(
                f"\n--- rank {rank} was here ---\n{postmortem.main_thread(stacks[rank])}"
                for rank in stacks
            )
            raise LaunchTimeout(
                f"ranks {late} had not finished after {timeout:.0f} s; all workers were stopped"
                + where,
                stacks,
            )
        waiting = list(pending) + [s for s, r in sentinels.items() if r in pending.values()]
        ready = wait(waiting, timeout=min(remaining, WAKE_S))
        for obj in ready:
            if obj in pending:
                rank = pending[obj]
                try:
                    raw = obj.recv_bytes()
                except (EOFError, OSError):  # the pipe closed with no message: the worker died
                    raise postmortem.died(procs[rank], rank) from None
                try:
                    status, payload = pickle.loads(raw)
                except Exception as err:  # e.g. a class this process can't import
                    message = f"its result could not be unpickled here: {err!r}"
                    raise WorkerError(rank, message, kind="ResultError") from None
                del pending[obj]
                if status == "error":
                    kind, message, worker_traceback, *phase = payload
                    late, stacks = {}, {}
                    if postmortem.timed_out(message):  # which rank did it wait for?
                        late, stacks = postmortem.late_ranks(procs, pending, deadline, meeting)
                    raise WorkerError(rank, message, worker_traceback, kind, late, stacks, *phase)
                results[rank] = payload
            elif sentinels[obj] in pending.values() and not _reader_of(
                pending, sentinels[obj]
            ).poll(0):
                raise postmortem.died(procs[sentinels[obj]], sentinels[obj])
    return [results[rank] for rank in range(len(procs))]


def _group_did_not_form(err: WorkerError) -> bool:
    """Did the launch fail while its process group formed, on gloo's transport?"""
    return err.phase == "setup" and any(text in err.message for text in _MESH_FAILURES)


def _reader_of(pending: dict, rank: int):
    return next(reader for reader, r in pending.items() if r == rank)
