"""The experiments of lessons 12 and 13 (the article's challenges) that are plumbing, not the
lesson's subject: the three models compared (a linear classifier beside the course's CNN and RNN)
and their size, the timings of compute against an all-reduce on two workers, the cost of the
CNN's blocks as pipeline stages, a small CNN trainer with the usual cures of overfitting (weight
decay, augmentation, class weights), and per-class recall.

What the lessons teach (a straggler, the bound of a 2-stage pipeline, saliency, occlusion,
Shapley values, an autoencoder, imputation, bf16 autocast) stays in the notebooks.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from course_utils import collectives, data, loop, measure, models

MODELS = ("linear", "rnn", "cnn")  # a classic ML model beside the course's two networks


def build(name: str, seed: int = 0) -> nn.Module:
    """The course's CNN or RNN (:func:`course_utils.models.build`), or ``"linear"``: softmax
    regression on the 784 raw pixels."""
    if name == "linear":
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    return models.build(name, seed=seed)


def prepare(name: str, X: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 1, 28, 28)`` in the shape model ``name`` reads."""
    return X if name == "linear" else models.prepare_input(name, X)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``x``, counted by PyTorch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def complexity(names: Sequence[str] = MODELS) -> dict[str, dict[str, int]]:
    """``{name: {"params", "flops"}}``: parameters, and forward FLOPs for one image."""
    x = torch.zeros(1, 1, 28, 28)
    out = {}
    for name in names:
        model = build(name)
        params = sum(p.numel() for p in model.parameters())
        out[name] = {"params": params, "flops": forward_flops(model, prepare(name, x))}
    return out


def compute_time(model: nn.Module, X: torch.Tensor, y: torch.Tensor, calls: int = 3) -> float:
    """Seconds of one forward + backward (the mean of ``calls``)."""
    start = time.perf_counter()
    for _ in range(calls):
        model.zero_grad()
        F.cross_entropy(model(X), y).backward()
    return (time.perf_counter() - start) / calls


def all_reduce_time(tensor: torch.Tensor, calls: int = 3) -> float:
    """Seconds of one all-reduce of ``tensor`` in the default group (the mean of ``calls``)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(tensor)
    return (time.perf_counter() - start) / calls


def compute_and_comm(names: Sequence[str], batch_sizes: Sequence[int], repeats: int) -> dict:
    """Run on every rank: for each model, ``{batch: Spread of compute seconds, "comm": Spread of
    all-reduce seconds}`` (a gradient-sized tensor), measured in turns; and ``"probe"``, the
    all-reduce probe of lesson 04 (1 KB .. 4 MB) to fit the alpha-beta model to."""
    X, y = data.mnist("train")
    out = {}
    for name in names:
        model, Xm = build(name), prepare(name, X)
        compute_time(model, Xm[: batch_sizes[-1]], y[: batch_sizes[-1]])  # warm up, make grads
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])  # what DDP all-reduces
        all_reduce_time(grads)
        measures = {b: functools.partial(compute_time, model, Xm[:b], y[:b]) for b in batch_sizes}
        measures["comm"] = functools.partial(all_reduce_time, grads)
        out[name] = measure.interleaved(measures, repeats)
    sizes = [4 * 2**k for k in range(8, 21, 3)]
    out["probe"] = collectives.bandwidth_probe(sizes, repeats=repeats)
    return out


def cnn_blocks(cnn: nn.Module) -> dict[str, nn.Module]:
    """The course's CNN as three consecutive blocks, the candidate pipeline stages."""
    return {
        "conv1 + pool": nn.Sequential(cnn.conv1, nn.ReLU(), cnn.pool),
        "conv2 + pool": nn.Sequential(cnn.conv2, nn.ReLU(), cnn.pool, nn.Flatten()),
        "fc": cnn.fc,
    }


def block_costs(
    blocks: dict[str, nn.Module], X: torch.Tensor, repeats: int
) -> tuple[dict[str, int], dict[str, measure.Spread]]:
    """FLOPs of forward + backward of each block, fed what it gets in the full model, and its
    time (a :class:`~course_utils.measure.Spread` of seconds), the blocks measured in turns."""
    inputs, flops, x = {}, {}, X
    for name, block in blocks.items():
        x = x.detach().requires_grad_()
        inputs[name] = x
        with FlopCounterMode(display=False) as counter:  # (this first pass also warms up)
            out = block(x)
            out.backward(torch.ones_like(out))
        flops[name] = counter.get_total_flops()
        x = out

    def timed(name: str) -> float:
        start = time.perf_counter()
        out = blocks[name](inputs[name])
        out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    return flops, measure.interleaved({n: functools.partial(timed, n) for n in blocks}, repeats)


def train(
    X: torch.Tensor,
    y: torch.Tensor,
    num_steps: int,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    class_weights: torch.Tensor | None = None,
) -> nn.Module:
    """A CNN trained ``num_steps`` steps on ``(X, y)`` (SGD with momentum, batches as everywhere
    in the course), with optional weight decay, a fresh ``augment`` of every batch, and class
    weights in the loss."""
    model = models.build("cnn", seed=seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay
    )

    def step(model, optimizer, X_b, y_b):
        if augment is not None:
            X_b = augment(X_b)
        optimizer.zero_grad(set_to_none=True)
        logits = model(X_b)
        loss = F.cross_entropy(logits, y_b, weight=class_weights)
        loss.backward()
        optimizer.step()
        return loss.detach(), (logits.argmax(1) == y_b).sum()

    batches = data.batches(X, y, min(batch_size, len(X)), num_steps, seed)
    loop.fit(model, optimizer, batches, num_steps, step_fn=step, progress=False)
    return model.eval()


def random_shift(X: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels left/right and up/down (drawn from torch's
    global generator), the uncovered border filled with the background."""
    n, _, h, w = X.shape
    padded = F.pad(X, (max_shift,) * 4, value=data.BACKGROUND)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def shift(X: torch.Tensor, pixels: int) -> torch.Tensor:
    """Every image moved ``pixels`` right and down, the uncovered border set to background."""
    padded = F.pad(X, (pixels,) * 4, value=data.BACKGROUND)
    h, w = X.shape[-2:]
    return padded[..., :h, :w]


@torch.no_grad()
def recall_per_class(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, num_classes: int = 10
) -> list[float]:
    """The fraction of each class's samples the model classifies right."""
    predictions = model(X).argmax(1)
    return [(predictions[y == c] == c).float().mean().item() for c in range(num_classes)]


def copy_and_all_reduce(nbytes: int, repeats: int) -> dict[str, measure.Spread]:
    """Run on every rank: seconds to copy ``nbytes`` within this process's memory, and to
    all-reduce as many bytes with the other ranks, measured in turns."""
    source, target = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
    tensor = torch.zeros(nbytes // 4)

    def copy() -> float:
        start = time.perf_counter()
        target.copy_(source)
        return time.perf_counter() - start

    def all_reduce() -> float:
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        return time.perf_counter() - start

    copy(), all_reduce()  # warm up: first touches of the memory and of gloo's buffers
    return measure.interleaved({"copy": copy, "all-reduce": all_reduce}, repeats)
