"""Pipeline parallelism: throughput of 2 stages against one process with one thread.

    python benchmarks/bench_pipeline.py [--batch-size 256] [--transformer-batch-size 256]
        [--steps 10] [--repeats 3] [--models cnn,rnn,transformer] [--schedules 1f1b,gpipe]
        [--microbatches 2,8] [--engine torch] [--no-pin]

For each model (CNN, RNN, transformer), schedule (GPipe, 1F1B) and number of microbatches m = 1,
2, 4, 8, 16, 2 worker processes with 1 thread each (each pinned to its own core) train a few steps
(stages balanced by measured time). Two baselines, each measured right before each run, so that
each ratio compares runs on the same (possibly busy) machine: the whole model in one process with
one thread on the whole batch, and the same process running the pipeline's m microbatches one
after the other (the same arithmetic and operation sizes: a speedup over it is the pipelining
alone; a big batch in one piece can be slower per sample, its activations overflowing the
caches). The median of the paired ratios is reported, and the ratio of the best runs of each (the
least disturbed by other programs). Beside each ratio: the bound m·p/(m+p-1) of equal stages, and
the bound of the stages as measured (the slowest stage sets the pace), and where the step went:
each stage's busy time (from the last step's timeline), their sum over one process's time for the
same microbatches (the cost of cutting the model), the CPU time each rank's gloo network thread
took per step (it copies the messages on the core its rank computes on; counted in the kernel's
clock ticks, so to about 1 ms per step over 10 steps), and the idle share beyond
the formula's bubble (what messages and waiting add).
Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

import course_utils as cu
from course_utils.pipeline import schedules, stages, worker

RESULTS = Path(__file__).resolve().parent / "results"
NUM_STAGES = 2
MICROBATCHES = (1, 2, 4, 8, 16)


def thread_cpu_s(prefix: str = "gloo") -> float:
    """CPU seconds used so far by this process's threads whose name starts with ``prefix``
    (gloo's network threads), from /proc (Linux; 0.0 elsewhere)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir("/proc/self/task"):
            task = Path("/proc/self/task", tid)
            if (task / "comm").read_text().startswith(prefix):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    except OSError:
        return 0.0
    return total


def profile_and_network(run: worker.Profile) -> dict | None:
    """:func:`course_utils.pipeline.worker.profile`, plus the CPU time that each rank's gloo
    network thread (which copies the messages, on the core the rank computes on) took per step.
    The stages are planned first, outside the count (the other ranks wait meanwhile)."""
    if run.sizes is None:
        stages_in_all = worker.virtual_stages(run.model, dist.get_world_size(), run.schedule)
        sizes = worker.measured_plan(
            run.model, stages_in_all, run.batch_size // run.microbatches, run.seed
        )
        run = dataclasses.replace(run, sizes=sizes)
    dist.barrier()
    before = thread_cpu_s()
    result = worker.profile(run)
    per_step = (thread_cpu_s() - before) / run.num_steps
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, per_step)
    if result is not None:
        result["network_cpu_s_per_step"] = everyone
    return result


