"""Placement across the cluster's slow link (issue 27): the transformer at one global batch with
each layout of 2 nodes x 2 workers, its step and the bytes on the link, against the two-link model.

    python benchmarks/bench_placement.py [--rate 100mbit] [--repeats 3] [--steps 20]
        [--batch-size 64] [--quick]

It needs root (network namespaces); without, it says why in one line and measures nothing. Its
cluster is ``placebench`` (an earlier run's leftover of that name is removed first; it goes down
in ``finally``, SIGTERM included). Each layout is ``python -m course_utils.train --model
transformer --optimizer adamw --lr 0.001 --threads 1`` under torchrun on each node
(``cluster.torchrun.job``, ``nproc_per_node=2``: ranks 0-1 on node 0, 2-3 on node 1), with:

- **ddp**: ``--parallel ddp``, a replica per rank, one all-reduce of the gradient over all 4;
- **fsdp**: ``--parallel fsdp``, shards over all 4: every block's weights all-gathered over the
  link forward and again backward, its gradient reduce-scattered over it;
- **hsdp**: ``--parallel fsdp --replicate 2``, shards inside the node, replicated across: only
  the all-reduce of each rank's gradient shard crosses;
- **ddp x tp**: ``--parallel ddp --tp 2``, tensor parallel over consecutive ranks (the mesh's
  innermost dimension: inside the node), replicas across: each rank's gradient (its slices and
  the parts every rank holds whole) all-reduced with its twin on the other node;
- **tp x ddp**: ``--parallel ddp --tp 2 --tp-outer``, the reverse: tensor parallel outermost,
  each pair one rank per node, and the replicas side by side in a node. The gradient's
  all-reduce stays inside; tensor parallel's all-reduces of the activations (each a replica's
  tokens x width) cross: DTensor's plan (``tensor_parallel.plan``) sums each row-parallel
  layer's output forward and each column-parallel layer's input gradient backward, 6 a block
  (q, k and v each their own: Megatron's ``f`` by hand sums the three once, 4 a block);
- **pipeline**: ``--parallel pipeline``, 4 stages, 2 per node: only one stage boundary's
  activations (forward) and their gradients (backward) cross.

Every layout runs once per round at the slow ``--rate`` and once with no limit, in turns
(``cu.measure.interleaved``), medians over rounds. A step is ``batch_size / samples_per_s`` of rank
0's JSON; the bytes on the link per step are each node's ``cluster.link_bytes`` around a run, less
a short run's (start-up, the first broadcast), per extra step.

**The model** (``course_utils.topology``'s two links): each layout's bytes per step on each node's
link, from its collectives (``TwoLinks.link_bytes``: a ring over all 4 ranks puts 2(N-1)/N of what
it all-reduces on the link, 1.5 B, an all-gather or a reduce-scatter half of that; the (replicate,
shard) or (dp, tp) mesh's cross-node all-reduce B; with tp across the nodes, B of the activations
(each replica's pair rings across, and the pairs share the link), nothing of the gradient; a
pipeline's boundary activations), and its step ``C + link bytes / beta_inter``, where C, the
step's compute and fast communication, is the same layout's step with no limit on the link
(paired by round), beta_inter the link's payload rate (``bench_hierarchy``'s fit at the same rate
when there is one, else the rate less the packets' headers), alpha_inter 0 (the fit finds it
below its noise). The ranking by the model and by the measurement are printed side by side. 4
workers share 2 cores, with other programs: the compute part is noisy; read the min-max.
Writes benchmarks/results/placement.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

from _results import RESULTS, check_link, on_cluster, save, skip

import course_utils as cu
from course_utils import cluster, tensor_parallel
from course_utils.cluster import torchrun
from course_utils.topology import TwoLinks

NAME = "placebench"  # this benchmark's cluster
NODES, PER_NODE = 2, 2
LAYOUTS = {
    "ddp": ["--parallel", "ddp"],
    "fsdp": ["--parallel", "fsdp"],
    "hsdp": ["--parallel", "fsdp", "--replicate", "2"],
    "ddp x tp": ["--parallel", "ddp", "--tp", "2"],
    "tp x ddp": ["--parallel", "ddp", "--tp", "2", "--tp-outer"],
    "pipeline": ["--parallel", "pipeline"],
}
TRAIN = ["--model", "transformer", "--optimizer", "adamw", "--lr", "0.001", "--threads", "1"]
SHORT_STEPS = 5
RUN_TIMEOUT_S = 300
PAYLOAD_SHARE = (1500 - 20 - 32) / (1500 + 14)  # TCP payload per Ethernet frame (bench_cluster)


def run(made, layout: str, steps: int, batch: int, folder: Path) -> dict:
    """One torchrun job: rank 0's JSON, with the bytes each node's link sent."""
    out = folder / "run.json"
    out.unlink(missing_ok=True)
    args = [*TRAIN, *LAYOUTS[layout], "--batch-size", str(batch), "--steps", str(steps)]
    args += ["--json", str(out)]
    before = [cluster.link_bytes(made, node)["sent"] for node in range(NODES)]
    job = torchrun.job(made, args, logs=folder, nproc_per_node=PER_NODE)
    try:
        codes = torchrun.finish(job, RUN_TIMEOUT_S)
    finally:
        job.stop()
        for node in range(NODES):  # workers a killed agent left behind
            cluster.kill_node(made, node)
    if any(codes.values()):
        raise RuntimeError(f"{layout} failed {codes}; node 0 said:\n{job.log(0)[-2000:]}")
    result = json.loads(out.read_text())
    result["sent"] = [cluster.link_bytes(made, n)["sent"] - b for n, b in enumerate(before)]
    result["step_ms"] = batch / result["samples_per_s"] * 1e3
    return result


def model_bytes(layout: str, result: dict, batch: int) -> float:
    """Payload bytes each node's link carries per step, each way, by the layout's collectives."""
    model = cu.models.build("transformer", seed=0)
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    whole = size(model.parameters())
    blocks = size(model.blocks.parameters())
    ring = partial(TwoLinks.link_bytes, "flat", nodes=NODES, per_node=PER_NODE)
    across = partial(TwoLinks.link_bytes, "mesh", nodes=NODES, per_node=PER_NODE)
    if layout == "ddp":
        return float(ring(whole))
    if layout == "fsdp":  # blocks: 2 all-gathers + a reduce-scatter; the root kept: 1 + 1
        return float(ring(blocks) / 2 * 3 + ring(whole - blocks) / 2 * 2)
    if layout == "hsdp":  # each rank's shard all-reduced with its twin on the other node
        return float(across(whole))
    if layout == "ddp x tp":  # each of a node's ranks all-reduces what it holds across
        return float(across(PER_NODE * result["state_bytes"]["parameters"]))
    _, tokens, dim = model.pos.shape
    if layout == "tp x ddp":  # a ring of M per replica, P of them on the link; gradients: none
        calls = len(tensor_parallel.plan(model))  # a row-parallel output or a column's input grad
        activations = calls * batch * tokens * dim * 4
        return float(across(activations) + across(whole, dp_across=False))
    return float(batch * tokens * dim * 4)  # pipeline: one boundary's activations, each way


def links(rate: str) -> tuple[float, float]:
    """beta_inter at ``rate`` and with no limit (bytes/s): measured by bench_hierarchy and
    bench_cluster where their results hold them, else the rate less the headers."""
    inter = cluster.rate_bytes(rate) * PAYLOAD_SHARE
    path = RESULTS / "hierarchy.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    if found.get("rate") == rate and "fit" in found:
        inter = found["fit"]["inter"]["beta_bytes_per_s"]
    path = RESULTS / "cluster.json"
    found = json.loads(path.read_text()).get("link", {}) if path.is_file() else {}
    return inter, found.get("beta_bytes_per_s", float("inf"))


def measure(args, folder: Path) -> tuple[list[dict], dict]:
    made = cluster.up(cluster.Cluster(NAME, NODES, args.rate))
    short = {}
    for layout in LAYOUTS:  # the bytes of start-up and a few steps: subtracted per step
        short[layout] = run(cluster.set_rate(made, None), layout, SHORT_STEPS, args.batch_size,
                            folder)["sent"]  # fmt: skip
    runs: dict[tuple[str, str], list[dict]] = {}

    def timed(layout: str, rate: str | None) -> float:
        result = run(cluster.set_rate(made, rate), layout, args.steps, args.batch_size, folder)
        runs.setdefault((layout, rate or "unlimited"), []).append(result)
        return result["step_ms"]

    measures = {}
    for layout in LAYOUTS:
        measures[f"{layout}, unlimited"] = partial(timed, layout, None)
        measures[f"{layout}, {args.rate}"] = partial(timed, layout, args.rate)
    spreads = cu.measure.interleaved(measures, args.repeats, progress="placement")
    beta, beta_fast = links(args.rate)
    rows = []
    for layout in LAYOUTS:
        slow, fast = spreads[f"{layout}, {args.rate}"], spreads[f"{layout}, unlimited"]
        extra = args.steps - SHORT_STEPS
        sent = [
            statistics.median(r["sent"][n] - short[layout][n] for r in runs[layout, args.rate])
            / extra
            for n in range(NODES)
        ]
        nbytes = model_bytes(layout, runs[layout, args.rate][-1], args.batch_size)
        link_ms = nbytes * (1 / beta - 1 / beta_fast) * 1e3
        model = cu.measure.spread(t + link_ms for t in fast.samples)  # paired by round
        row = {"layout": layout, "args": LAYOUTS[layout], "rate": args.rate}
        row |= slow.as_dict("step_ms") | {"step_ms_samples": list(slow.samples)}
        row |= fast.as_dict("unlimited_step_ms") | {"unlimited_samples": list(fast.samples)}
        row |= {"sent_per_step": sent, "model_bytes": nbytes, "model_link_ms": link_ms}
        row |= model.as_dict("model_step_ms")
        row |= cu.measure.ratios(slow, model).as_dict("of_model")
        row["mesh"] = runs[layout, args.rate][-1].get("mesh")
        rows.append(row)
    by = {r["layout"]: r for r in rows}
    fsdp, hsdp = (spreads[f"{name}, {args.rate}"] for name in ("fsdp", "hsdp"))
    margin = cu.measure.ratios(fsdp, hsdp).as_dict("measured")
    margin["model"] = by["fsdp"]["model_step_ms"] / by["hsdp"]["model_step_ms"]
    margin["of_model"] = margin["measured"] / margin["model"]
    extra = {"hsdp_over_fsdp": margin, "beta_inter_bytes_per_s": beta}
    extra["beta_unlimited_bytes_per_s"] = beta_fast
    extra["ranking"] = {
        "measured": sorted(by, key=lambda k: by[k]["step_ms"]),
        "model": sorted(by, key=lambda k: by[k]["model_step_ms"]),
        "model_link_only": sorted(by, key=lambda k: by[k]["model_link_ms"]),
    }
    return rows, extra


def report(rows: list[dict], extra: dict) -> None:
    for r in rows:
        sent = "/".join(f"{b / 1e3:,.0f}" for b in r["sent_per_step"])
        print(
            f"{r['layout']:>9} at {r['rate']}: step {r['step_ms']:.0f} ms "
            f"({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}), unlimited "
            f"{r['unlimited_step_ms']:.0f}; model {r['model_step_ms']:.0f} ms (gap "
            f"{r['of_model'] - 1:+.0%}); link sent {sent} kB/step, model {r['model_bytes'] / 1e3:,.0f}"
        )
    m = extra["hsdp_over_fsdp"]
    print(
        f"fsdp / hsdp step: {m['measured']:.2f} ({m['measured_min']:.2f}-{m['measured_max']:.2f}),"
        f" model {m['model']:.2f}: {m['of_model'] - 1:+.0%} of the model's margin"
    )
    for name, order in extra["ranking"].items():
        print(f"ranking, {name}: " + " < ".join(order))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit", help="the slow link (tc's units)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="steps of each timed run")
    p.add_argument("--batch-size", type=int, default=64, help="global")
    p.add_argument("--quick", action="store_true", help="2 repeats of 12 steps: a short check")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 2, 12
    check_link(p, args, SHORT_STEPS)
    start = time.perf_counter()
    with cu.measure.Watch() as watch:
        measured, reason = on_cluster(NAME, partial(measure, args))
    if reason is not None:
        skip("placement", reason, args.repeats, watch)
        return
    rows, extra = measured
    report(rows, extra)
    print(watch.note())
    extra |= {"nodes": NODES, "per_node": PER_NODE, "steps": args.steps, "quick": args.quick}
    extra |= {"batch_size": args.batch_size, "rate": args.rate}
    extra["duration_s"] = time.perf_counter() - start
    print(f"wrote {save('placement', rows, args.repeats, watch, extra)}")


if __name__ == "__main__":
    main()
