"""Pipeline parallelism on the command line's own path: 2 stages against one process, 1 thread each.

    python benchmarks/bench_pipeline.py [--batch-size 256] [--transformer-batch-size 256]
        [--steps 10] [--repeats 3] [--models cnn,rnn,transformer] [--schedules 1f1b,gpipe]
        [--microbatches 2,8] [--traced-runs 1]

Every run is a ``RunConfig`` run as a user runs it: ``python -m course_utils.train`` with its
flags, a fresh process each (``_command_line``), on the CPU, 1 thread per process, reporting
``samples_per_s`` as the command line does (the steps after the first): the pipeline
(``--parallel pipeline --nproc 2 --microbatches m --schedule s``: stages balanced by measured
time, ``torch.distributed.pipelining``) and, right before it, its baseline ``--parallel none
--threads 1`` on the same batch, so that each ratio compares two runs on the same (possibly busy)
machine. Every configuration of a model runs once per round, in turns. The speedup is the median
of the paired ratios, with min-max and the ratio of the best runs (the least disturbed), beside
the bound m·p/(m+p-1) of equal stages and the bound of the stages as measured (the slowest stage
sets the pace).

Where the step went, from the traces of profiled runs (``--profile``, the steps
``profiling.Recorder`` records): each stage's busy time per step (its labelled forward, backward
and optimizer spans), the stages' work over the baseline's (the cost of cutting the model into
stages and microbatches), the idle share against the formula's bubble (m+p-1 slots for m), and
how long some gloo message was in flight on each rank. Writes benchmarks/results/pipeline.json,
keeping the rows of the configurations not measured this time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from functools import partial

import _command_line as command_line
import torch
from _results import RESULTS, save

import course_utils as cu
from course_utils import profiling
from course_utils.config import RunConfig
from course_utils.pipeline import config_error, schedules, stages
from course_utils.pipeline.zero_bubble import V_SCHEDULES

NUM_STAGES = 2
MICROBATCHES = (1, 2, 4, 8, 16)
TRACED_STEPS = 6  # profiled runs: profiling.Recorder records steps 3-5 (after a warm-up)


def config(model: str, batch_size: int, steps: int, schedule: str | None, m: int) -> RunConfig:
    """The pipeline's configuration, or with ``schedule`` None its baseline (one process)."""
    cfg = RunConfig(model=model, batch_size=batch_size, steps=steps, threads=1, device="cpu")
    if schedule is None:
        return cfg
    return replace(cfg, parallel="pipeline", nproc=NUM_STAGES, microbatches=m, schedule=schedule)


def run(cfg: RunConfig, seen: dict | None = None) -> float:
    """Samples/s of one run, a fresh ``python -m course_utils.train`` (the first step excluded);
    ``seen`` gets its stage sizes."""
    (result,) = command_line.run(cfg)
    if seen is not None and "stage_sizes" in result:
        seen["stage_sizes"] = result["stage_sizes"]
    return result["samples_per_s"]


