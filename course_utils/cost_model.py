"""Cost models of parallel training, the numbers behind lessons 12 and 13's answers: what one
data-parallel step costs in compute and in communication (:func:`data_parallel_times`, their
ratio), and what a layout of ``stages x replicas`` devices costs in time and memory
(:func:`plan`), from which a small decision guide picks data, pipeline or both
(:func:`choose_parallelism`). Communication follows the same alpha-beta model as lesson 04
(memory under ZeRO / FSDP: :mod:`course_utils.sharding`). Pure functions of numbers: no processes.

Units: bytes, seconds, floating-point operations (FLOPs). A training step costs about 3x the
forward pass's FLOPs (the backward pass computes two gradients per layer, ~2x the forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from course_utils.collectives import ring_cost

BACKWARD_FACTOR = 3.0  # forward + backward ≈ 3 x forward FLOPs


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


def transformer_job(
    num_params: float,
    bandwidth: float,
    layers: int = 24,
    tokens: int = 1024,
    batch_size: int = 64,
    device_memory: float = 80e9,
    device_flops: float = 200e12,
    alpha: float = 10e-6,
    num_microbatches: int = 8,
) -> dict:
    """The keyword arguments of :func:`plan` for a GPT-like transformer of ``num_params``
    parameters on links of ``bandwidth`` bytes/s: about ``12 hidden^2`` parameters per layer,
    2 FLOPs per parameter per token, ``34 x tokens x hidden`` bytes of fp16 activations per layer
    (Korthikanti et al., 2022), and one ``(tokens, hidden)`` fp16 tensor between stages."""
    hidden = math.sqrt(num_params / (12 * layers))
    return dict(
        num_params=num_params,
        flops_per_sample=2 * num_params * tokens,
        activation_bytes_per_sample=34 * tokens * hidden * layers,
        boundary_bytes_per_sample=2 * tokens * hidden,
        batch_size=batch_size,
        device_memory=device_memory,
        device_flops=device_flops,
        alpha=alpha,
        beta=bandwidth,
        num_microbatches=num_microbatches,
    )
