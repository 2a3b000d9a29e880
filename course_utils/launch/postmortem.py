"""What a worker that failed or got stuck leaves behind, for the launcher's errors
(:class:`WorkerError`, :class:`LaunchTimeout`): the Python stack of a worker still running at the
launch's timeout (``faulthandler``, on SIGUSR1: see :func:`course_utils.launch.worker.child_main`),
the signal that killed one that died, and, when a collective timed out, the rank it waited for.

Which rank was late? The one that timed out is the one that *waited*: when a rank is stopped
(SIGSTOP, Ctrl-Z) or busy elsewhere, every other rank of the collective times out within moments
of each other, and the late rank says nothing. So after a first timeout :func:`late_ranks` gives the
others a moment to time out too; those that don't are the late ones, and their state (stopped,
dead, still running and where) comes with the error.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import traceback
from multiprocessing.connection import wait

import torch.distributed as dist

from course_utils.launch import processes

LATE_GRACE_S = 2.0  # how long the other ranks of a timed-out collective get to time out as well
# gloo ("Timed out waiting 3000ms for recv"), the stores ("Wait timeout", "wait timeout after",
# "Timeout waiting for key") and NCCL's watchdog ("collective operation timeout")
_TIMEOUT = re.compile(r"timed out|wait timeout|timeout waiting|operation timeout", re.IGNORECASE)


class WorkerError(RuntimeError):
    """A worker raised (or died): carries its ``rank``, the ``kind`` of error (the exception's
    class name), its ``message`` and the worker's own traceback; after a timeout, ``late``: the
    ranks it waited for, each with what it was doing, named in the first line; ``phase``:
    ``"setup"`` when it failed while its process group formed, before the work began."""

    def __init__(
        self,
        rank: int,
        message: str,
        worker_traceback: str = "",
        kind: str = "",
        late: dict[int, str] | None = None,
        stacks: dict[int, str] | None = None,
        phase: str = "run",
    ):
        self.rank, self.kind, self.message = rank, kind, message
        self.phase = phase
        self.worker_traceback = worker_traceback
        self.late = late or {}  # rank: what it was doing, for the ranks a timed-out rank waited for
        self.stacks = stacks or {}  # rank: the Python stack of a late rank that was still running
        cause = f"{f'{kind}: ' if kind else ''}{message}"
        text = f"worker rank {rank} failed: {cause}"
        if self.late:
            waited = ", ".join(f"rank {r} ({what})" for r, what in self.late.items())
            text = f"worker rank {rank} timed out waiting for {waited}: {cause}"
        if worker_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{worker_traceback}"
        for r, dump in self.stacks.items():
            text += f"\n--- rank {r} was here ---\n{main_thread(dump)}"
        super().__init__(text)


class LaunchTimeout(TimeoutError):
    """The workers did not all finish within the launch's timeout; they were stopped. Before
    that, each late worker dumped its Python stack (``faulthandler``): ``stacks[rank]`` holds
    every thread's, and the message shows where each late rank's main thread was waiting."""

    def __init__(self, message: str, stacks: dict[int, str] | None = None):
        super().__init__(message)
        self.stacks = stacks or {}


def stacks(procs: list, ranks: list[int], meeting) -> dict[int, str]:
    """Ask each of ``ranks`` for its Python stack (SIGUSR1: ``faulthandler`` writes every
    thread's to the rank's file in the meeting folder) and read them."""
    if meeting is None or not hasattr(signal, "SIGUSR1"):
        return {}
    for rank in (r for r in ranks if procs[r].is_alive()):
        os.kill(procs[rank].pid, signal.SIGUSR1)
    stacks, deadline = {}, time.monotonic() + 2.0
    while len(stacks) < len(ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
        for rank in set(ranks) - set(stacks):
            if "most recent call first" in (text := (meeting / f"stack{rank}.txt").read_text()):
                stacks[rank] = text
    return dict(sorted(stacks.items()))


def main_thread(dump: str) -> str:
    """The block of a faulthandler dump for the thread that took the signal: the main one."""
    blocks = dump.strip().split("\n\n")
    current = [b for b in blocks if b.startswith("Current thread")]
    lines = (current or blocks)[0].splitlines()
    cut = next((i for i, line in enumerate(lines) if line.endswith(" in child_main")), None)
    return "\n".join(lines[:cut])  # the launcher's own frames below the worker's code: left out


def died(proc, rank: int) -> WorkerError:
    return WorkerError(rank, f"process {_how_it_ended(proc)} before sending a result")


def _how_it_ended(proc) -> str:
    proc.join(1.0)
    code, how = proc.exitcode, f"exited with code {proc.exitcode}"
    if code is not None and code < 0 and -code in signal.valid_signals():
        how = f"was killed by {signal.Signals(-code).name} (exit code {code})"
        if -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            how += ": a crash inside C++ (its stderr says more)"
    return how


def timed_out(message: str) -> bool:
    """Whether a worker's error says it gave up waiting (a collective, or the store)."""
    return bool(_TIMEOUT.search(message))