def imbalance_bound(name: str, sizes: list[int], batch_size: int, m: int) -> float:
    """Speedup bound of these stages as measured here: total work / (slowest stage × (m+p-1)/m)."""
    costs = stages.measured_unit_costs(name, batch_size // m, threads=1, repeats=3)
    forward, backward = stages.stage_costs(costs, sizes)
    per_stage = [f + b for f, b in zip(forward, backward)]
    p = len(sizes)
    return sum(per_stage) / max(per_stage) * m / (m + p - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--transformer-batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="cnn,rnn,transformer")
    p.add_argument(
        "--schedules", default=None, help="default: all (and the V ones for the transformer)"
    )
    p.add_argument("--microbatches", default=",".join(map(str, MICROBATCHES)))
    p.add_argument("--engine", default="torch", choices=worker.ENGINES)
    p.add_argument("--no-pin", dest="pin", action="store_false")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        batch = args.transformer_batch_size if name == "transformer" else args.batch_size
        runs: dict[tuple, dict] = {}
        names = schedules.SCHEDULES + (worker.V_SCHEDULES if name == "transformer" else ())
        if args.schedules:
            names = tuple(s for s in names if s in args.schedules.split(","))
        for _ in range(args.repeats):
            for schedule in names:
                for m in map(int, args.microbatches.split(",")):
                    if worker.config_error(name, NUM_STAGES, batch, m, schedule):
                        continue  # 1F1B needs m >= p in torch.distributed.pipelining
                    if schedule in worker.V_SCHEDULES and args.engine != "torch":
                        continue
                    # The baselines right before each run: a busy machine slows them all alike.
                    whole = worker.one_process_throughput(name, batch, 1, args.steps)
                    pieces = worker.one_process_throughput(name, batch, 1, args.steps, 0, m)
                    result = cu.launch.run(
                        profile_and_network,
                        NUM_STAGES,
                        worker.Profile(name, m, schedule, args.engine, batch, args.steps),
                        threads=1,
                        timeout=600,
                        device="cpu",  # like the baselines: CPU processes
                        pin=args.pin,
                    )[0]
                    run = runs.setdefault((schedule, m), {"sizes": result["sizes"]})
                    busy = [0.0] * NUM_STAGES  # each rank's compute in the recorded step, s
                    for e in result["events"]:
                        busy[e.row] += e.end - e.start
                    for key, value in (
                        ("busy", busy),
                        ("network", result["network_cpu_s_per_step"]),
                        ("pipe", result["samples_per_s"]),
                        ("whole", whole),
                        ("pieces", pieces),
                        ("bubble", schedules.bubble_fraction(result["events"], NUM_STAGES)),
                    ):
                        run.setdefault(key, []).append(value)
        for (schedule, m), run in sorted(runs.items()):
            bound = schedules.speedup_bound(NUM_STAGES, m)
            ratios = [p / b for p, b in zip(run["pipe"], run["whole"])]
            speedup = statistics.median(ratios)
            # the stages' compute over one process's step on the same microbatches
            work = [sum(b) * s / batch for b, s in zip(run["busy"], run["pieces"])]
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
                    "speedups": ratios,
                    "fraction_of_bound_min": min(ratios) / bound,
                    "fraction_of_bound_max": max(ratios) / bound,
                    "stage_busy_ms": [
                        1e3 * statistics.median(b[r] for b in run["busy"])
                        for r in range(NUM_STAGES)
                    ],
                    "stage_work_over_one_process": statistics.median(work),
                    "network_thread_ms_per_step": [
                        1e3 * statistics.median(n[r] for n in run["network"])
                        for r in range(NUM_STAGES)
                    ],
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
                f"({r['fraction_of_bound']:.0%} of the bound {bound:.2f}, "
                f"{r['fraction_of_bound_min']:.0%}-{r['fraction_of_bound_max']:.0%}), "
                f"{over_pieces:.2f}x of 1 process on the same microbatches "
                f"({r['fraction_of_bound_microbatched']:.0%}); these stages allow "
                f"{r['bound_of_measured_stages']:.2f}; bubble {r['measured_bubble']:.2f} "
                f"(formula {r['formula_bubble']:.2f}); stages busy "
                f"{[round(t, 1) for t in r['stage_busy_ms']]} ms, their work "
                f"{r['stage_work_over_one_process']:.2f}x one process's; gloo's network "
                f"thread {[round(t, 1) for t in r['network_thread_ms_per_step']]} ms per step",
                flush=True,
            )
    measured = {(r["model"], r["schedule"]) for r in rows}
    previous = RESULTS / "pipeline.json"
    if previous.exists():  # keep the rows of the models and schedules not measured this time
        old = json.loads(previous.read_text())
        kept = [r for r in old.get("rows", []) if (r["model"], r["schedule"]) not in measured]
        for r in kept:  # older files named the batch once, at the top
            key = "transformer_batch_size" if r["model"] == "transformer" else "batch_size"
            r.setdefault("batch_size", old.get(key))
        rows = kept + rows
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
