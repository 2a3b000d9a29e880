"""The numbers behind lesson 07's answers: memory per GPU under ZeRO / FSDP, the compute-to-
communication ratio of data parallelism, and a small decision guide (data, pipeline or both)
driven by the same alpha-beta cost model as lesson 04. Pure functions of numbers: no processes.

Units: bytes, seconds, floating-point operations (FLOPs). A training step costs about 3x the
forward pass's FLOPs (the backward pass computes two gradients per layer, ~2x the forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from course_utils.collectives import ring_cost

# Mixed-precision Adam, as in the ZeRO paper: fp16 weights (2 bytes) and gradients (2 bytes) per
# parameter, plus K = 12 bytes of optimizer state (fp32 master weights, momentum and variance).
PARAM_BYTES, GRAD_BYTES, ADAM_STATE_BYTES = 2, 2, 12
ZERO_STAGES = {
    0: "DDP: everything replicated",
    1: "ZeRO-1: optimizer state sharded",
    2: "ZeRO-2 / FSDP SHARD_GRAD_OP: + gradients sharded",
    3: "ZeRO-3 / FSDP FULL_SHARD: + parameters sharded",
}
BACKWARD_FACTOR = 3.0  # forward + backward ≈ 3 x forward FLOPs


def zero_memory_per_gpu(
    num_params,
    world_size,
    stage: int,
    param_bytes: float = PARAM_BYTES,
    grad_bytes: float = GRAD_BYTES,
    optimizer_bytes: float = ADAM_STATE_BYTES,
):
    """Bytes of model state (weights, gradients, optimizer state) per GPU under ZeRO ``stage``.

    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
    (2020), Figure 1: stage 0 keeps all of it on every GPU; stage 1 divides the optimizer state by
    the world size N, stage 2 the gradients too, stage 3 (FSDP's full sharding) everything.
    Activations and temporary buffers are not included. Scalars or arrays (broadcast)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {sorted(ZERO_STAGES)}, got {stage}")
    psi, n = np.asarray(num_params, dtype=float), np.asarray(world_size, dtype=float)
    if np.any(n < 1):
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    sharded = {
        0: (0.0, 0.0, 0.0),
        1: (0.0, 0.0, 1.0),
        2: (0.0, 1.0, 1.0),
        3: (1.0, 1.0, 1.0),
    }[stage]  # which of (weights, gradients, optimizer state) are divided by N
    total = 0.0
    for part_bytes, is_sharded in zip((param_bytes, grad_bytes, optimizer_bytes), sharded):
        total = total + psi * part_bytes / (n if is_sharded else 1.0)
    total = np.broadcast_to(total, np.broadcast(psi, n).shape).copy()  # stage 0 ignores n
    return float(total) if total.ndim == 0 else total


def data_parallel_times(
    flops_per_sample: float,
    batch_per_worker,
    device_flops: float,
    num_params: float,
    world_size: int,
    alpha: float,
    beta: float,
    grad_bytes: float = 4,
) -> dict:
    """Compute and communication time of one data-parallel step under the alpha-beta model.

    ``compute_s``: ``3 x flops_per_sample x batch_per_worker / device_flops``; ``comm_s``: a ring
    all-reduce of the gradients (``num_params x grad_bytes``, fp32 by default) on ``world_size``
    ranks; ``ratio = compute_s / comm_s``. Above 1, compute dominates and more workers pay off;
    below 1, workers mostly wait for the network. ``batch_per_worker`` may be an array."""
    batch = np.asarray(batch_per_worker, dtype=float)
    compute = BACKWARD_FACTOR * flops_per_sample * batch / device_flops
    comm = (
        float(ring_cost(num_params * grad_bytes, world_size, alpha, beta))
        if world_size > 1
        else 0.0
    )
    ratio = compute / comm if comm > 0 else np.full_like(compute, np.inf)
    if batch.ndim == 0:
        return {"compute_s": float(compute), "comm_s": comm, "ratio": float(ratio)}
    return {"compute_s": compute, "comm_s": comm, "ratio": ratio}


@dataclass(frozen=True)
class Plan:
    """One way to lay a training job out on ``stages x replicas`` devices, and its modelled cost."""

    strategy: str  # "data", "pipeline", "both", or "does not fit"
    stages: int  # pipeline stages (1: no pipeline)
    replicas: int  # data-parallel replicas of the pipeline (1: no data parallelism)
    step_s: float  # modelled seconds per step (inf when it does not fit)
    memory_per_device: float  # bytes of model state + activations on the busiest device
    reason: str


def plan(
    stages: int,
    replicas: int,
    num_params: float,
    flops_per_sample: float,
    activation_bytes_per_sample: float,
    boundary_bytes_per_sample: float,
    batch_size: int,
    device_memory: float,
    device_flops: float,
    alpha: float,
    beta: float,
    num_microbatches: int = 8,
    state_bytes_per_param: float = 16,
    overlap: bool = True,
) -> Plan:
    """The modelled step time and memory of ``stages`` pipeline stages x ``replicas`` replicas.

    Assumes the layers split evenly into stages. Per step: the compute (``3 x flops x batch``,
    divided over all devices) stretched by the pipeline bubble ``(m + S - 1) / m`` (GPipe, lesson
    06); ``2 (S - 1)`` activation transfers of one microbatch on the critical path (forward and
    backward); and a ring all-reduce of each stage's gradients (fp32) among its replicas, of which
    only what outlasts the backward pass (2/3 of the compute) shows with ``overlap`` (DDP sends
    gradient buckets while backward still runs, lesson 05). Memory:
    the stage's share of the state (``state_bytes_per_param``: 16 for fp32 Adam, 4+4+8) and of
    the activations of the replica's samples (GPipe keeps every microbatch's until backward)."""
    S, R, m = stages, replicas, num_microbatches
    # a stage keeps its share of the state, and its layers' activations for the replica's samples
    memory = (num_params * state_bytes_per_param + activation_bytes_per_sample * batch_size / R) / S
    label = "data" if S == 1 else "pipeline" if R == 1 else "both"
    if batch_size % R or (S > 1 and (batch_size // R) % m):
        return Plan(label, S, R, math.inf, memory, "the batch does not split evenly")
    if memory > device_memory:
        return Plan(label, S, R, math.inf, memory, "the state and activations do not fit")
    compute = BACKWARD_FACTOR * flops_per_sample * batch_size / (S * R * device_flops)
    bubble = (m + S - 1) / m if S > 1 else 1.0
    microbatch = batch_size / R / (m if S > 1 else 1)
    sends = 2 * (S - 1) * (alpha + boundary_bytes_per_sample * microbatch / beta)
    all_reduce = ring_cost(num_params * 4 / S, R, alpha, beta) if R > 1 else 0.0
    exposed = max(float(all_reduce) - 2 / 3 * compute, 0.0) if overlap else float(all_reduce)
    step = compute * bubble + sends + exposed
    reason = (
        f"compute {compute * bubble * 1e3:.3g} ms (bubble x{bubble:.2f}), "
        f"activations {sends * 1e3:.3g} ms, gradients {float(all_reduce) * 1e3:.3g} ms "
        f"({exposed * 1e3:.3g} ms not hidden behind backward)"
    )
    return Plan(label, S, R, step, memory, reason)


def choose_parallelism(num_devices: int, **job) -> Plan:
    """The decision guide: among every ``stages x replicas = num_devices`` layout that fits in
    memory, the one with the smallest modelled step time (ties go to fewer stages: simpler).

    ``job``: the keyword arguments of :func:`plan` other than ``stages`` and ``replicas``.
    Returns a ``"does not fit"`` plan when no layout fits: then shard the state (ZeRO-3 / FSDP)
    or split layers themselves (tensor parallelism)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    layouts = [(s, num_devices // s) for s in range(1, num_devices + 1) if num_devices % s == 0]
    plans = [plan(s, r, **job) for s, r in layouts]
    best = min(plans, key=lambda p: (p.step_s, p.stages))
    if math.isinf(best.step_s):
        smallest = min(plans, key=lambda p: p.memory_per_device)
        return Plan(
            "does not fit",
            smallest.stages,
            smallest.replicas,
            math.inf,
            smallest.memory_per_device,
            "no layout fits: shard the state (ZeRO-3 / FSDP) or split the layers (tensor parallel)",
        )
    return best
