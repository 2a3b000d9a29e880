"""What this machine has, and which device, backend and thread budget each worker gets.

On a CPU-only machine, worker *processes* stand in for devices and talk over gloo; with GPUs, one
process drives one GPU (``cuda:LOCAL_RANK``) and talks over NCCL. Everything else in the course asks
this module, so no lesson hard-codes ``"cuda"``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch


def num_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def num_gpus() -> int:
    """Number of CUDA devices visible to this process (0 on a laptop without one)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


DEVICES = ("auto", "cpu", "cuda")  # the choices of --device


def device_kind(device: str = "auto", nproc: int = 1) -> str:
    """What ``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``) means here for ``nproc`` workers on
    this machine: ``"cuda"`` or ``"cpu"``. ``"auto"`` is CUDA only when there is a GPU for every
    worker, so that workers of one run never mix GPUs and CPUs."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if 0 < nproc <= num_gpus() else "cpu"
    if device == "cuda" and num_gpus() == 0:
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is visible here")
    return device


def backend(kind: str = "auto") -> str:
    """The torch.distributed backend for a device kind: ``nccl`` for GPUs, ``gloo`` for CPUs."""
    return "nccl" if device_kind(kind) == "cuda" else "gloo"


def device(local_rank: int = 0, kind: str = "auto") -> torch.device:
    """The device a worker with this *local* rank uses (never the global rank: on a job's second
    machine, global rank 4 drives cuda:0)."""
    if device_kind(kind) == "cuda":
        return torch.device("cuda", local_rank % num_gpus())
    return torch.device("cpu")


def threads_per_worker(nproc: int, cores: int | None = None) -> int:
    """Torch threads for each of ``nproc`` workers so they share the cores without oversubscribing."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    cores = num_cores() if cores is None else cores
    return max(1, cores // nproc)


def wait_policy() -> str:
    """How this process's OpenMP threads wait between parallel regions, in a few words: PASSIVE
    (they sleep, and give the core back) unless the environment says otherwise or torch was
    imported before ``course_utils`` set it (OpenMP reads the setting once, when torch loads)."""
    import course_utils

    policy = os.environ.get("OMP_WAIT_POLICY", "").upper() or "ACTIVE (OpenMP's default)"
    if course_utils.TORCH_LOADED_FIRST and not _inherited_policy():
        return (
            "ACTIVE: torch was imported before course_utils, so OpenMP kept its busy-waiting "
            "threads (import course_utils first, or start Jupyter with `make lab`)"
        )
    return policy


def _inherited_policy() -> bool:
    """Whether OMP_WAIT_POLICY was already in the environment this process started with."""
    try:
        with open(f"/proc/{os.getpid()}/environ", "rb") as f:
            return b"OMP_WAIT_POLICY=" in f.read()
    except OSError:
        return False


@dataclass
class MachineInfo:
    """A summary of the machine, printed by notebook 00."""

    python: str
    torch: str
    cores: int
    gpus: int
    gpu_names: list[str]
    backend: str
    device: str
    torch_threads: int
    omp_wait_policy: str


def summary() -> MachineInfo:
    """Describe this machine: cores, GPUs, and the backend and device the course will use."""
    gpus = num_gpus()
    return MachineInfo(
        python=platform.python_version(),
        torch=torch.__version__,
        cores=num_cores(),
        gpus=gpus,
        gpu_names=[torch.cuda.get_device_name(i) for i in range(gpus)],
        backend=backend(),
        device=str(device()),
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=wait_policy(),
    )


def describe() -> str:
    """One line per fact of :func:`summary`, for printing."""
    return "\n".join(f"{k:>14}: {v}" for k, v in asdict(summary()).items())


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of bf16 arithmetic units (oneDNN uses them)


def bf16_units(cpuinfo: str | None = None) -> list[str] | None:
    """The bf16 arithmetic flags this CPU reports (``avx512_bf16``, ``amx_bf16``) in
    ``/proc/cpuinfo`` (or the given text): ``[]`` when it reports none, ``None`` when this
    system has no ``/proc/cpuinfo`` to read (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set(cpuinfo.split())
    return [flag for flag in BF16_FLAGS if flag in flags]
