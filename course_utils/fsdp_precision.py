"""Precision on the wire and in memory (lesson 15): FSDP2 under ``--precision bf16``, whose
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
(:func:`course_utils.precision.fsdp_policy`) gathers bfloat16 parameters and reduce-scatters
float32 gradients, against float32 throughout, on the launcher's workers (no cluster needed).

:func:`measure` trains the transformer both ways from the same weights and batches and counts
what each rank hands to FSDP2's collectives, by dtype, what it holds between steps and at a
step's fullest, the losses and the accuracy; :func:`handed` is what those collectives must be
handed, by definition. A CPU without bfloat16 units (:func:`course_utils.hardware.bf16_units`)
runs a bf16 step several times slower than float32: these measure bytes and accuracy, not speed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from course_utils import data, loop, models, precision, sharding

KINDS = ("fp32", "bf16")  # the --precision choices FSDP takes (fp16's scaler can't shard)


@contextmanager
def _counted():
    """The bytes this process hands to ``all_gather_single`` and ``reduce_scatter_single`` (FSDP2
    calls them through ``torch.distributed``) while the block runs: ``{"all-gather float32":
    bytes, ...}``, by collective and dtype."""
    handed, gather, scatter = Counter(), dist.all_gather_single, dist.reduce_scatter_single

    def count(what: str, tensor: torch.Tensor) -> None:
        handed[f"{what} {str(tensor.dtype).removeprefix('torch.')}"] += tensor.nbytes

    def counted_gather(output, input, **options):
        count("all-gather", input)
        return gather(output, input, **options)

    def counted_scatter(output, input, **options):
        count("reduce-scatter", input)
        return scatter(output=output, input=input, **options)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_scatter
    try:
        yield handed
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = gather, scatter


def handed(kind: str, world_size: int) -> dict[str, int]:
    """What one ``--parallel fsdp`` step of the transformer hands its collectives on each rank
    under ``--precision kind``, by definition. FSDP2 pads each parameter's first dimension to a
    multiple of N and shards it N ways: a rank's shard of a unit is the sum of ceil(rows/N) x
    the rest. Forward gathers every unit's, backward the blocks' again (the root stays gathered
    through backward), each in the policy's ``param_dtype``; each unit reduce-scatters its
    gradient, N shards, in ``reduce_dtype`` (float32 under every policy)."""
    model, policy = models.build("transformer"), precision.fsdp_policy(kind)
    shard = lambda m: sharding.probes.fsdp_bytes_on_rank(m, world_size, 0, 1, 0)  # noqa: E731
    dtype = policy.param_dtype if policy else torch.float32
    gathered = dtype.itemsize * (shard(model) + shard(model.blocks))
    return {
        f"all-gather {str(dtype).removeprefix('torch.')}": gathered,
        "reduce-scatter float32": 4 * world_size * shard(model),
    }


def measure(
    steps: int, batch_size: int = 64, eval_samples: int = 1000, kinds: Sequence[str] = KINDS
) -> dict[str, dict]:
    """In each worker of a launch (:func:`course_utils.launch.run`): the transformer sharded as
    ``--parallel fsdp`` shards it (:func:`course_utils.sharding.apply`), trained ``steps`` steps
    from the same weights and batches under each ``--precision`` of ``kinds``: the bytes this
    rank handed to each collective per step (``handed``, named as :func:`handed` names
    them), what it holds between steps (``held``) and at a step's fullest (``peak``), the global
    ``losses`` and the ``accuracy`` on the first ``eval_samples`` test images."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world_size = dist.get_rank(), dist.get_world_size()
    (X, y), (X_test, y_test) = data.mnist("train"), data.mnist("test")
    runs = {}
    for kind in kinds:
        mesh = init_device_mesh("cpu", (world_size,))
        model = sharding.apply(models.build("transformer", seed=0), mesh, precision=kind)
        optimizer = models.make_optimizer(model, 1e-3, "adamw")  # as the placement runs
        amp, losses = precision.Mixed(kind), []
        with _counted() as counts, sharding.PeakState(model, optimizer) as peak:
            for X_b, y_b in data.batches(X, y, batch_size, steps, 0, rank, world_size):
                loss, _ = loop.train_step(model, optimizer, X_b, y_b, amp=amp)
                dist.all_reduce(loss)
                losses.append(loss.item() / world_size)
        held = sharding.state_bytes(model.parameters(), optimizer)["total"]
        with torch.no_grad(), amp.autocast("cpu"):
            accuracy = loop.evaluate(model, X_test[:eval_samples], y_test[:eval_samples])
        per_step = {what: n / steps for what, n in counts.items()}
        runs[kind] = {"handed": per_step, "held": held, "peak": peak.bytes["total"]}
        runs[kind] |= {"losses": losses, "accuracy": accuracy}
    return runs
