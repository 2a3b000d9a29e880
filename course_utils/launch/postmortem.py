"""What a worker that failed or got stuck leaves behind, for the launcher's errors
(:class:`WorkerError`, :class:`LaunchTimeout`): the Python stack of a worker still running at the
launch's timeout (``faulthandler``, on SIGUSR1: see :func:`course_utils.launch.worker.child_main`),
and the signal that killed one that died."""

from __future__ import annotations

import os
import signal
import time


class WorkerError(RuntimeError):
    """A worker raised (or died): carries its ``rank``, the ``kind`` of error (the exception's
    class name), its ``message`` and the worker's own traceback."""

    def __init__(self, rank: int, message: str, worker_traceback: str = "", kind: str = ""):
        self.rank, self.kind, self.message = rank, kind, message
        self.worker_traceback = worker_traceback
        text = f"worker rank {rank} failed: {f'{kind}: ' if kind else ''}{message}"
        if worker_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{worker_traceback}"
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
    proc.join(1.0)
    code, how = proc.exitcode, f"exited with code {proc.exitcode}"
    if code is not None and code < 0 and -code in signal.valid_signals():
        how = f"was killed by {signal.Signals(-code).name} (exit code {code})"
        if -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            how += ": a crash inside C++ (its stderr says more)"
    return WorkerError(rank, f"process {how} before sending a result")
