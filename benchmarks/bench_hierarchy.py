"""Hierarchical all-reduce against flat across the cluster's slow link, and both against the
two-link model (``course_utils.topology``, issue 27).

    python benchmarks/bench_hierarchy.py [--per-node 2] [--rate 100mbit] [--repeats 5]
        [--sizes 65536 262144 1048576 4194304 16777216] [--quick]

It needs root (network namespaces); without, it says why in one line and measures nothing. It
makes one cluster, ``hierbench`` (2 nodes, the link at ``--rate``; an earlier run's leftover of
that name is removed first, and it goes down in ``finally``, SIGTERM included), and starts
torchrun on each node (``--nproc-per-node``: ``--per-node`` workers, static rendezvous on node 0),
running this file's :func:`worker`, which in order:

1. **fits both links** (``topology.time_links``, ``fit_two_links``): 2-rank all-reduces between
   two ranks of node 0 (intra) and between rank 0 and node 1's first rank (inter), one pair at
   a time, at each size;
2. **times the all-reduces** (``topology.timed``, the methods alternating in every repeat, each
   repeat the slowest rank's time, medians): gloo's ``dist.all_reduce`` and lesson 04's ring by
   hand (flat), the hierarchical one, and the mesh's (DDP on a (dp, tp) mesh with tp inside the
   node: 1/per_node of the tensor all-reduced across the nodes);
3. **counts the bytes on the link** (``cluster.link_bytes`` on each node, read by its first
   worker) for one all-reduce of the largest size by each method.

Beside each: the model's prediction with the fitted links, the gap (measured / model - 1), and at
every size the ratio flat / hierarchical per repeat against the model's and against the most it
can be (``TwoLinks.ratio_bound``: 1.5 for 2 x 2, 1.75 for 2 x 4). The link is rate-limited so
that the largest size is bound by the link: 100 Mbit/s for 2 x 2; 20 Mbit/s for more workers per
node, whose intra-node phases cost more of the 2 cores (the 8 workers of 2 x 4 share them). The
machine is shared with other programs, so timings are noisy (read the min-max). The run's time
limits grow with the seconds its bytes take on the link. Writes benchmarks/results/hierarchy.json
for 2 x 2 (which bench_placement reads) and ``hierarchy_<per-node>.json`` for any other layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _results import save, skip

import course_utils as cu
from course_utils import cluster, topology
from course_utils.cluster import torchrun

ROOT = Path(__file__).resolve().parent.parent
NAME = "hierbench"
SIZES = [2**16, 2**18, 2**20, 2**22, 2**24]  # 64 KiB .. 16 MiB
QUICK_SIZES = [2**18, 2**24]
FLAT = ("gloo", "ring")  # the two flat all-reduces, each against the hierarchical one
# each timed call and the TwoLinks method that models it ("inside": the hierarchical's intra-node
# phases alone, the cross-node all-reduce left out: where its time goes beside the mesh's)
METHOD = {"gloo": "flat", "ring": "flat", "hierarchical": "hierarchical", "mesh": "mesh"}
METHOD |= {"inside": "inside"}
# the link's default rate: slow enough that the largest size is bound by the link, where the
# intra-node phases cost CPU (4 workers per node and more on 2 cores: a few hundred ms at 16 MiB)
RATE = "100mbit"  # 2 x 2
SLOW_RATE = "20mbit"  # any other per_node: the hierarchical's 16 MiB take 7 s on the link
RUN_TIMEOUT_S = 540  # start-up and arithmetic; the link's own seconds come on top (link_seconds)
GROUP_TIMEOUT_S = 120  # a collective's wait; the slowest all-reduce's seconds come on top


def result_name(per_node: int) -> str:
    """Where a run on 2 nodes of ``per_node`` writes: ``hierarchy`` for 2 x 2 (the issue's
    layout, which bench_placement reads), ``hierarchy_<per_node>`` for any other."""
    return "hierarchy" if per_node == 2 else f"hierarchy_{per_node}"


def link_seconds(sizes: list[int], repeats: int, per_node: int, rate: str) -> float:
    """Seconds the link alone keeps a run busy at ``rate``: each repeat, the warm-up and the count
    of gloo's and the ring's all-reduces (flat), the hierarchical's and the mesh's, and the fit's
    2-rank all-reduce across the link (the whole tensor each way), at every size."""
    flat, hierarchical = (
        float(topology.TwoLinks.link_bytes(m, sum(sizes), 2, per_node))
        for m in topology.METHODS[:2]
    )
    total = (repeats + 2) * (2 * flat + 2 * hierarchical) + (repeats + 1) * sum(sizes)
    return total / cluster.rate_bytes(rate)


def calls(groups: topology.NodeGroups) -> dict:
    """``topology.all_reduces`` and "inside": the hierarchical one with a cross-node group of
    this rank alone (every rank makes every such group), which sums over the node only."""
    alone = [dist.new_group([rank]) for rank in range(dist.get_world_size())]
    inside = dataclasses.replace(groups, inter=alone[dist.get_rank()])
    hierarchical = topology.hierarchical_all_reduce
    return topology.all_reduces(groups) | {"inside": lambda t: hierarchical(t, inside)}


def counted(groups: topology.NodeGroups, ops: dict, made: cluster.Cluster, nbytes: int) -> dict:
    """Bytes each node's link sent and received during one call of each of ``ops`` on
    ``nbytes``, read by the node's first rank (every rank gets them)."""
    node, local_rank = divmod(dist.get_rank(), groups.per_node)
    found = torch.zeros(len(ops), groups.nodes, 2, dtype=torch.float64)
    tensor = torch.zeros(nbytes // 4)
    for i, call in enumerate(ops.values()):
        dist.barrier()
        before = cluster.link_bytes(made, node) if local_rank == 0 else None
        dist.barrier()
        call(tensor)
        dist.barrier()
        if local_rank == 0:
            after = cluster.link_bytes(made, node)
            found[i, node] = torch.tensor([after[k] - before[k] for k in ("sent", "received")])
    dist.all_reduce(found)
    return {name: found[i].tolist() for i, name in enumerate(ops)}


def worker(spec: str) -> None:
    """On every rank, under torchrun: fit, time, count (the module docstring); rank 0 writes."""
    sizes, repeats, per_node, made, out = json.loads(spec)
    made = cluster.Cluster(*made)
    torch.set_num_threads(1)
    slowest = link_seconds([max(sizes)], 0, per_node, made.rate)  # more than any one wait
    with cu.launch.process_group("cpu", GROUP_TIMEOUT_S + slowest) as me:
        groups = topology.node_groups(per_node)
        links = topology.time_links(sizes, per_node, repeats)
        ops = calls(groups)
        rows = topology.timed(ops, sizes, repeats)
        link = counted(groups, ops, made, max(sizes))
        if me.is_main:
            Path(out).write_text(json.dumps({"links": links, "rows": rows, "link_bytes": link}))


def launch(made: cluster.Cluster, args, folder: Path) -> dict:
    """torchrun on each node running :func:`worker`; what rank 0 wrote (``torchrun.results``:
    raises with the nodes' logs when one fails or the run outlasts the link's seconds)."""
    out = folder / "measured.json"
    spec = json.dumps(
        [args.sizes, args.repeats, args.per_node, list(vars(made).values()), str(out)]
    )
    job = torchrun.Job(made)
    for node in range(made.nodes):
        argv = [str(torchrun.TORCHRUN), "--nnodes", str(made.nodes)]
        argv += ["--nproc-per-node", str(args.per_node), "--node-rank", str(node)]
        argv += ["--master-addr", made.address(0), "--master-port", str(torchrun.PORT)]
        argv += ["--max-restarts", "0", __file__, "--worker", spec]
        job.logs[node] = folder / f"node{node}.log"
        with open(job.logs[node], "wb") as sink:
            job.agents[node] = cluster.spawn(
                made, node, argv, cwd=ROOT, env=torchrun.environment(), stdout=sink,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
    allowed = RUN_TIMEOUT_S + 2 * link_seconds(args.sizes, args.repeats, args.per_node, args.rate)
    return torchrun.results(job, allowed, out)


def analyse(measured: dict, nodes: int, per_node: int) -> tuple[list[dict], dict]:
    """Rows with the model beside each measurement; the fit, the ratios and the link's bytes."""
    fit = topology.fit_two_links(measured["links"])
    rows = []
    for row in measured["rows"]:
        model = float(getattr(fit, METHOD[row["op"]])(row["bytes"], nodes, per_node))
        spread = cu.measure.spread(row["samples"])
        of_model = cu.measure.spread(s / model for s in row["samples"])
        rows.append(
            {"op": row["op"], "method": METHOD[row["op"]], "bytes": row["bytes"]}
            | spread.as_dict("seconds") | {"samples": row["samples"], "model_seconds": model}
            | of_model.as_dict("of_model")
        )  # fmt: skip
    by = {(r["op"], r["bytes"]): r for r in rows}
    ratios = []
    for nbytes in sorted({r["bytes"] for r in rows}):
        hier = cu.measure.spread(by["hierarchical", nbytes]["samples"])
        model = float(fit.flat(nbytes, nodes, per_node) / fit.hierarchical(nbytes, nodes, per_node))
        entry = {"bytes": nbytes, "model": model}
        for op in FLAT:
            paired = cu.measure.ratios(cu.measure.spread(by[op, nbytes]["samples"]), hier)
            entry |= paired.as_dict(op) | {f"{op}_of_model": paired.median / model}
        ratios.append(entry)
    largest = max(r["bytes"] for r in rows)
    link = {}
    for op, counts in measured["link_bytes"].items():
        link[op] = {"sent": [s for s, _ in counts], "received": [r for _, r in counts]}
        method = METHOD[op]
        model = (
            0.0 if method == "inside" else float(fit.link_bytes(method, largest, nodes, per_node))
        )
        link[op]["model"] = model
    fitted = {
        name: {"alpha_s": ab.alpha_s, "beta_bytes_per_s": ab.beta_bytes_per_s}
        for name, ab in (("intra", fit.intra), ("inter", fit.inter))
    }
    extra = {"fit": fitted, "fit_rows": measured["links"], "ratios": ratios, "link_bytes": link}
    extra |= {"ratio_bound": topology.TwoLinks.ratio_bound(nodes, per_node)}
    return rows, extra


def report(rows: list[dict], extra: dict, rate: str) -> None:
    """The results, a line each."""
    fit = extra["fit"]
    print(
        f"fitted at {rate} ({cluster.rate_bytes(rate) / 1e6:.1f} MB/s): "
        + "; ".join(
            f"{k} alpha {v['alpha_s'] * 1e6:.0f} us, beta {v['beta_bytes_per_s'] / 1e6:.1f} MB/s"
            for k, v in fit.items()
        )
    )
    for r in rows:
        print(
            f"{r['op']:>12} {r['bytes'] / 2**20:7.3f} MiB: {r['seconds'] * 1e3:8.1f} ms "
            f"({r['seconds_min'] * 1e3:.1f}-{r['seconds_max'] * 1e3:.1f}); model "
            f"{r['model_seconds'] * 1e3:8.1f} ms, gap {r['of_model'] - 1:+.0%}"
        )
    for e in extra["ratios"]:
        print(
            f"{e['bytes'] / 2**20:7.3f} MiB: flat / hierarchical "
            + ", ".join(
                f"{op} {e[op]:.2f} ({e[op + '_min']:.2f}-{e[op + '_max']:.2f})" for op in FLAT
            )
            + f"; model {e['model']:.2f}, bound {extra['ratio_bound']:.2f}"
        )
    at = {r["op"]: r for r in rows if r["bytes"] == max(r["bytes"] for r in rows)}
    took = {
        op: f"{at[op]['seconds'] * 1e3:.0f} ms (model {at[op]['model_seconds'] * 1e3:.0f})"
        for op in ("inside", "mesh")
    }
    rest = at["hierarchical"]["seconds"] - at["inside"]["seconds"] - at["mesh"]["seconds"]
    print(
        f"{at['mesh']['bytes'] / 2**20:7.3f} MiB, the hierarchical's time: inside the node "
        f"{took['inside']}, across (the mesh's all-reduce) {took['mesh']}, the rest "
        f"{rest * 1e3:+.0f} ms"
    )
    for op, c in extra["link_bytes"].items():
        sent = "/".join(f"{s / 1e6:.2f}" for s in c["sent"])
        print(f"{op:>12}: node links sent {sent} MB, model {c['model'] / 1e6:.2f} MB of payload")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rate", help=f"the link's rate, tc's units (default {RATE} for 2 workers per node, "
        f"else {SLOW_RATE})"
    )  # fmt: skip
    p.add_argument("--per-node", type=int, default=2, help="workers per node (2 nodes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="bytes")
    p.add_argument("--quick", action="store_true", help="2 repeats, 256 KiB and 16 MiB")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # under torchrun: worker's spec
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.quick:
        args.repeats, args.sizes = 2, QUICK_SIZES
    args.rate = args.rate or (RATE if args.per_node == 2 else SLOW_RATE)
    if args.per_node < 2 or len(args.sizes) < 2:
        p.error("the fit needs 2 workers per node and at least 2 sizes")
    try:
        cluster.rate_bytes(args.rate)
    except ValueError as err:
        p.error(str(err))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally takes it down
    start, reason = time.perf_counter(), cluster.unavailable()
    with cu.measure.Watch() as watch, tempfile.TemporaryDirectory() as folder:
        if reason is None:
            try:
                cluster.down(NAME)  # an earlier run's leftover (this benchmark's only)
                made = cluster.up(cluster.Cluster(NAME, 2, args.rate))
                measured = launch(made, args, Path(folder))
            except cluster.ClusterError as err:  # the cluster can't be made here
                reason = str(err)
            finally:
                cluster.down(NAME)
    if reason is not None:
        skip(result_name(args.per_node), reason, args.repeats, watch)
        return
    rows, extra = analyse(measured, 2, args.per_node)
    report(rows, extra, args.rate)
    print(watch.note())
    extra |= {"rate": args.rate, "nodes": 2, "per_node": args.per_node, "quick": args.quick}
    extra["duration_s"] = time.perf_counter() - start
    print(f"wrote {save(result_name(args.per_node), rows, args.repeats, watch, extra)}")


if __name__ == "__main__":
    main()
