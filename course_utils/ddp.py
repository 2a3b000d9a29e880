"""Data parallel training (lesson 05): written by hand (all_reduce of the gradients), then with
``DistributedDataParallel``, its buckets watched from the inside, and what synchronising costs.

The idea in one line: N replicas of the model each take 1/N of the global batch, compute their
gradients, *average* them with an all-reduce, and take the same optimizer step, so they stay
identical and together compute exactly what one process computes on the whole batch.

Every function here runs inside a worker whose default process group is initialised
(:func:`course_utils.launch.run` or ``torchrun`` + :func:`course_utils.launch.process_group`).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from course_utils import compression, data, launch, models


def wrap(model: nn.Module, device: torch.device, group=None) -> DistributedDataParallel:
    """``model`` (already on ``device``) in ``DistributedDataParallel`` over ``group`` (default:
    every rank): its constructor broadcasts the group's first rank's weights, and every backward
    all-reduces the gradients, in buckets, while later layers are still computing."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def apply(model: nn.Module, mesh, skip=(), compress: str = "none") -> nn.Module:
    """Data parallel by replicas, the composing module's last step (:mod:`course_utils.parallelize`)
    over ``mesh`` (its data-parallel ranks): ``model`` in ``DistributedDataParallel``. ``skip``:
    parameters that another room averages itself (expert parallelism's experts, each held by
    fewer ranks than the rest of the model), which data parallel leaves alone. ``compress``: how
    the buckets travel (``--compress``: "none", "bf16", "powersgd:R", "topk:F", "sign"; a
    communication hook of :mod:`course_utils.compression`), for plain tensors only.

    A tensor-parallel model's parameters are DTensors, which ``DistributedDataParallel`` can't
    bucket (it concatenates plain tensors; PyTorch 2.13 refuses the mix). Each of those replicas
    averages its gradient slices over the data-parallel ranks itself, as soon as backward has
    produced each one (:func:`average_when_ready`): DDP's idea, without its buckets."""
    skipped = {id(param) for param in skip}
    own = [param for param in model.parameters() if id(param) not in skipped]
    if any(hasattr(param, "device_mesh") for param in own):
        if compression.parse(compress).kind != "none":
            raise ValueError(f"--compress {compress} needs DDP's buckets, not DTensor slices")
        return average_when_ready(model, mesh.get_group(), skip)
    if skipped:
        names = [name for name, param in model.named_parameters() if id(param) in skipped]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    wrapped = wrap(model, own[0].device, mesh.get_group())
    compression.register(wrapped, compress, mesh.get_group())
    return wrapped


def average_when_ready(model: nn.Module, group, skip=()) -> nn.Module:
    """``model`` (in place) with a hook on every parameter (but those in ``skip``) that
    all-reduces its gradient over ``group`` and divides by the group's size the moment backward
    has accumulated it; a DTensor gradient (a tensor-parallel slice) is averaged slice by slice.
    Every replica runs the same backward, so the hooks meet in the same order on every rank."""
    world_size = dist.get_world_size(group)
    skipped = {id(param) for param in skip}

    def average(param: torch.Tensor) -> None:
        grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
        dist.all_reduce(grad, group=group)  # in place (a view of the DTensor's slice)
        grad /= world_size

    for param in model.parameters():
        if id(param) not in skipped:
            param.register_post_accumulate_grad_hook(average)
    return model


def average_gradients(model: nn.Module, group=None) -> None:
    """All-reduce every gradient and divide by the world size: the whole of data parallelism.
    ``group``: the data-parallel ranks (default: all); a gradient that is a DTensor (a tensor-
    parallel slice) is averaged slice by slice."""
    world_size = dist.get_world_size(group)
    for param in model.parameters():
        if param.grad is not None:
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)  # in place (a view)
            grad /= world_size


def hand_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One data-parallel step written by hand; a drop-in ``step_fn`` for :func:`loop.fit`.
    ``group``: the data-parallel ranks (default: all of them)."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("forward"):
        logits = model(X)  # (B / world_size, num_classes): this rank's shard only
        loss = F.cross_entropy(logits, y)  # mean over the shard
    with record_function("backward"):
        loss.backward()
    average_gradients(model, group)  # mean of shard means = mean over the global batch
    with record_function("optimizer"):
        optimizer.step()
    return loss.detach(), (logits.argmax(dim=1) == y).sum()


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters to every rank (what DDP does when it wraps a model)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=src)