def imbalance_bound(name: str, sizes: list[int], batch_size: int, m: int) -> float:
    """Speedup bound of these stages as measured here: total work / (slowest stage × (m+p-1)/m)."""
    costs = stages.measured_unit_costs(name, batch_size // m, threads=1, repeats=3)
    forward, backward = stages.stage_costs(costs, sizes)
    per_stage = [f + b for f, b in zip(forward, backward)]
    return sum(per_stage) / max(per_stage) * m / (m + len(sizes) - 1)


def traced(cfg: RunConfig, repeats: int) -> dict:
    """Medians over ``repeats`` profiled runs of ``cfg``: per rank, ms per step of the whole step,
    of its labelled spans (busy), and of gloo's messages in flight."""
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            run(replace(cfg, steps=TRACED_STEPS, profile=folder))
            paths = [profiling.trace_path(folder, r) for r in range(cfg.nproc)]
            summaries = [profiling.summary(path) for path in paths]
            runs.append(
                {
                    "step_ms": [_step_ms(profiling.events(path)) for path in paths],
                    "busy_ms": [1e3 * s["compute_s"] for s in summaries],
                    "gloo_ms": [1e3 * s["communication_s"] for s in summaries],
                }
            )
    return {
        key: [statistics.median(r[key][rank] for r in runs) for rank in range(cfg.nproc)]
        for key in runs[0]
    }


def _step_ms(events: list[dict]) -> float:
    steps = [
        e["dur"] for e in events if e.get("ph") == "X" and e["name"].startswith("ProfilerStep#")
    ]
    return statistics.mean(steps) / 1e3


def measure(name: str, batch: int, names: tuple, args) -> list[dict]:
    """The rows of one model: every valid (schedule, m), its paired ratios and its traces."""
    configs = [
        (schedule, m)
        for schedule in names
        for m in map(int, args.microbatches.split(","))
        if not config_error(name, NUM_STAGES, batch, m, schedule)  # 1F1B needs m >= p
    ]
    seen = {c: {} for c in configs}
    measures = {}
    for schedule, m in configs:  # each pipeline right after its own baseline
        measures[schedule, m, "one"] = partial(run, config(name, batch, args.steps, None, m))
        pipe = config(name, batch, args.steps, schedule, m)
        measures[schedule, m, "pipe"] = partial(run, pipe, seen[schedule, m])
    speeds = cu.measure.interleaved(measures, args.repeats, progress=name)
    one_traced = traced(config(name, batch, args.steps, None, 1), args.traced_runs)
    rows = []
    for schedule, m in configs:
        pipe, one = speeds[schedule, m, "pipe"], speeds[schedule, m, "one"]
        ratio = cu.measure.ratios(pipe, one)
        bound = schedules.speedup_bound(NUM_STAGES, m)
        sizes = seen[schedule, m]["stage_sizes"]
        row = {
            "model": name,
            "timed": "python -m course_utils.train",  # (earlier rows: a harness of its own)
            "batch_size": batch,
            "schedule": schedule,
            "microbatches": m,
            "stage_sizes": sizes,
            "speedup": ratio.median,
            "speedups": list(ratio.samples),
            "bound": bound,
            "fraction_of_bound": ratio.median / bound,
            "fraction_of_bound_min": ratio.low / bound,
            "fraction_of_bound_max": ratio.high / bound,
            "speedup_best": pipe.high / one.high,
            "fraction_of_bound_best": pipe.high / one.high / bound,
            "samples_per_s": list(pipe.samples),
            "baseline_samples_per_s": list(one.samples),
            "bound_of_measured_stages": imbalance_bound(name, sizes, batch, m),
            "formula_bubble": schedules.bubble_formula(NUM_STAGES, m),
        }
        if args.traced_runs:
            t = traced(config(name, batch, args.steps, schedule, m), args.traced_runs)
            step = statistics.mean(t["step_ms"])
            row |= {
                "stage_busy_ms": t["busy_ms"],
                "stage_work_over_one_process": sum(t["busy_ms"]) / one_traced["busy_ms"][0],
                "measured_bubble": 1 - statistics.mean(t["busy_ms"]) / step,
                "gloo_in_flight_ms": t["gloo_ms"],
                "step_ms": step,
                "one_process_step_ms": one_traced["step_ms"][0],
            }
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    text = (
        f"{r['model']} batch {r['batch_size']} {r['schedule']:5} m={r['microbatches']:2}: "
        f"{r['speedup']:.2f}x one process ({r['fraction_of_bound']:.0%} of the bound "
        f"{r['bound']:.2f}, {r['fraction_of_bound_min']:.0%}-{r['fraction_of_bound_max']:.0%}; "
        f"best runs {r['fraction_of_bound_best']:.0%}); these stages allow "
        f"{r['bound_of_measured_stages']:.2f}"
    )
    if "stage_busy_ms" in r:
        text += (
            f"; traces: step {r['step_ms']:.1f} ms against one process's "
            f"{r['one_process_step_ms']:.1f}, stages busy "
            f"{'/'.join(f'{t:.1f}' for t in r['stage_busy_ms'])} ms, their work "
            f"{r['stage_work_over_one_process']:.2f}x one process's, idle "
            f"{r['measured_bubble']:.0%} (formula {r['formula_bubble']:.0%}), gloo in flight "
            f"{'/'.join(f'{t:.1f}' for t in r['gloo_in_flight_ms'])} ms"
        )
    return text


def _key(row: dict) -> tuple:
    return row["model"], row["schedule"], row["microbatches"]


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
    p.add_argument("--traced-runs", type=int, default=1, help="profiled runs of each (0: none)")
    args = p.parse_args()
    torch.set_num_threads(1)  # the bound of the measured stages: unit costs on one thread
    rows = []
    with cu.measure.Watch() as watch:
        for name in args.models.split(","):
            batch = args.transformer_batch_size if name == "transformer" else args.batch_size
            names = schedules.SCHEDULES + (V_SCHEDULES if name == "transformer" else ())
            if args.schedules:
                names = tuple(s for s in names if s in args.schedules.split(","))
            rows += measure(name, batch, names, args)
    print(watch.note())
    measured = {_key(r) for r in rows}
    previous = RESULTS / "pipeline.json"
    if previous.exists():  # keep the rows of the configurations not measured this time
        rows = [
            r for r in json.loads(previous.read_text())["rows"] if _key(r) not in measured
        ] + rows
    extra = {"num_stages": NUM_STAGES, "threads_per_worker": 1, "steps": args.steps}
    print(f"wrote {save('pipeline', rows, args.repeats, watch, extra)}")


if __name__ == "__main__":
    main()
