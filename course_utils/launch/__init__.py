"""Running a function on N worker processes, from a notebook cell or a shell (lessons 03-12).

- :mod:`~course_utils.launch.runner`: :func:`run` starts the workers and brings their results
  (or the first error, with its rank and traceback) back to the caller;
- :mod:`~course_utils.launch.worker`: inside a worker: :func:`worker` (rank, device, backend),
  :func:`process_group`, :func:`exit_cleanly`;
- :mod:`~course_utils.launch.rendezvous`: where a launch's workers meet, and its clean-up; on
  loopback only, under torchrun too (:data:`TORCHRUN_ON_ONE_MACHINE`, :data:`TORCHRUN_ENV`);
- :mod:`~course_utils.launch.processes`: finding child processes (to watch or kill them);
- :mod:`~course_utils.launch.postmortem`: the errors, and what a failed or stuck worker leaves
  behind (its stack at the timeout, the signal that killed it, the rank a timed-out collective
  waited for).
"""

from course_utils.launch.postmortem import LaunchTimeout, WorkerError
from course_utils.launch.processes import alive, children
from course_utils.launch.rendezvous import TORCHRUN_ENV, TORCHRUN_ON_ONE_MACHINE
from course_utils.launch.runner import free_port, run
from course_utils.launch.worker import (
    GROUP_TIMEOUT_S,
    Worker,
    environment_error,
    exit_cleanly,
    launched,
    process_group,
    worker,
)

__all__ = [
    "GROUP_TIMEOUT_S",
    "LaunchTimeout",
    "TORCHRUN_ENV",
    "TORCHRUN_ON_ONE_MACHINE",
    "Worker",
    "WorkerError",
    "alive",
    "children",
    "environment_error",
    "exit_cleanly",
    "free_port",
    "launched",
    "process_group",
    "run",
    "worker",
]
