"""Precision on the slow link (issue 27, lesson 15): FSDP across the cluster's two nodes under
``--precision fp32`` and ``bf16``, the bytes each node's link carries per step against what
FSDP2's collectives are handed by definition, what a rank holds, and the accuracy.

    python benchmarks/bench_precision.py [--repeats 3] [--steps 20] [--rate 100mbit] [--quick]

It needs root (network namespaces); without, it says why in one line and measures nothing. Its
cluster is ``precbench`` (an earlier run's leftover of that name is removed first; it goes down in
``finally``, SIGTERM included). Each run is ``python -m course_utils.train --model transformer
--parallel fsdp --precision P --eval`` under torchrun on both nodes, one worker each
(``cluster.torchrun.job``), the two precisions once per round, in turns
(``cu.measure.interleaved``), medians.

**The bytes** per step on each node's link are ``cluster.link_bytes`` around a run, less a short
run's with the same precision, per extra step (start-up drops out). With 2 ranks each collective
is a ring of 2, so a rank sends what it hands over: the all-gathers' shards (in the policy's
``param_dtype``) and, gloo's reduce-scatter being an all-reduce of 2, its whole gradient input
(float32 under both precisions): ``cu.fsdp_precision.handed(P, 2)``, summed; TCP's headers and
the losses' sums come on top. **What a rank holds** (between steps, and at a step's fullest) is
the run's JSON (``state_bytes``, ``peak_state_bytes``). **The step** is reported, not compared:
a CPU without bfloat16 units (``cu.hardware.bf16_units``) runs bf16 several times slower.
Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

from _results import check_link, on_cluster, save, skip

import course_utils as cu
from course_utils import cluster, fsdp_precision
from course_utils.cluster import torchrun

NAME = "precbench"  # this benchmark's cluster
KINDS = ("fp32", "bf16")
SHORT_STEPS = 4  # the run whose bytes are start-up and a few steps: subtracted per step
RUN_TIMEOUT_S = 300
ARGS = ["--model", "transformer", "--optimizer", "adamw", "--lr", "0.001", "--threads", "1"]


def run(made, kind: str, steps: int, batch: int, folder: Path) -> dict:
    """One torchrun job across the nodes: rank 0's JSON, with the bytes each node sent."""
    out = folder / "run.json"
    out.unlink(missing_ok=True)
    args = [*ARGS, "--parallel", "fsdp", "--precision", kind, "--eval", "--json", str(out)]
    args += ["--batch-size", str(batch), "--steps", str(steps)]
    before = [cluster.link_bytes(made, node)["sent"] for node in range(made.nodes)]
    try:
        result = torchrun.results(torchrun.job(made, args, logs=folder), RUN_TIMEOUT_S, out)
    finally:
        for node in range(made.nodes):  # workers a killed agent left behind
            cluster.kill_node(made, node)
    result["sent"] = [cluster.link_bytes(made, n)["sent"] - b for n, b in enumerate(before)]
    result["step_ms"] = batch / result["samples_per_s"] * 1e3
    return result


def measure(args, folder: Path) -> list[dict]:
    made = cluster.up(cluster.Cluster(NAME, 2, args.rate))
    runs: dict[str, list[dict]] = {}

    def timed(kind: str) -> float:
        result = run(made, kind, args.steps, args.batch_size, folder)
        runs.setdefault(kind, []).append(result)
        return result["step_ms"]

    measures = {kind: partial(timed, kind) for kind in KINDS}
    spreads = cu.measure.interleaved(measures, args.repeats, progress="precisions")
    rows = []
    for kind in KINDS:
        short = run(made, kind, SHORT_STEPS, args.batch_size, folder)
        extra, last = args.steps - SHORT_STEPS, runs[kind][-1]
        sent = [
            statistics.median(r["sent"][n] - short["sent"][n] for r in runs[kind]) / extra
            for n in range(made.nodes)
        ]
        handed = fsdp_precision.handed(kind, world_size=2)
        row = {"precision": kind, "sent_per_step": sent, "handed": handed}
        row |= {"model_bytes": sum(handed.values()), "test_accuracy": last.get("test_accuracy")}
        row |= {"held": last["state_bytes"]["total"], "peak": last["peak_state_bytes"]["total"]}
        row |= spreads[kind].as_dict("step_ms")
        rows.append(row)
        print(
            f"--precision {kind}: each node sent {'/'.join(f'{b:,.0f}' for b in sent)} B a step "
            f"(handed to FSDP2's collectives: {row['model_bytes']:,}); held {row['held']:,} B, "
            f"{row['peak']:,} at the peak; test accuracy {row['test_accuracy']:.3f}; step "
            f"{row['step_ms']:.0f} ms ({row['step_ms_min']:.0f}-{row['step_ms_max']:.0f})",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="steps of each timed run")
    p.add_argument("--batch-size", type=int, default=64, help="global")
    p.add_argument("--rate", default="100mbit", help="the slow link (tc's units)")
    p.add_argument("--quick", action="store_true", help="1 repeat of 10 steps: a short check")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 10
    check_link(p, args, SHORT_STEPS)
    with cu.measure.Watch() as watch:
        rows, reason = on_cluster(NAME, partial(measure, args))
    if reason is not None:
        skip("precision", reason, args.repeats, watch)
        return
    extra = {"rate": args.rate, "steps": args.steps, "batch_size": args.batch_size}
    extra |= {"bf16_units": cu.hardware.bf16_units(), "quick": args.quick}
    print(f"wrote {save('precision', rows, args.repeats, watch, extra)}")
    print(cu.readout.busy(watch))


if __name__ == "__main__":
    main()
