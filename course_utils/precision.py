"""Mixed precision (``--precision``): fewer bits a number for the arithmetic and on the wire,
with the weights the optimizer steps kept in float32.

- ``fp32``: the course's arithmetic, every tensor float32 (the default; the step is unchanged).
- ``bf16``: the forward runs under ``torch.autocast`` with bfloat16: matrix products and
  convolutions take bfloat16 copies of their inputs and weights and return bfloat16, while
  reductions that lose accuracy (the loss, softmax, norms) stay float32. The parameters stay
  float32 (the *master weights*): their gradients arrive in float32 and the optimizer steps them
  in float32, so an update smaller than bfloat16's resolution (8 bits of mantissa, a relative
  step of 2**-8) is not lost. bfloat16 has float32's exponent range: nothing overflows, no
  scaling is needed.
- ``fp16``: autocast with float16, whose 5-bit exponent flushes small gradients to zero (below
  about 6e-8) and overflows above 65504. *Loss scaling* (``torch.amp.GradScaler``) multiplies
  the loss by a scale S before backward, so that every gradient is S times larger and small ones
  survive in float16; the float32 gradients are divided by S (unscaled) before the optimizer
  steps. A step whose gradients hold an inf or NaN (S was too large) is skipped and S is halved;
  after ``growth_interval`` good steps in a row S doubles.

With ``--parallel fsdp --precision bf16`` FSDP2 applies the precision at the module level
(:func:`fsdp_policy`, a ``MixedPrecisionPolicy``): each unit's float32 shards are cast to bfloat16
*before* the all-gather, so the gathered parameters and the bytes gathered are half of float32's;
the gradients are reduce-scattered in float32 (``reduce_dtype``), the same bytes as without the
policy, and land on the float32 shards the optimizer steps. What a rank holds between steps is
unchanged (float32 shards, gradients and optimizer state); a gathered unit is half as large.

A CPU without AVX-512 (``avx512_bf16``) has no bfloat16 arithmetic: autocast then converts to
float32 and back around every product, and a bfloat16 step is several times *slower* than float32
(lesson 10 measured 11x). On such CPUs measure bytes and accuracy, not speed.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

KINDS = ("fp32", "bf16", "fp16")  # --precision's choices
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Strategies whose step is the loop's own (loop.train_step), which autocasts and scales
STEPPED_BY_LOOP = ("none", "ddp", "fsdp")


class Mixed:
    """How :func:`course_utils.loop.train_step` runs one step in precision ``kind``: the context
    the forward runs in (:meth:`autocast`), what backward starts from (:meth:`backward`) and how
    the optimizer steps (:meth:`step`). With ``fp16`` it owns the loss scaler (made on the first
    step, on the batch's device); ``skipped`` counts the steps the scaler skipped."""

    def __init__(self, kind: str = "fp32", init_scale: float = 2.0**16, growth_interval=2000):
        if kind not in KINDS:
            raise ValueError(f"precision {kind!r}: use one of {', '.join(KINDS)}")
        self.kind, self.init_scale, self.growth_interval = kind, init_scale, growth_interval
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped = 0

    def autocast(self, device_type: str):
        """The context of the forward: autocast to bf16 or fp16, nothing for fp32."""
        if self.kind == "fp32":
            return nullcontext()
        return torch.autocast(device_type, dtype=DTYPES[self.kind])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward from ``loss``, times the scale under fp16 (made on ``loss``'s device)."""
        if self.kind == "fp16":
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(
                    loss.device.type,
                    init_scale=self.init_scale,
                    growth_interval=self.growth_interval,
                )
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step; under fp16 the gradients unscaled first, the step skipped if
        any is inf or NaN, and the scale updated (halved after a skip)."""
        if self.scaler is None:
            optimizer.step()
            return
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)  # unscale_, check for inf/NaN, step unless found
        self.scaler.update()
        self.skipped += self.scaler.get_scale() < scale  # the scale backs off after a skip only


FP32 = Mixed("fp32")  # the default: no autocast, no scaler (stateless, shared)


def fsdp_policy(kind: str):
    """FSDP2's ``MixedPrecisionPolicy`` for ``kind``: under bf16, parameters gathered and
    computed in bfloat16 and gradients reduced in float32; None (float32 throughout) otherwise."""
    if kind != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def config_error(cfg) -> str | None:
    """Why ``cfg``'s ``--precision`` can't run (one line), or None."""
    if cfg.precision not in KINDS:
        return f"--precision {cfg.precision}: use one of {', '.join(KINDS)}"
    if cfg.precision == "fp32":
        return None
    flag = f"--precision {cfg.precision}"
    if cfg.parallel not in STEPPED_BY_LOOP or max(cfg.tp, cfg.cp, cfg.ep) > 1:
        return (
            f"{flag} is for --parallel none, ddp or fsdp without --tp, --cp or --ep (the loop's "
            f"own step autocasts); this run is {cfg.parallel}"
        )
    if cfg.precision == "fp16" and cfg.parallel == "fsdp":
        return (
            f"{flag} with --parallel fsdp: the loss scaler's inf check would see only this "
            "rank's shard of the gradients, and the ranks could disagree on skipping a step; "
            "use --precision bf16 (no scaling needed)"
        )
    if cfg.precision == "fp16" and getattr(cfg, "compress", "none") != "none":
        return (
            f"{flag} with --compress {cfg.compress}: compression would see the scaled "
            "gradients (and keep residuals across changes of the scale); use --precision bf16"
        )
    return None
