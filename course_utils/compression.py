"""Gradient compression for data parallel (lesson 15): fewer bytes on a slow link, for a
gradient that is no longer exactly the average, as DDP communication hooks.

DDP hands each bucket of gradients (a flat tensor, ``bucket.buffer()``) to a *communication hook*
``hook(state, bucket) -> Future``, whose result becomes the bucket's averaged gradients. The
default hook all-reduces the bucket as it is: 4 bytes a float32 value. The hooks here send less:

- ``bf16`` (PyTorch's ``bf16_compress_hook``): every gradient rounded to bfloat16 (8 bits of
  mantissa instead of 24), divided by the number of ranks, all-reduced in bfloat16 and copied back
  into the float32 bucket: half the bytes, each value off by at most about 0.4%. Nothing is kept
  from step to step.
- ``powersgd:R`` (PyTorch's ``PowerSGDState`` and ``powerSGD_hook``): each gradient matrix M
  (n x m, a layer's weights' gradient) is sent as two thin ones, P = M Q (n x R) and then
  Q = M^T P (m x R), all-reduced one after the other with P orthogonalized between them; every
  rank rebuilds P Q^T, the best rank-R view of the average that one step of power iteration
  finds. (n + m) R values instead of n m. Vectors (biases, norms), and matrices too small to
  gain ``min_compression_rate`` (2) times, go uncompressed. Q is reused from the step before
  (warm start), so the power iteration carries on across steps.
- ``topk:F`` (by hand): each rank sends only the k = ceil(F n) entries of its bucket (n values)
  with the largest magnitude, with their positions; every rank adds up everyone's (value,
  position) pairs and divides by the number of ranks.
- ``sign`` (by hand, 1-bit SGD): each rank sends one bit a value, the sign of its gradient (0
  counts as positive), and one scale for the bucket, the mean magnitude; the average is the mean
  over ranks of scale x sign.

**Error feedback** (PowerSGD, top-k, sign). What a rank did not send is not thrown away: each
rank keeps the difference between what it meant to send and what its message carried, its
*residual* e, and adds it to its next step's gradient before compressing (v = g + e, then e = v -
what was sent). So every part of every gradient is sent eventually, only late: over T steps the
sum of what was sent plus the residual left over is exactly the sum of the gradients. A direction
that a compressor keeps missing grows in e until it is large enough to be sent. That is why these
biased compressors still converge, for smooth losses at plain SGD's rate once the delay is paid
(Stich et al. 2018 for top-k; Karimireddy et al. 2019, "Error feedback fixes SignSGD"), where
without the residual top-k and 1-bit SGD can stall or settle somewhere else. PowerSGD keeps e
per bucket inside its state; the hand-written hooks keep it per parameter (DDP regroups its
buckets after the first step, and a parameter's residual must follow it). PowerSGD's own first
``start_iter`` steps (2: before DDP has regrouped) are plain all-reduces.

All four run on gloo (CPU; tests/test_compression.py). PyTorch's ``bf16_compress_hook`` can't
be registered under its own name without CUDA (see :func:`bf16`), and gloo's all-gather takes
the concatenated form only (``all_gather_single`` into one flat tensor).

Every hook's state is a :class:`Tally`: the bytes this rank hands to its collectives each step
(``sent``, one number a step), what the lesson and the benchmark compare with the link's counters.
An all-reduce of b bytes over a ring of N ranks sends 2 (N - 1) / N x b from each rank, an
all-gather (top-k, sign) (N - 1) x b: both b for two ranks.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

KINDS = ("none", "bf16", "powersgd", "topk", "sign")  # --compress's choices: powersgd:R, topk:F
STATEFUL = ("powersgd", "topk", "sign")  # with error feedback: residuals that live between steps
# Every process group a hook uses, held until the process ends. A hook's callbacks run on the
# group's own threads and their closures hold the group (PyTorch's PowerSGD captures it): were the
# last reference to go there, after destroy_process_group, the group's destructor would join the
# thread it runs on ("Resource deadlock avoided", SIGABRT).
_HELD: list = []
SHIFTS = torch.arange(8, dtype=torch.int32)  # bit i of a packed byte holds sign i (1: positive)


@dataclass(frozen=True)
class Spec:
    """One ``--compress`` value: its kind, PowerSGD's rank and top-k's fraction."""

    kind: str = "none"
    rank: int = 0  # powersgd:R, the rank of P and Q
    fraction: float = 0.0  # topk:F, the share of each bucket's values sent


def parse(text: str) -> Spec:
    """``"none"``, ``"bf16"``, ``"powersgd:R"`` (R >= 1), ``"topk:F"`` (0 < F <= 1) or
    ``"sign"`` as a :class:`Spec`; raises ValueError (one line) for anything else."""
    kind, _, arg = text.partition(":")
    usage = f"--compress {text}: use none, bf16, powersgd:R (R a rank: 1, 2, 4), topk:F (F a share"
    usage += " of the values, 0 < F <= 1, e.g. topk:0.01) or sign"
    if kind not in KINDS or bool(arg) != (kind in ("powersgd", "topk")):
        raise ValueError(usage)
    try:
        if kind == "powersgd" and int(arg) >= 1:
            return Spec(kind, rank=int(arg))
        if kind == "topk" and 0 < float(arg) <= 1:
            return Spec(kind, fraction=float(arg))
    except ValueError:
        raise ValueError(usage) from None
    if kind in ("powersgd", "topk"):
        raise ValueError(usage)
    return Spec(kind)


def config_error(cfg) -> str | None:
    """Why ``cfg`` (a :class:`~course_utils.config.RunConfig`) can't compress, in one line, or
    None: compression reshapes DDP's buckets, so it is for ``--parallel ddp`` alone, over at least
    two replicas. Error feedback keeps residuals on every rank that checkpoints don't hold, so a
    resumed run would not continue exactly: those hooks are refused with ``--checkpoint``."""
    try:
        spec = parse(cfg.compress)
    except ValueError as err:
        return str(err)
    if spec.kind == "none":
        return None
    inner = [
        f"--{axis} {n}" for axis, n in (("tp", cfg.tp), ("cp", cfg.cp), ("ep", cfg.ep)) if n > 1
    ]
    if cfg.parallel != "ddp" or inner:
        this = " ".join([f"--parallel {cfg.parallel}", *inner])
        return (
            f"--compress is for --parallel ddp alone (DDP's gradient buckets); this run is {this}"
        )
    if cfg.nproc < 2:
        return (
            f"--compress {cfg.compress} needs 2 or more DDP replicas (--nproc); one sends nothing"
        )
    if cfg.checkpoint and spec.kind in STATEFUL:
        return (
            f"--compress {cfg.compress} keeps error-feedback residuals on every rank, which "
            "checkpoints don't save (a resumed run would not continue exactly): run it without "
            "--checkpoint, or compress with bf16"
        )
    return None


class Tally:
    """A hook's state: the bytes this rank handed to its collectives in each finished step
    (``sent``), counted bucket by bucket; ``group``: the data-parallel ranks."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        _HELD.append(group if group is not None else dist.group.WORLD)
        self.sent: list[int] = []
        self._step = 0

    def add(self, bucket: dist.GradBucket, nbytes: int) -> None:
        self._step += nbytes
        if bucket.is_last():  # the last bucket of a step (DDP's bucket 0)
            self.sent.append(self._step)
            self._step = 0


