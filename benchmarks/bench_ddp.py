"""Data-parallel throughput of the CNN: 2 DDP workers x 1 thread against 1 worker x 1 thread (the
speedup that processes buy) and against 1 worker x 2 threads (what one process gets by default).

    python benchmarks/bench_ddp.py [--batch-sizes 32 64 128 256] [--repeats 5] [--samples 3072]

Every configuration is a real ``cu.train.run(RunConfig(parallel="ddp", ...))`` (forked workers,
gloo), with steps enough for ``--samples`` samples; the throughput counts the steps after the first
(start-up excluded). Each repeat runs every batch size and, for each, the configurations one
after the other (A B C A B C ...), so that a noisy machine affects them alike; the figures are
medians over the repeats, and the ratios are medians of the per-repeat ratios. Then, to see where
the time goes, ``cu.ddp.time_sync`` times a step of 1 worker and of 2 workers, the latter with
and without the gradient all-reduce (``no_sync``): 2 workers' step minus half of 1 worker's is
split into what is lost computing and what is lost synchronising. Writes
benchmarks/results/ddp.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import course_utils as cu
from course_utils.train import RunConfig

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name -> (workers, threads per worker)
    "2 workers x 1 thread": (2, 1),
    "1 worker x 1 thread": (1, 1),
    "1 worker x 2 threads": (1, 2),
}


def throughput(model: str, nproc: int, threads: int, batch_size: int, steps: int) -> dict:
    cfg = RunConfig(
        model=model,
        parallel="ddp",
        nproc=nproc,
        batch_size=batch_size,
        steps=steps,
        threads=threads,
        device="cpu",  # CPU processes and threads, even on a GPU box
    )
    result = cu.train.run(cfg, progress=False)
    return {"samples_per_s": result["samples_per_s"], "wall_s": result["wall_s"]}


def steps_for(batch_size: int, samples: int) -> int:
    return max(samples // batch_size, 8) + 1  # + the first step, which is not counted


def summarise(model: str, batch_size: int, steps: int, runs: dict) -> dict:
    """Medians over the repeats of one batch size: throughputs, wall times and ratios."""
    rates = {name: [r["samples_per_s"] for r in rs] for name, rs in runs.items()}
    two = rates["2 workers x 1 thread"]
    return {
        "model": model,
        "batch_size": batch_size,
        "steps": steps,
        "repeats": len(two),
        "samples_per_s": {name: statistics.median(v) for name, v in rates.items()},
        "wall_s": {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()},
        "speedup_vs_1x1": statistics.median(
            a / b for a, b in zip(two, rates["1 worker x 1 thread"])
        ),
        "speedup_vs_1x1_min": min(a / b for a, b in zip(two, rates["1 worker x 1 thread"])),
        "speedup_vs_1x1_max": max(a / b for a, b in zip(two, rates["1 worker x 1 thread"])),
        "speedup_vs_1x2": statistics.median(
            a / b for a, b in zip(two, rates["1 worker x 2 threads"])
        ),
        "all_samples_per_s": rates,
    }


def where_time_goes(model: str, batch_size: int, steps: int) -> dict:
    """Per-step seconds of 2 workers x 1 thread against the ideal, half of 1 worker's step:
    what is lost in computing (smaller shards, two processes sharing caches and memory) and in
    synchronising the gradients (the all-reduce, and waiting for the slower rank)."""
    one = cu.launch.run(
        cu.ddp.time_sync, 1, model, batch_size, steps, threads=1, timeout=600, device="cpu"
    )[0]
    two = cu.launch.run(
        cu.ddp.time_sync, 2, model, batch_size, steps, threads=1, timeout=600, device="cpu"
    )[0]
    ideal = one["synced_s"] / 2
    return {
        "batch_size": batch_size,
        "one_worker_step_s": one["synced_s"],
        "two_workers_step_s": two["synced_s"],
        "two_workers_no_sync_step_s": two["no_sync_s"],
        "shard_slicing_s": two["data_s"],
        "ideal_speedup_of_step": one["synced_s"] / two["synced_s"],
        "lost_in_compute_s": two["no_sync_s"] - ideal,
        "lost_in_sync_s": two["synced_s"] - two["no_sync_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=["cnn", "rnn"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=3072, help="samples per timed run")
    args = p.parse_args()

    start = time.perf_counter()
    runs = {b: {name: [] for name in CONFIGS} for b in args.batch_sizes}
    for _ in range(args.repeats):  # every batch size in every repeat: bursts of load hit all
        for batch_size in args.batch_sizes:
            steps = steps_for(batch_size, args.samples)
            for name, (nproc, threads) in CONFIGS.items():
                runs[batch_size][name].append(
                    throughput(args.model, nproc, threads, batch_size, steps)
                )
    rows = []
    for batch_size in args.batch_sizes:
        row = summarise(
            args.model, batch_size, steps_for(batch_size, args.samples), runs[batch_size]
        )
        rows.append(row)
        rates = "  ".join(f"{k}: {v:6.0f}" for k, v in row["samples_per_s"].items())
        print(
            f"batch {batch_size:4d}  {rates}  samples/s | 2x1 / 1x1 = {row['speedup_vs_1x1']:.2f}x,"
            f" 2x1 / 1x2 = {row['speedup_vs_1x2']:.2f}x",
            flush=True,
        )
    breakdown = [where_time_goes(args.model, b, 10) for b in args.batch_sizes]
    for b in breakdown:
        print(
            f"batch {b['batch_size']:4d}: 1 worker {1e3 * b['one_worker_step_s']:.1f} ms/step, "
            f"2 workers {1e3 * b['two_workers_step_s']:.1f} ms (ideal "
            f"{0.5e3 * b['one_worker_step_s']:.1f}); lost in compute "
            f"{1e3 * b['lost_in_compute_s']:+.1f} ms, in sync {1e3 * b['lost_in_sync_s']:+.1f} ms;"
            f" shard slicing {1e3 * b['shard_slicing_s']:.2f} ms"
        )
    out = {
        "benchmark": "DDP throughput, 2 workers x 1 thread vs 1 worker x 1 or 2 threads",
        "machine": {
            "cores": cu.hardware.num_cores(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1min": _load_average(),
        },
        "seconds": time.perf_counter() - start,
        "results": rows,
        "where_time_goes": breakdown,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "ddp.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path.relative_to(RESULTS.parent.parent)} in {out['seconds']:.0f} s")


def _load_average() -> float | None:
    try:
        import os

        return os.getloadavg()[0]  # how busy the machine was: > cores means noisy figures
    except (AttributeError, OSError):
        return None


if __name__ == "__main__":
    main()
