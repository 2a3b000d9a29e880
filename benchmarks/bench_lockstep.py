"""What keeping two workers in step costs on this machine, with no gradients moved at all: the
part of DDP's gap to two independent processes that no implementation of synchronous data
parallelism can close here.

    python benchmarks/bench_lockstep.py [--batch-sizes 64 256] [--repeats 5] [--steps 100]

Two workers x 1 thread (``cu.launch.run``), each training the CNN on half the global batch, in
four ways, interleaved (A B C D A B C D ...):

- ``independent``: no collective at all: the limit that ``bench_ddp`` compares DDP with;
- ``lockstep``: ``dist.barrier()`` after every backward: the workers wait for each other but
  move no bytes (their models drift apart: this measures time, not training);
- ``all_reduce``: the gradients averaged by hand, one flat ``all_reduce`` per step;
- ``ddp``: ``DistributedDataParallel``, as ``--parallel ddp`` builds it.

Samples/s of a pair: the sum of each worker's for ``independent``; for the others, both
workers' samples over the slower worker's time. Ratios to ``independent`` are medians of each
round's ratios, with min-max. If ``lockstep`` alone is as far below 1 as ``ddp``, what DDP loses
is waiting for the other worker (one core slower than the other, a process of the machine
stealing one worker's core for a moment while the other waits), not its buckets or its bytes.
Writes benchmarks/results/lockstep.json.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _results import save

import course_utils as cu

WAYS = ("independent", "lockstep", "all_reduce", "ddp")
WARMUP = 5  # steps not timed: buffers, DDP's buckets


def worker(way: str, half_batch: int, steps: int) -> float:
    """One worker's seconds for the timed steps of ``way`` (see the module docstring)."""
    torch.manual_seed(0)
    model = cu.models.build("cnn", seed=0)
    if way == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(half_batch, 1, 28, 28), torch.randint(0, 10, (half_batch,))
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if way == "lockstep":
            dist.barrier()
        elif way == "all_reduce":
            flat = torch.cat([p.grad.flatten() for p in model.parameters()])
            dist.all_reduce(flat)
            torch.nn.utils.vector_to_parameters(flat / 2, [p.grad for p in model.parameters()])
        optimizer.step()
    return time.perf_counter() - start


def pair(way: str, batch_size: int, steps: int) -> float:
    """Samples/s of two workers training ``way`` on half of ``batch_size`` each."""
    seconds = cu.launch.run(worker, 2, way, batch_size // 2, steps, threads=1, device="cpu")
    samples = batch_size // 2 * steps
    if way == "independent":
        return sum(samples / s for s in seconds)
    return 2 * samples / max(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=100, help="timed steps per run")
    args = p.parse_args()
    measures = {
        (b, way): partial(pair, way, b, args.steps) for b in args.batch_sizes for way in WAYS
    }
    rows = []
    with cu.measure.Watch() as watch:
        speeds = cu.measure.interleaved(measures, args.repeats, progress="lockstep")
        for b in args.batch_sizes:
            row = {"batch_size": b, "steps": args.steps}
            for way in WAYS:
                ratio = cu.measure.ratios(speeds[b, way], speeds[b, "independent"])
                row |= speeds[b, way].as_dict(f"samples_per_s {way}") | ratio.as_dict(way)
            rows.append(row)
            print(
                f"batch {b:4d}, of two independent processes: "
                + ", ".join(
                    f"{way} {cu.measure.ratios(speeds[b, way], speeds[b, 'independent'])}"
                    for way in WAYS[1:]
                ),
                flush=True,
            )
    print(watch.note())
    print(f"wrote {save('lockstep', rows, args.repeats, watch)}")


if __name__ == "__main__":
    main()
