"""Pipeline parallelism: throughput of 2 stages against one process with one thread.

    python benchmarks/bench_pipeline.py [--batch-size 128] [--steps 10] [--repeats 3] [--models cnn,rnn]

For each model (CNN, RNN), schedule (GPipe, 1F1B) and number of microbatches m = 1, 2, 4, 8, 16,
2 worker processes with 1 thread each train a few steps through ``torch.distributed.pipelining``
(stages balanced by measured time); the baseline is the whole model in one process with one thread,
measured right before each run, so that each ratio compares runs on the same (possibly busy)
machine; the median of the paired ratios is reported, and the ratio of the best runs of each
(the least disturbed by other programs). Beside each ratio:
the bound m·p/(m+p-1) of equal stages, and the bound of the stages as measured (the slowest
stage sets the pace). Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

import course_utils as cu
from course_utils.pipeline import schedules, stages, worker

RESULTS = Path(__file__).resolve().parent / "results"
NUM_STAGES = 2
MICROBATCHES = (1, 2, 4, 8, 16)


def imbalance_bound(name: str, sizes: list[int], batch_size: int, m: int) -> float:
    """Speedup bound of these stages as measured here: total work / (slowest stage × (m+p-1)/m)."""
    costs = stages.measured_unit_costs(name, batch_size // m, threads=1, repeats=3)
    forward, backward = stages.stage_costs(costs, sizes)
    per_stage = [f + b for f, b in zip(forward, backward)]
    p = len(sizes)
    return sum(per_stage) / max(per_stage) * m / (m + p - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="cnn,rnn")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        ratios: dict[tuple, list] = {}
        extra: dict[tuple, dict] = {}
        for _ in range(args.repeats):
            for schedule in schedules.SCHEDULES:
                for m in MICROBATCHES:
                    if worker.config_error(name, NUM_STAGES, args.batch_size, m, schedule):
                        continue  # 1F1B needs m >= p in torch.distributed.pipelining
                    # The baseline right before each run: a busy machine slows both alike.
                    base = worker.one_process_throughput(name, args.batch_size, 1, args.steps)
                    result = cu.launch.run(
                        worker.profile,
                        NUM_STAGES,
                        worker.Profile(name, m, schedule, "torch", args.batch_size, args.steps),
                        threads=1,
                        timeout=600,
                        device="cpu",  # like the baseline: one CPU process
                    )[0]
                    key = (schedule, m)
                    ratios.setdefault(key, []).append(result["samples_per_s"] / base)
                    info = extra.setdefault(
                        key, {"bubbles": [], "sizes": result["sizes"], "pipe": [], "base": []}
                    )
                    info["pipe"].append(result["samples_per_s"])
                    info["base"].append(base)
                    info["bubbles"].append(schedules.bubble_fraction(result["events"], NUM_STAGES))
        for (schedule, m), values in sorted(ratios.items()):
            sizes = extra[schedule, m]["sizes"]
            bound = schedules.speedup_bound(NUM_STAGES, m)
            info = extra[schedule, m]
            # Median of the paired ratios; and the best pipeline run over the best baseline run
            # (each the least disturbed by other programs, as timeit takes the minimum time).
            speedup, best = statistics.median(values), max(info["pipe"]) / max(info["base"])
            rows.append(
                {
                    "model": name,
                    "schedule": schedule,
                    "microbatches": m,
                    "stage_sizes": sizes,
                    "speedup": speedup,
                    "speedups": values,
                    "speedup_best": best,  # best pipeline run / best baseline run
                    "samples_per_s": info["pipe"],
                    "baseline_samples_per_s": info["base"],
                    "fraction_of_bound_best": best / bound,
                    "bound": bound,
                    "fraction_of_bound": speedup / bound,
                    "bound_of_measured_stages": imbalance_bound(name, sizes, args.batch_size, m),
                    "measured_bubble": statistics.median(extra[schedule, m]["bubbles"]),
                    "formula_bubble": schedules.bubble_formula(NUM_STAGES, m),
                }
            )
            r = rows[-1]
            print(
                f"{name} {schedule:5} m={m:2}: {r['speedup']:.2f}x of 1 process, best "
                f"{best:.2f}x (bound {bound:.2f}: {r['fraction_of_bound']:.0%}, best "
                f"{r['fraction_of_bound_best']:.0%}; these stages allow "
                f"{r['bound_of_measured_stages']:.2f}); bubble {r['measured_bubble']:.2f} "
                f"(formula {r['formula_bubble']:.2f})",
                flush=True,
            )
    out = {
        "machine": f"{platform.machine()}, {cu.hardware.num_cores()} cores",
        "num_stages": NUM_STAGES,
        "batch_size": args.batch_size,
        "threads_per_worker": 1,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
