"""Pipeline parallelism: throughput of 2 stages against one process with one thread.

    python benchmarks/bench_pipeline.py [--batch-size 128] [--transformer-batch-size 256]
        [--steps 10] [--repeats 3] [--models cnn,rnn,transformer] [--engine torch] [--no-pin]

For each model (CNN, RNN, transformer), schedule (GPipe, 1F1B) and number of microbatches m = 1,
2, 4, 8, 16, 2 worker processes with 1 thread each (each pinned to its own core) train a few steps
(stages balanced by measured time). Two baselines, each measured right before each run, so that
each ratio compares runs on the same (possibly busy) machine: the whole model in one process with
one thread on the whole batch, and the same process running the pipeline's m microbatches one
after the other (the same arithmetic and operation sizes: a speedup over it is the pipelining
alone; a big batch in one piece can be slower per sample, its activations overflowing the
caches). The median of the paired ratios is reported, and the ratio of the best runs of each (the
least disturbed by other programs). Beside each ratio: the bound m·p/(m+p-1) of equal stages, and
the bound of the stages as measured (the slowest stage sets the pace).
Writes benchmarks/results/pipeline.json.
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
    p.add_argument("--transformer-batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="cnn,rnn,transformer")
    p.add_argument("--engine", default="torch", choices=worker.ENGINES)
    p.add_argument("--no-pin", dest="pin", action="store_false")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        batch = args.transformer_batch_size if name == "transformer" else args.batch_size
        runs: dict[tuple, dict] = {}
        names = schedules.SCHEDULES + (worker.V_SCHEDULES if name == "transformer" else ())
        for _ in range(args.repeats):
            for schedule in names:
                for m in MICROBATCHES:
                    if worker.config_error(name, NUM_STAGES, batch, m, schedule):
                        continue  # 1F1B needs m >= p in torch.distributed.pipelining
                    if schedule in worker.V_SCHEDULES and args.engine != "torch":
                        continue
                    # The baselines right before each run: a busy machine slows them all alike.
                    whole = worker.one_process_throughput(name, batch, 1, args.steps)
                    pieces = worker.one_process_throughput(name, batch, 1, args.steps, 0, m)
                    result = cu.launch.run(
                        worker.profile,
                        NUM_STAGES,
                        worker.Profile(name, m, schedule, args.engine, batch, args.steps),
                        threads=1,
                        timeout=600,
                        device="cpu",  # like the baselines: CPU processes
                        pin=args.pin,
                    )[0]
                    run = runs.setdefault((schedule, m), {"sizes": result["sizes"]})
                    for key, value in (
                        ("pipe", result["samples_per_s"]),
                        ("whole", whole),
                        ("pieces", pieces),
                        ("bubble", schedules.bubble_fraction(result["events"], NUM_STAGES)),
                    ):
                        run.setdefault(key, []).append(value)
        for (schedule, m), run in sorted(runs.items()):
            bound = schedules.speedup_bound(NUM_STAGES, m)
            speedup = statistics.median(p / b for p, b in zip(run["pipe"], run["whole"]))
            over_pieces = statistics.median(p / b for p, b in zip(run["pipe"], run["pieces"]))
            # the best pipeline run over the best baseline run (the least disturbed, as timeit)
            best = max(run["pipe"]) / max(run["whole"])
            rows.append(
                {
                    "model": name,
                    "batch_size": batch,
                    "schedule": schedule,
                    "microbatches": m,
                    "stage_sizes": run["sizes"],
                    "speedup": speedup,
                    "speedups": [p / b for p, b in zip(run["pipe"], run["whole"])],
                    "speedup_best": best,
                    "speedup_over_microbatched": over_pieces,
                    "samples_per_s": run["pipe"],
                    "baseline_samples_per_s": run["whole"],
                    "microbatched_samples_per_s": run["pieces"],
                    "bound": bound,
                    "fraction_of_bound": speedup / bound,
                    "fraction_of_bound_best": best / bound,
                    "fraction_of_bound_microbatched": over_pieces / bound,
                    "bound_of_measured_stages": imbalance_bound(name, run["sizes"], batch, m),
                    "measured_bubble": statistics.median(run["bubble"]),
                    "formula_bubble": schedules.bubble_formula(NUM_STAGES, m),
                }
            )
            r = rows[-1]
            print(
                f"{name} batch {batch} {schedule:5} m={m:2}: {speedup:.2f}x of 1 process "
                f"({r['fraction_of_bound']:.0%} of the bound {bound:.2f}), "
                f"{over_pieces:.2f}x of 1 process on the same microbatches "
                f"({r['fraction_of_bound_microbatched']:.0%}); these stages allow "
                f"{r['bound_of_measured_stages']:.2f}; bubble {r['measured_bubble']:.2f} "
                f"(formula {r['formula_bubble']:.2f})",
                flush=True,
            )
    measured = set(args.models.split(","))
    previous = RESULTS / "pipeline.json"
    if previous.exists():  # keep the rows of the models not measured this time
        kept = json.loads(previous.read_text()).get("rows", [])
        rows = [r for r in kept if r["model"] not in measured] + rows
    out = {
        "machine": f"{platform.machine()}, {cu.hardware.num_cores()} cores",
        "num_stages": NUM_STAGES,
        "batch_size": args.batch_size,
        "transformer_batch_size": args.transformer_batch_size,
        "engine": args.engine,
        "pinned": args.pin,
        "threads_per_worker": 1,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