def whereabouts(proc) -> str:
    """What a worker that did not answer was doing: stopped, dead (how), or still running."""
    state = processes.state(proc.pid) if proc.is_alive() else None
    if state == "T":
        return "stopped: SIGSTOP or Ctrl-Z"
    if state == "t":
        return "held by a debugger"
    if state in (None, "Z", "X"):
        return f"it {_how_it_ended(proc)}"
    return "still running"


def late_ranks(procs: list, pending: dict, until: float, meeting) -> tuple[dict, dict]:
    """After a rank timed out: wait (until ``until``, at most :data:`LATE_GRACE_S`) for the
    ``pending`` ranks (reader: rank) to answer; those that don't are the late ones. Returns their
    :func:`whereabouts` and, for those still running, their stacks (see :func:`stacks`)."""
    until = min(until, time.monotonic() + LATE_GRACE_S)
    silent, listening = set(pending.values()), dict(pending)
    while listening and time.monotonic() < until:
        for reader in wait(list(listening), timeout=min(0.1, max(0.0, until - time.monotonic()))):
            rank = listening.pop(reader)
            try:
                reader.recv_bytes()  # any answer (it timed out too, or finished): not late
            except (EOFError, OSError):  # closed without a word: it died, and is late
                continue
            silent.discard(rank)
        if all(processes.state(procs[r].pid) in (None, "T", "t", "Z") for r in silent):
            break  # stopped or dead: nothing more will come
    late = {rank: whereabouts(procs[rank]) for rank in sorted(silent)}
    running = [rank for rank, what in late.items() if what.startswith("still running")]
    return late, stacks(procs, running, meeting)


# Under torchrun: one line per rank for a collective that failed (course_utils.train). The
# course's own frames in a traceback are those under this folder:
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# What a failed collective was doing: by strategy and part of the step, else by the part's name
OPERATIONS = {
    ("ddp", "backward"): "gradient all-reduce (backward)",
    ("fsdp", "backward"): "gradient reduce-scatter (backward)",
    "Metrics.record": "losses' all-reduce",
    "under_torchrun": "start (rank 0's checkpoint to resume)",
    "train_worker": "end of the run",
}


def collective_failure(err: BaseException) -> bool:
    """A collective or its store timed out or lost a peer: c10d's DistError, gloo's RuntimeError."""
    first = str(err).partition("\n")[0]
    return isinstance(err, dist.DistError) or (type(err) is RuntimeError and "gloo" in first)


def where_it_failed(parallel: str, timeout_s: float, rank: int, err: BaseException) -> str:
    """Rank, node, step (``loop.fit``'s, read from the traceback) and operation of a failed
    collective: ``rank 1 (node1): step 7 gradient all-reduce (backward) timed out after 5 s``."""
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    ours = [f for f in frames if f.f_code.co_filename.startswith(PACKAGE)]
    fit = next((f.f_locals for f in ours if f.f_code.co_name == "fit"), None)
    step = f"step {fit.get('first_step', 0) + fit.get('step', 0) + 1} " if fit else ""
    steps = [f for f in ours if not f.f_code.co_qualname.startswith("Mixed.")]  # --precision's
    part = steps[-1].f_code.co_qualname if steps else "?"  # wrapper is part of the step
    if part == "train_step":  # the default step: its backward, or its forward or update
        backward = any(f.f_code.co_name == "_engine_run_backward" for f in frames)
        part = "backward" if backward else "forward or update"
    what = OPERATIONS.get((parallel, part), OPERATIONS.get(part, part))
    first = str(err).strip().partition("\n")[0]
    reason = re.sub(r"^\[[^\]]*\] ", "", first).split(". ")[0]  # less gloo's "[file.cc:12] "
    timed_out = re.search(r"timed out|timeout", first, re.IGNORECASE)
    how = f"timed out after {timeout_s:g} s" if timed_out else "failed"
    return f"rank {rank} ({socket.gethostname()}): {step}{what} {how}: {reason}"
