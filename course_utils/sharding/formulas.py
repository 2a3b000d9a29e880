"""The bytes of sharded data parallel by the ZeRO paper's formulas: what each rank holds and sends
per step, stage by stage (what a rank really holds is measured in :mod:`.state`)."""

from __future__ import annotations

import numpy as np

# Mixed-precision Adam, as in the ZeRO paper: fp16 weights (2 bytes) and gradients (2 bytes) per
# parameter, plus K = 12 bytes of optimizer state (fp32 master weights, momentum and variance).
PARAM_BYTES, GRAD_BYTES, ADAM_STATE_BYTES = 2, 2, 12
ZERO_STAGES = {
    0: "DDP: everything replicated",
    1: "ZeRO-1: optimizer state sharded",
    2: "ZeRO-2 / FSDP SHARD_GRAD_OP: + gradients sharded",
    3: "ZeRO-3 / FSDP FULL_SHARD: + parameters sharded",
}
_SHARDED = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 1), 3: (1, 1, 1)}  # (weights, grads, optimizer)


def _stage(stage: int) -> int:
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {sorted(ZERO_STAGES)}, got {stage}")
    return stage


def memory_per_rank(
    num_params,
    world_size,
    stage: int,
    param_bytes: float = PARAM_BYTES,
    grad_bytes: float = GRAD_BYTES,
    optimizer_bytes: float = ADAM_STATE_BYTES,
):
    """Bytes of model state (weights, gradients, optimizer state) per rank under ZeRO ``stage``.

    The ZeRO paper's Figure 1: stage 0 keeps all of it on every rank; stage 1 divides the optimizer
    state by the world size N, stage 2 the gradients too, stage 3 everything. Activations and
    temporary buffers are not included. Scalars or arrays (broadcast)."""
    psi, n = np.asarray(num_params, dtype=float), np.asarray(world_size, dtype=float)
    if np.any(n < 1):
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    total = 0.0
    for part_bytes, is_sharded in zip(
        (param_bytes, grad_bytes, optimizer_bytes), _SHARDED[_stage(stage)]
    ):
        total = total + psi * part_bytes / (n if is_sharded else 1.0)
    total = np.broadcast_to(total, np.broadcast(psi, n).shape).copy()  # stage 0 ignores n
    return float(total) if total.ndim == 0 else total


def comm_per_rank(num_params, world_size, stage: int, bytes_per_value: float = 4) -> float:
    """Bytes each rank sends per step under ZeRO ``stage`` with ring collectives: an all-reduce
    (stage 0) or a reduce-scatter plus an all-gather (stages 1, 2) each send 2(N-1)/N of the
    gradients' bytes; stage 3 gathers the weights twice (forward, backward): 3(N-1)/N."""
    n = world_size
    passes = 3 if _stage(stage) == 3 else 2
    return passes * (n - 1) / n * num_params * bytes_per_value