def time_sync(model_name: str, batch_size: int, num_steps: int = 10, seed: int = 0) -> dict:
    """Seconds per DDP training step with the gradient all-reduce and without it (``no_sync``),
    steps alternating so that a noisy machine affects both alike; run it on every rank.

    Returns, on every rank, the medians ``synced_s``, ``no_sync_s`` and ``data_s`` (cutting this
    rank's shard out of the global batch), the slowest rank's of each."""
    me = launch.worker()
    X, y = data.mnist("train")
    X = models.prepare_input(model_name, X)
    model = models.build(model_name, seed=seed).to(me.device)
    trained = wrap(model, me.device)
    optimizer = models.make_optimizer(model, lr=0.01)
    times = {"synced_s": [], "no_sync_s": [], "data_s": []}
    for step in range(2 * num_steps + 2):  # the first pair warms up and is not counted
        start = time.perf_counter()
        idx = data.shard(data.batch_indices(len(X), batch_size, step, seed), me.rank, me.world_size)
        X_shard, y_shard = X[idx].to(me.device), y[idx].to(me.device)  # (B / world_size, ...)
        loaded = time.perf_counter()
        synced = step % 2 == 0
        with nullcontext() if synced else trained.no_sync():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(trained(X_shard), y_shard).backward()
        optimizer.step()  # without sync the replicas drift apart: fine for timing only
        if step >= 2:
            times["data_s"].append(loaded - start)
            times["synced_s" if synced else "no_sync_s"].append(time.perf_counter() - loaded)
    medians = torch.tensor([statistics.median(times[k]) for k in times], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(times, medians.tolist()))


def watch_backward(bucket_cap_mb: float | None, batch_size: int = 64, repeats: int = 3) -> dict:
    """One CNN backward pass under DDP, watched from the inside (lesson 05, section 3.2): when
    each parameter's gradient is ready (``register_post_accumulate_grad_hook``) and when each
    bucket's all-reduce runs (a communication hook doing what DDP's default hook does, plus two
    clock readings). Run it on every rank. Returns this rank's ``events`` and ``backward_s`` of
    the last repeat, and ``first_start_ms``: for every repeat after the first, when the first
    bucket's all-reduce started, in ms after the last gradient was ready (negative: before it,
    overlapping the backward computation; positive: it waited for the last gradient)."""
    me = launch.worker()
    X, y = data.mnist("train", limit=batch_size)
    X_shard, y_shard = X[me.rank :: me.world_size], y[me.rank :: me.world_size]  # (B / N, ...)
    model = models.build("cnn", seed=0)
    ddp_model = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    names = {param: name for name, param in model.named_parameters()}
    events, t0 = [], [0.0]

    def now() -> float:
        return time.perf_counter() - t0[0]

    def gradient_ready(param):
        events.append({"kind": "grad", "name": names[param], "start": now(), "end": now()})

    def timed_allreduce(state, bucket):  # DDP's default hook, plus two clock readings
        start, buffer = now(), bucket.buffer()  # the bucket: its gradients, flattened
        buffer.div_(me.world_size)
        future = dist.all_reduce(buffer, async_op=True).get_future()
        tensors = ", ".join(names[p] for p in bucket.parameters())
        label = f"{tensors} ({4 * buffer.numel() / 1024:.0f} KB)"

        def finished(fut):
            events.append({"kind": "allreduce", "name": label, "start": start, "end": now()})
            return fut.value()[0]

        return future.then(finished)

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(gradient_ready)
    ddp_model.register_comm_hook(None, timed_allreduce)
    first_start_ms = []
    for repeat in range(repeats + 1):  # the first repeat warms up and is not kept
        events.clear()
        loss = F.cross_entropy(ddp_model(X_shard), y_shard)
        t0[0] = time.perf_counter()
        loss.backward()  # returns when every bucket has been all-reduced
        backward_s = now()
        starts = [e["start"] for e in events if e["kind"] == "allreduce"]
        last_ready = max(e["start"] for e in events if e["kind"] == "grad")
        if repeat > 0:
            first_start_ms.append(1e3 * (min(starts) - last_ready))
    return {"events": list(events), "backward_s": backward_s, "first_start_ms": first_start_ms}
