"""Expert parallelism on 2 ranks x 1 thread against one process holding every expert: the
throughput, and the all-to-all's share of a step.

    python benchmarks/bench_experts.py [--batch-sizes 64 256] [--repeats 5] [--steps 11]
        [--traced-runs 2] [--quick]

The transformer with a mixture of experts in every block (``--model moe``: 4 experts, top-1,
capacity factor 1.25). Every run is a ``RunConfig`` run as a user runs it, ``python -m
course_utils.train`` in a fresh process (``_command_line``), on the CPU:

- ``ep``: ``--parallel none --nproc 2 --ep 2 --threads 1``: each rank reads half the global
  batch and holds 2 of the 4 experts; tokens go to their expert's rank and back by all-to-all;
- ``ddp``: ``--parallel ddp --nproc 2 --threads 1``: each rank holds every expert, the other
  way to use 2 ranks;
- ``one``, ``one x 2 threads``: ``--parallel none`` with 1 and 2 threads, every expert.

In turns (A B C D A B C D ...); ratios are medians of the paired ratios of a round, with
min-max. Then, from the traces of profiled runs (``--profile``, :func:`ep_step`), per rank and
step: the all-to-alls (the dispatch and combine Functions, "AllToAll", forward, and their
backward nodes), the counts' all-gather, the experts' arithmetic ("moe: experts"), and the
step; and the same step of one process. Writes benchmarks/results/experts.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from functools import partial

import _command_line as command_line
from _results import save

import course_utils as cu
from course_utils import profiling
from course_utils.config import RunConfig

CONFIGS = ("ep", "ddp", "one", "one x 2 threads")
TRACED_STEPS = 6  # profiling.Recorder records steps 3-5
PHASES = ("forward", "backward", "optimizer")  # the loop's labelled spans


def config(name: str, batch_size: int, steps: int, profile: str | None = None) -> RunConfig:
    cfg = RunConfig(
        model="moe", batch_size=batch_size, steps=steps, threads=1, device="cpu", profile=profile
    )
    if name == "ep":
        return replace(cfg, nproc=2, ep=2)
    if name == "ddp":
        return replace(cfg, parallel="ddp", nproc=2)
    return replace(cfg, threads=2) if name == "one x 2 threads" else cfg


def run(name: str, batch_size: int, steps: int, profile: str | None = None) -> float:
    return command_line.run(config(name, batch_size, steps, profile))[0]["samples_per_s"]


def ep_step(events: list[dict]) -> dict:
    """One rank's ms per profiled step: ``step``; ``all_to_all`` (the union of the dispatch and
    combine all-to-alls, forward and backward, on the step's thread: the rank waits in them);
    ``gloo_all_to_all`` (gloo's own all-to-all events: the messages' time); ``counts`` (the
    all-gathers of the counts before each dispatch); ``experts`` (the experts' arithmetic,
    forward; its backward is not labelled); ``all_to_all_share`` of the step; and each of the
    loop's phases (forward, backward, optimizer)."""
    complete = [e for e in events if e.get("ph") == "X"]
    steps = [e for e in complete if e["name"].startswith("ProfilerStep#")]
    n = len(steps)

    def ms(keep) -> float:
        return sum(b - a for a, b in profiling.intervals(complete, keep)) / 1e3 / n

    step = statistics.mean(e["dur"] for e in steps) / 1e3
    exchange = ms(
        lambda e: (
            e["name"] == "AllToAll"
            or e["name"] == "autograd::engine::evaluate_function: AllToAllBackward"
        )
    )
    return {
        "step_ms": step,
        "all_to_all_ms": exchange,
        "gloo_all_to_all_ms": ms(lambda e: e["name"] == "gloo:all_to_all"),
        "counts_ms": ms(lambda e: e["name"] == "gloo:all_gather"),
        "experts_ms": ms(lambda e: e["name"] == "moe: experts"),
        "all_to_all_share": exchange / step,
        **{f"{phase}_ms": ms(partial(profiling.is_phase, phases=(phase,))) for phase in PHASES},
    }


def traced(name: str, batch_size: int, runs: int) -> list[dict]:
    """Per rank, the medians of :func:`ep_step` over ``runs`` profiled runs of ``name``."""
    found = []
    ranks = config(name, batch_size, TRACED_STEPS).nproc
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            run(name, batch_size, TRACED_STEPS, profile=folder)
            found.append(
                [ep_step(profiling.events(profiling.trace_path(folder, r))) for r in range(ranks)]
            )
    return [
        {k: statistics.median(one[r][k] for one in found) for k in found[0][r]}
        for r in range(ranks)
    ]


def _phases(s: dict) -> str:
    return ", ".join(f"{phase} {s[phase + '_ms']:.0f}" for phase in PHASES)


def _explain(row: dict) -> list[str]:
    t = row["traces"]
    lines = [
        f"  ep rank {r}: step {s['step_ms']:.0f} ms, all-to-all {s['all_to_all_ms']:.0f} "
        f"({s['all_to_all_share']:.0%}; gloo's messages {s['gloo_all_to_all_ms']:.0f}), the "
        f"counts' all-gather {s['counts_ms']:.0f}, experts forward {s['experts_ms']:.0f}; "
        + _phases(s)
        for r, s in enumerate(t["ep"])
    ]
    one = t["one"][0]
    lines.append(
        f"  one process: step {one['step_ms']:.0f} ms, experts forward {one['experts_ms']:.0f}: "
        f"half its step is {one['step_ms'] / 2:.0f}; " + _phases(one)
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--traced-runs", type=int, default=2, help="profiled runs of each, for traces")
    p.add_argument("--quick", action="store_true", help="batch 64, 2 repeats, 4 steps, 1 trace")
    args = p.parse_args()
    if args.quick:
        args.batch_sizes, args.repeats, args.steps, args.traced_runs = [64], 2, 4, 1
    measures = {
        (b, name): partial(run, name, b, args.steps) for b in args.batch_sizes for name in CONFIGS
    }
    rows = []
    with cu.measure.Watch() as watch:
        speeds = cu.measure.interleaved(measures, args.repeats, progress="experts")
        for b in args.batch_sizes:
            rate = {name: speeds[b, name] for name in CONFIGS}
            row = {"model": "moe", "batch_size": b, "steps": args.steps}
            for name, spread in rate.items():
                row |= spread.as_dict(f"samples_per_s {name}")
            for other in ("one", "one x 2 threads", "ddp"):
                key = "ep_vs_" + other.replace(" ", "_")
                row |= cu.measure.ratios(rate["ep"], rate[other]).as_dict(key)
            row["traces"] = {n: traced(n, b, args.traced_runs) for n in ("ep", "one")}
            rows.append(row)
            print(
                f"batch {b}: expert parallel on 2 ranks {cu.measure.ratios(rate['ep'], rate['one'])}"
                f"x one process with every expert, "
                f"{cu.measure.ratios(rate['ep'], rate['one x 2 threads'])}x one process with 2 "
                f"threads, {cu.measure.ratios(rate['ep'], rate['ddp'])}x DDP on 2 ranks",
                *_explain(row),
                sep="\n",
                flush=True,
            )
    print(watch.note())
    print(f"wrote {save('experts', rows, args.repeats, watch, {'quick': args.quick})}")


if __name__ == "__main__":
    main()
