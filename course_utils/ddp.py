"""Data parallel training: written by hand (all_reduce of the gradients), then with
``DistributedDataParallel``; checkpoint and resume (lesson 05).

The idea in one line: N replicas of the model each take 1/N of the global batch, compute their
gradients, *average* them with an all-reduce, and take the same optimizer step, so they stay
identical and together compute exactly what one process computes on the whole batch.

Every function here runs inside a worker whose default process group is initialised
(:func:`course_utils.launch.run` or ``torchrun`` + :func:`course_utils.launch.process_group`).
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from course_utils import data, launch, loop, models


def average_gradients(model: nn.Module) -> None:
    """All-reduce every gradient and divide by the world size: the whole of data parallelism."""
    world_size = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world_size


def hand_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One data-parallel step written by hand; a drop-in ``step_fn`` for :func:`loop.fit`."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(X)  # (B / world_size, num_classes): this rank's shard only
    loss = F.cross_entropy(logits, y)  # mean over the shard
    loss.backward()
    average_gradients(model)  # mean of shard means = mean over the global batch (equal shards)
    optimizer.step()
    return loss.detach(), (logits.argmax(dim=1) == y).sum()


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters to every rank (what DDP does when it wraps a model)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (for metrics: every rank gets the global figure)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --- checkpoints ------------------------------------------------------------------------------

CHECKPOINT_NAME = "latest.pt"


def save_checkpoint(
    directory: str | Path, model: nn.Module, optimizer, step: int, history: loop.History
) -> Path:
    """Save after ``step`` steps, atomically (write a temporary file, then rename): a crash while
    saving leaves the previous checkpoint intact. Call it on rank 0 only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    state = {
        "step": step,  # steps completed; the batches are a function of (seed, step)
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # SGD's momentum buffers
        "losses": history.losses,
        "accuracies": history.accuracies,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | Path | None, model: nn.Module, optimizer) -> dict | None:
    """Restore model and optimizer from ``directory``'s checkpoint if there is one; return it
    (``step``, ``losses``, ...) or None. ``weights_only=True``: a checkpoint can't run code."""
    if directory is None:
        return None
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


# --- the training entry point's worker ------------------------------------------------------------


def train_worker(cfg, progress: bool = False) -> dict | None:
    """Train ``cfg`` (a :class:`course_utils.train.RunConfig`); rank 0 returns the results of
    the CLI contract (less ``wall_s``), the other ranks None.

    ``--parallel ddp``: every rank builds the same model from the seed, wraps it in
    ``DistributedDataParallel``, takes its shard of each global batch, and DDP averages the
    gradients during backward. The losses recorded are global means (the shards' loss sums are
    all-reduced), so they equal ``--parallel none``'s at the same batch and seed.
    ``--parallel none`` is the same loop in one process, without DDP and without a process group.
    """
    me = launch.worker()
    distributed = cfg.parallel == "ddp"
    torch.set_num_threads(cfg.threads_per_worker)
    X, y = data.mnist("train")
    X = models.prepare_input(cfg.model, X)
    model = models.build(cfg.model, seed=cfg.seed).to(me.device)
    optimizer = loop.make_optimizer(model, cfg.lr)
    state = load_checkpoint(cfg.checkpoint, model, optimizer)  # every rank reads the same file
    start_step = state["step"] if state else 0
    if distributed:
        device_ids = [me.device.index] if me.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids)
    else:
        trained = model

    before = loop.History(batch_size=cfg.batch_size)
    if state:  # continue the stopped run's history, so that the results hold every step
        before.losses, before.accuracies = list(state["losses"]), list(state["accuracies"])

    def on_step(i: int, run: loop.History) -> None:
        done, every = start_step + i + 1, cfg.checkpoint_every
        if cfg.checkpoint and me.is_main and (done == cfg.steps or (every and done % every == 0)):
            save_checkpoint(cfg.checkpoint, model, optimizer, done, _merged(before, run))

    world_size = me.world_size if distributed else 1
    rank = me.rank if distributed else 0
    batches = data.batches(X, y, cfg.batch_size, cfg.steps, cfg.seed, rank, world_size, start_step)
    workers = f"{world_size} worker{'s' if world_size > 1 else ''}"
    run = loop.fit(
        trained,
        optimizer,
        batches,
        cfg.steps - start_step,
        batch_size=cfg.batch_size,
        reduce=all_reduce_sum if distributed else None,
        progress=progress and me.is_main,
        desc=f"{cfg.model}, {cfg.parallel} ({workers})",
        on_step=on_step,
    )
    if distributed and cfg.checkpoint:
        dist.barrier()  # nobody leaves (and no restart reads) before rank 0 has saved
    if distributed and not me.is_main:
        return None
    history = _merged(before, run)
    result = {
        "losses": history.losses,
        "accuracies": history.accuracies,
        "samples_per_s": run.samples_per_s,  # this run's steps only, start-up excluded
        "resumed_from_step": start_step,
        "backend": dist.get_backend() if distributed else "none",
        "device": str(me.device),
    }
    if cfg.eval:
        X_test, y_test = data.mnist("test")
        result["test_accuracy"] = loop.evaluate(
            model, models.prepare_input(cfg.model, X_test), y_test
        )
    return result


def _merged(before: loop.History, run: loop.History) -> loop.History:
    """The stopped run's history followed by this run's steps."""
    return loop.History(
        batch_size=run.batch_size or before.batch_size,
        losses=before.losses + run.losses,
        accuracies=before.accuracies + run.accuracies,
        step_times=before.step_times + run.step_times,
    )


# --- measuring what synchronisation costs (lesson 05, benchmarks/bench_ddp.py) ---------------------


def time_sync(model_name: str, batch_size: int, num_steps: int = 10, seed: int = 0) -> dict:
    """Seconds per DDP training step with the gradient all-reduce and without it (``no_sync``),
    steps alternating so that a noisy machine affects both alike; run it on every rank.

    Returns, on every rank, the medians ``synced_s``, ``no_sync_s`` and ``data_s`` (cutting this
    rank's shard out of the global batch), the slowest rank's of each."""
    me = launch.worker()
    X, y = data.mnist("train")
    X = models.prepare_input(model_name, X)
    model = models.build(model_name, seed=seed).to(me.device)
    trained = DistributedDataParallel(model)
    optimizer = loop.make_optimizer(model, lr=0.01)
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