def bf16(tally: Tally, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's ``bf16_compress_hook``, counted: 2 bytes a value. Registered under its own name,
    DDP refuses it without CUDA and NCCL (PyTorch 2.13's ``register_comm_hook`` checks the name);
    called from this hook it runs on gloo, which all-reduces bfloat16."""
    tally.add(bucket, 2 * bucket.buffer().numel())
    return default_hooks.bf16_compress_hook(tally.group, bucket)


class PowerSGD(Tally):
    """PyTorch's PowerSGD state (``.state``) at rank ``rank``, with error feedback and warm start,
    compressing from step ``start_iter``; ``min_compression_rate``: a matrix is compressed only
    when (n + m) R times it is less than n m (0: every matrix, whatever it saves)."""

    def __init__(self, rank: int, group=None, start_iter=2, min_compression_rate=2.0, seed=0):
        super().__init__(group)
        self.state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=start_iter,
            min_compression_rate=min_compression_rate,
            use_error_feedback=True,
            warm_start=True,
            random_seed=seed,  # every rank draws the same first Q
        )
        self.layout: dict[int, list[torch.Tensor]] = {}  # each bucket's parameters, in order

    @property
    def residual(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each parameter's residual, cut out of PowerSGD's per-bucket ones (the buffer holds
        the parameters' gradients one after the other); empty before it compresses."""
        cut = {}
        for index, params in self.layout.items():
            flat, start = self.state.error_dict.get(index), 0
            for param in params if flat is not None else ():
                cut[param] = flat[start : start + param.numel()].view_as(param)
                start += param.numel()
        return cut


def powersgd(tally: PowerSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's ``powerSGD_hook``, counted: P, Q and the uncompressed tensors, or the whole
    bucket while it still all-reduces plainly."""
    state, buffer = tally.state, bucket.buffer()
    tally.layout[bucket.index()] = bucket.parameters()
    compressing, before = (
        state.iter >= state.start_powerSGD_iter,
        state.total_numel_after_compression,
    )
    future = powerSGD_hook.powerSGD_hook(state, bucket)
    values = state.total_numel_after_compression - before if compressing else buffer.numel()
    tally.add(bucket, values * buffer.element_size())
    return future


class Feedback(Tally):
    """A hand-written hook's state: its residual per parameter (``residual``, the gradient's
    shape), which follows the parameter into whichever bucket DDP puts it."""

    def __init__(self, group=None):
        super().__init__(group)
        self.residual: dict[torch.Tensor, torch.Tensor] = {}

    def add_residuals(self, bucket: dist.GradBucket) -> torch.Tensor:
        """The bucket's buffer with every parameter's residual added (in place): v = g + e."""
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            if param in self.residual:
                grad.add_(self.residual[param])  # a view into the buffer
        return bucket.buffer()

    def keep(self, bucket: dist.GradBucket, residual: torch.Tensor) -> None:
        """Keep ``residual`` (flat, the bucket's layout) parameter by parameter."""
        start = 0
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            self.residual[param] = residual[start : start + grad.numel()].view_as(grad).clone()
            start += grad.numel()


class TopK(Feedback):
    """Top-k sparsification's state: ``fraction`` of every bucket's values sent."""

    def __init__(self, fraction: float, group=None):
        super().__init__(group)
        self.fraction = fraction


def _gather(tally: Tally, payload: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """Every rank's ``payload`` (the same size on all), stacked one row per rank."""
    rows = payload.new_empty(tally.world_size * payload.numel())
    work = dist.all_gather_single(rows, payload, group=tally.group, async_op=True)
    return work.get_future().then(lambda _: rows.view(tally.world_size, -1))


def topk(tally: TopK, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Each rank sends the k = ceil(F n) largest |g + e| of the bucket and their positions (int32,
    carried in the values' dtype: one all-gather); the rest stays in its residual. The average:
    every rank's values added at their positions, divided by the number of ranks."""
    v = tally.add_residuals(bucket)
    k = max(1, math.ceil(tally.fraction * v.numel()))
    index_dtype = torch.int64 if v.element_size() == 8 else torch.int32
    positions = v.abs().topk(k, sorted=False).indices
    values = v[positions]
    residual = v.clone()
    residual[positions] = 0  # e = v - what was sent
    tally.keep(bucket, residual)
    payload = torch.cat([values, positions.to(index_dtype).view(v.dtype)])
    tally.add(bucket, payload.numel() * payload.element_size())

    def average(rows: torch.futures.Future) -> torch.Tensor:
        everyone = rows.value()
        where = everyone[:, k:].contiguous().view(index_dtype).flatten().long()
        out = bucket.buffer().zero_()
        out.index_add_(0, where, everyone[:, :k].flatten())
        return out.div_(tally.world_size)

    return _gather(tally, payload).then(average)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as bits, 8 to a byte (uint8, the last byte padded with zeros)."""
    padded = torch.zeros(8 * math.ceil(positive.numel() / 8), dtype=torch.int32)
    padded[: positive.numel()] = positive
    return (padded.view(-1, 8) << SHIFTS).sum(dim=1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`pack_signs` undone for the last dimension: (..., ceil(n / 8)) bytes -> (..., n)."""
    bits = (packed.to(torch.int32).unsqueeze(-1) >> SHIFTS) & 1
    return bits.flatten(-2)[..., :n].bool()


def sign(tally: Feedback, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """1-bit compression: each rank sends sign(g + e) as bits and one float32 scale, the bucket's
    mean |g + e| (one all-gather: 4 + ceil(n / 8) bytes); e keeps what scale x sign missed. The
    average: the mean over ranks of scale x sign."""
    v = tally.add_residuals(bucket)
    n = v.numel()
    scale = v.abs().mean()
    positive = v >= 0
    tally.keep(bucket, v - torch.where(positive, scale, -scale))
    payload = torch.cat([scale.float().reshape(1).view(torch.uint8), pack_signs(positive)])
    tally.add(bucket, payload.numel())

    def average(rows: torch.futures.Future) -> torch.Tensor:
        everyone = rows.value()
        scales = everyone[:, :4].contiguous().view(torch.float32).to(v.dtype)  # (ranks, 1)
        signed = torch.where(unpack_signs(everyone[:, 4:], n), scales, -scales)  # (ranks, n)
        return bucket.buffer().copy_(signed.sum(dim=0)).div_(tally.world_size)

    return _gather(tally, payload).then(average)


def register(ddp_model, compress: str | Spec, group=None) -> Tally | None:
    """Register ``compress``'s hook (a ``--compress`` value or a :class:`Spec`) on ``ddp_model``
    (a ``DistributedDataParallel``) over ``group``; returns the hook's state (its :class:`Tally`),
    or None for ``"none"`` (DDP's own all-reduce, left as it is)."""
    spec = parse(compress) if isinstance(compress, str) else compress
    if spec.kind == "none":
        return None
    hooks = {
        "bf16": (lambda: Tally(group), bf16),
        "powersgd": (lambda: PowerSGD(spec.rank, group), powersgd),
        "topk": (lambda: TopK(spec.fraction, group), topk),
        "sign": (lambda: Feedback(group), sign),
    }
    make, hook = hooks[spec.kind]
    tally = make()
    ddp_model.register_comm_hook(tally, hook)
    return tally


def payload_bytes(compress: str, shapes, min_compression_rate: float = 2.0) -> int:
    """The bytes one rank hands to its collectives in a compressed step (float32 gradients of
    ``shapes``, all in one bucket, as the course's models are: what :class:`Tally` counts)."""
    spec, n = parse(compress), sum(math.prod(shape) for shape in shapes)
    if spec.kind == "powersgd":  # each gradient as an n x m matrix (a vector: m = 1)
        values = 0
        for shape in shapes:
            rows, cols = shape[0], math.prod(shape[1:])
            rank = min(rows, cols, spec.rank)
            small = (rows + cols) * rank * min_compression_rate < rows * cols
            values += (rows + cols) * rank if small else rows * cols
        return 4 * values
    sizes = {"none": 4 * n, "bf16": 2 * n, "sign": 4 + math.ceil(n / 8)}
    return sizes[spec.kind] if spec.kind in sizes else 8 * math.ceil(spec.fraction * n)


def wire_bytes(sent: int, world_size: int, gathered: bool) -> float:
    """Bytes one rank puts on the wire for ``sent`` bytes handed to a ring all-reduce (``gathered``
    False) or all-gather (True): 2 (N - 1) / N x sent, or (N - 1) x sent."""
    return (world_size - 1) * sent if gathered else 2 * (world_size - 1) / world_size * sent
