"""Tensor parallelism on 2 ranks against one process: the transformer, 1 thread per rank.

    python benchmarks/bench_tp.py [--repeats 3] [--steps 8]

For each width and batch, one process (one thread, pinned to a core) and 2 tensor-parallel ranks
(one thread each, each pinned to its own core) train the same steps, in turns (one process, then
the two ranks, then again), so that load elsewhere hits both alike. Both Megatron's layers as the
course writes them by hand (``cu.tensor_parallel.parallelize_by_hand``) and PyTorch's DTensor plan
(``parallelize_module``). A step's time is the median of the steps after the first; the speedup is
the median of the paired ratios, with min-max; for the hand-written layers, the share of a step
spent inside the all-reduces. Writes benchmarks/results/tp.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _results import save

import course_utils as cu
from course_utils import tensor_parallel as tp

SIZES = [(64, 64), (128, 256), (256, 256), (512, 256)]  # (width, global batch)


def step_time(dim: int, batch: int, steps: int, engine: str | None) -> tuple[float, float]:
    """Median seconds per training step, and seconds per step inside f/g's all-reduces."""
    torch.set_num_threads(1)
    model = cu.models.build("transformer", seed=0, dim=dim, hidden=4 * dim)
    if engine == "hand":
        tp.parallelize_by_hand(model)
    elif engine == "dtensor":
        tp.apply(model, cu.parallelize.Axes(tp=dist.get_world_size()).mesh()["tp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    X, y = cu.data.mnist("train", limit=batch)
    times = []
    for i in range(steps + 1):
        if i == 1:
            tp.COMM.update(calls=0, bytes=0, seconds=0.0)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), tp.COMM["seconds"] / steps


def run(engine: str | None, dim: int, batch: int, steps: int) -> tuple[float, float]:
    """One process (``engine`` None), or 2 tensor-parallel ranks; each thread pinned to a core."""
    nproc = 1 if engine is None else 2
    return cu.launch.run(
        step_time, nproc, dim, batch, steps, engine, threads=1, pin=True, device="cpu",
        init_group=engine is not None,
    )[0]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    rows = []
    with cu.measure.Watch() as watch:
        for dim, batch in SIZES:
            measures = {
                engine: partial(run, engine, dim, batch, args.steps)
                for engine in (None, "hand", "dtensor")
            }
            samples = {name: [] for name in measures}
            for _ in range(args.repeats):
                for name, measure in measures.items():
                    samples[name].append(measure())
            one = cu.measure.spread(s for s, _ in samples[None])
            for engine in ("hand", "dtensor"):
                steps = cu.measure.spread(s for s, _ in samples[engine])
                speedup = cu.measure.ratios(one, steps)
                comm = cu.measure.spread(c / s for s, c in samples[engine])
                rows.append(
                    {
                        "engine": engine,
                        "dim": dim,
                        "batch_size": batch,
                        "one_process_s": one.median,
                        "tp_s": steps.median,
                        "speedup": speedup.median,
                        "speedup_min": speedup.low,
                        "speedup_max": speedup.high,
                        "comm_share": comm.median if engine == "hand" else None,
                    }
                )
                share = f", all-reduce {comm.median:.0%} of a step" if engine == "hand" else ""
                print(f"width {dim:3} batch {batch:3} {engine:7}: {speedup}x one process{share}")
    print(watch.note())
    save("tp", rows, args.repeats, watch)


if __name__ == "__main__":
    main()
