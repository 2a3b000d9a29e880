"""Collective communication (lesson 04): a ring all-reduce written with point-to-point messages,
a bandwidth probe, and the alpha-beta cost model that explains what the probe measures.

The ring all-reduce (Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", 2009; the algorithm behind NCCL and Horovod) cuts the tensor into N chunks and runs
two phases round a ring of ranks, each rank sending only to its right-hand neighbour:

1. **reduce-scatter**, N-1 steps: each step every rank passes one chunk on and adds the chunk it
   receives to its own; afterwards rank r holds the full sum of chunk (r + 1) mod N;
2. **all-gather**, N-1 steps: the finished chunks travel round the ring, overwriting stale ones.

Each rank sends 2(N-1) messages of size/N, so 2(N-1)/N x size bytes in all: nearly 2 x size,
however many ranks there are. The alpha-beta model prices that: every message pays a latency
alpha, every byte 1/beta, so ``t = 2(N-1) alpha + 2(N-1)/N x bytes / beta``.

Every function that communicates runs inside a worker whose default process group is initialised
(:func:`course_utils.launch.run`, or ``torchrun`` + :func:`course_utils.launch.process_group`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

FLOAT32_BYTES = 4


_buffers: dict = {}  # (dtype, device) -> a receive buffer, kept between calls


def _receive_buffer(like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor with room for ``like``, reused across calls: allocating tens of MB afresh
    each time costs page faults that can take as long as sending the data."""
    key = (like.dtype, like.device)
    if key not in _buffers or _buffers[key].numel() < like.numel():
        _buffers[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return _buffers[key][: like.numel()]


def ring_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place, like ``dist.all_reduce``, by a ring of send/recv."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size == 1:
        return tensor
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    chunks = torch.tensor_split(work.view(-1), world_size)  # N views; sizes differ by at most 1
    right, left = (rank + 1) % world_size, (rank - 1) % world_size

    buffer = _receive_buffer(chunks[0])  # room for the largest chunk

    def exchange(send_idx: int, into: torch.Tensor, tag: int) -> None:
        # isend returns at once, so every rank can post its send and then block on its receive
        # (all ranks calling a blocking send first would wait for each other forever).
        request = dist.isend(chunks[send_idx], dst=right, tag=tag)
        dist.recv(into, src=left, tag=tag)
        request.wait()

    for step in range(world_size - 1):  # reduce-scatter: add what arrives
        send_idx, recv_idx = (rank - step) % world_size, (rank - step - 1) % world_size
        received = buffer[: chunks[recv_idx].numel()]
        exchange(send_idx, received, tag=step)
        chunks[recv_idx].add_(received)
    # now chunks[(rank + 1) % world_size] is the full sum on this rank
    for step in range(world_size - 1):  # all-gather: finished chunks overwrite stale ones
        send_idx, recv_idx = (rank + 1 - step) % world_size, (rank - step) % world_size
        exchange(send_idx, chunks[recv_idx], tag=world_size + step)  # straight into place
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def ring_schedule(world_size: int) -> list[dict]:
    """The ring's steps, simulated without processes (for pictures and checks).

    Returns one dict per step: ``phase`` ("start", "reduce-scatter" or "all-gather"), ``sends``
    (a list of (src, dst, chunk)) and ``state``: ``state[rank][chunk]`` is the sorted tuple of the
    ranks whose contributions that rank's copy of the chunk holds after the step.
    """
    n = world_size
    state = [[frozenset({r}) for _ in range(n)] for r in range(n)]
    frozen = lambda s: [[tuple(sorted(c)) for c in row] for row in s]  # noqa: E731
    steps = [{"phase": "start", "sends": [], "state": frozen(state)}]
    for phase in ("reduce-scatter", "all-gather"):
        for step in range(n - 1):
            offset = -step if phase == "reduce-scatter" else 1 - step
            sends = [(r, (r + 1) % n, (r + offset) % n) for r in range(n)]
            new = [list(row) for row in state]
            for src, dst, chunk in sends:  # every rank sends at once: read the old state
                received = state[src][chunk]
                if phase == "reduce-scatter":
                    new[dst][chunk] = state[dst][chunk] | received  # add
                else:
                    new[dst][chunk] = received  # overwrite
            state = new
            steps.append({"phase": phase, "sends": sends, "state": frozen(state)})
    return steps


def ring_bytes_sent(nbytes: float, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: 2(N-1)/N x nbytes."""
    return 2 * (world_size - 1) / world_size * nbytes


def ring_cost(nbytes, world_size: int, alpha: float, beta: float):
    """Alpha-beta time of a ring all-reduce: 2(N-1) messages x alpha + 2(N-1)/N x bytes / beta."""
    return (
        2 * (world_size - 1) * alpha + ring_bytes_sent(np.asarray(nbytes, float), world_size) / beta
    )


def all_to_all_cost(sent_bytes, world_size: int, alpha: float, beta: float):
    """Alpha-beta time of an all-to-all in which a rank sends ``sent_bytes`` in all: one message
    to each other rank, ``(N - 1) alpha + bytes / beta`` (expert parallelism, lesson 10)."""
    return (world_size - 1) * alpha + sent_bytes / beta


@dataclass(frozen=True)
class AlphaBeta:
    """A fitted alpha-beta model of an all-reduce on ``world_size`` ranks."""

    alpha_s: float  # latency of one message, seconds
    beta_bytes_per_s: float  # bandwidth: bytes per second through each link
    world_size: int

    def predict(self, nbytes):
        """Predicted seconds for an all-reduce of ``nbytes`` (a number or an array)."""
        return ring_cost(nbytes, self.world_size, self.alpha_s, self.beta_bytes_per_s)


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float], world_size: int) -> AlphaBeta:
    """Least-squares fit of ``t = 2(N-1) alpha + 2(N-1)/N x bytes / beta`` to measurements.

    The squared errors are *relative* ((model - t) / t), so that a 1 KB point, which pins down
    alpha, weighs as much as a 64 MB one, which pins down beta; a plain fit would ignore the
    small sizes, microseconds next to milliseconds.
    """
    if world_size < 2:
        raise ValueError("one rank sends nothing: the model needs world_size >= 2")
    t = np.asarray(seconds, dtype=float)
    x = ring_bytes_sent(np.asarray(nbytes, dtype=float), world_size)
    A = np.stack(
        [np.full_like(x, 2 * (world_size - 1)), x], axis=1
    )  # (S, 2): t = A @ [alpha, 1/beta]
    (alpha, inv_beta), *_ = np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)
    # the fit can land a hair below 0 when latency is tiny next to the noise: clamp
    return AlphaBeta(max(float(alpha), 0.0), 1.0 / max(float(inv_beta), 1e-30), world_size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (every rank gets the total):
    ``dist.all_reduce`` as a function, e.g. for the metrics of :func:`course_utils.loop.fit`."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _device() -> torch.device:
    """Where this rank's tensors live: its GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


OPS = {"all_reduce": all_reduce_sum, "ring": ring_all_reduce}


def bandwidth_probe(
    sizes_bytes: Sequence[int],
    repeats: int = 5,
    op: str | Sequence[str] = "all_reduce",
    warmup: int = 1,
) -> list[dict]:
    """Time all-reduces of float32 tensors of each size; run it on every rank of a group.

    ``op``: "all_reduce" (``dist.all_reduce``), "ring" (:func:`ring_all_reduce`), or several,
    which then alternate (A B A B ...) so that a noisy machine affects them alike. Every timing
    starts after a barrier; a repeat's time is the slowest rank's (the collective is done only
    when every rank is done). Returns, identical on every rank, one dict per (op, size):
    ``{"op", "bytes", "seconds"}`` (the median over ``repeats``), ``"min_seconds"`` and
    ``"samples"`` (all of them).
    """
    ops = [op] if isinstance(op, str) else list(op)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}: choose from {sorted(OPS)}")
    device = _device()
    times = torch.zeros(len(ops), len(sizes_bytes), repeats, dtype=torch.float64)
    for j, nbytes in enumerate(sizes_bytes):
        tensor = torch.zeros(max(1, int(nbytes) // FLOAT32_BYTES), device=device)  # sums stay 0
        for _ in range(warmup):  # first touches of the memory and of gloo's buffers
            for name in ops:
                OPS[name](tensor)
        for k in range(repeats):
            for i, name in enumerate(ops):
                dist.barrier()
                start = time.perf_counter()
                OPS[name](tensor)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # GPU collectives return before they finish
                times[i, j, k] = time.perf_counter() - start
    times = times.to(device)  # NCCL reduces GPU tensors only
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank; the same list on every rank
    samples = times.cpu().tolist()  # (ops, sizes, repeats)
    return [
        {
            "op": name,
            "bytes": max(1, int(nbytes) // FLOAT32_BYTES) * FLOAT32_BYTES,
            "seconds": statistics.median(samples[i][j]),
            "min_seconds": min(samples[i][j]),
            "samples": samples[i][j],
        }
        for i, name in enumerate(ops)
        for j, nbytes in enumerate(sizes_bytes)
    ]
