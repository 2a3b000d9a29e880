"""Sharded data parallel (lesson 08): ZeRO-1/2/3 written by hand, then PyTorch's FSDP2, the bytes
each rank holds (between steps and at its peak during one), and the formulas they are checked
against.

Data parallel keeps a whole copy of the parameters, the gradients and the optimizer state on every
rank. ZeRO (Rajbhandari et al., 2020, arXiv:1910.02054) removes the copies: each of N ranks *owns*
1/N of every parameter (its shard) and keeps only what it needs for that shard.

- **ZeRO-1** shards the optimizer state. After backward, a ``reduce_scatter`` leaves on each rank
  the summed gradient of its shard only; the rank updates its shard (its share of momentum or Adam's
  moments is all it keeps); an ``all_gather`` of the new shards gives everyone the new parameters.
  A reduce-scatter plus an all-gather move exactly the bytes of one ring all-reduce: no extra cost.
- **ZeRO-2** shards the gradients too: each gradient is reduce-scattered the moment backward has
  produced it (a hook), and the whole gradient is dropped. Same communication as ZeRO-1.
- **ZeRO-3** shards the parameters: a layer's parameters are all-gathered just before the layer
  runs and dropped right after; backward gathers them again when it needs them. 1.5x the
  communication of DDP (an all-gather forward, one backward, a reduce-scatter), for 1/N of the state.

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, :func:`fully_sharded`) is ZeRO-3 (or 2,
with ``reshard_after_forward=False``) with parameters as sharded DTensors, one all-gather per
*unit* (a group of layers), prefetching of the next unit's all-gather and gradients
reduce-scattered per unit. ``--parallel fsdp`` shards one transformer block per unit
(:func:`apply`): a rank then holds whole only the block it computes, besides its shards. With
``--replicate R`` it is HSDP (:func:`hybrid_mesh`): shards over groups of consecutive ranks (a
node's), the groups replicas of one another, so that only gradients' shards cross between nodes.

:func:`zero1_step` (with :func:`shard_of` and :func:`padded`) is ZeRO-1 exactly as the lesson
writes it by hand, and :class:`ZeRO1`, :class:`ZeRO2`, :class:`ZeRO3` are the three stages over
one small base, :class:`ZeRO`. :func:`state_bytes` measures what a rank holds between steps,
:class:`PeakState` what it holds at the fullest moment of a step; :mod:`.probes` measures what
the lesson reads (what autograd saves, what FSDP sends, what a checkpoint stores).

Every optimizer the course uses (SGD with momentum, AdamW) works element by element, so updating
shards is the same arithmetic as updating whole tensors: the tests check the losses step by step.
"""

from course_utils.sharding import probes  # what a rank saves, sends and stores, measured
from course_utils.sharding.formulas import (
    ADAM_STATE_BYTES,
    GRAD_BYTES,
    PARAM_BYTES,
    ZERO_STAGES,
    comm_per_rank,
    memory_per_rank,
)
from course_utils.sharding.fsdp import (
    apply,
    fsdp_units,
    fully_sharded,
    grouped_units,
    hybrid_mesh,
)
from course_utils.sharding.state import PeakState, nbytes, state_bytes
from course_utils.sharding.zero import (
    ZERO_CLASSES,
    Traffic,
    ZeRO,
    ZeRO1,
    ZeRO2,
    ZeRO3,
    padded,
    shard_of,
    zero1_step,
)

__all__ = [
    "ADAM_STATE_BYTES",
    "GRAD_BYTES",
    "PARAM_BYTES",
    "ZERO_CLASSES",
    "ZERO_STAGES",
    "PeakState",
    "Traffic",
    "ZeRO",
    "ZeRO1",
    "ZeRO2",
    "ZeRO3",
    "apply",
    "comm_per_rank",
    "fsdp_units",
    "fully_sharded",
    "grouped_units",
    "hybrid_mesh",
    "memory_per_rank",
    "nbytes",
    "padded",
    "probes",
    "shard_of",
    "state_bytes",
    "zero1_step",
]
