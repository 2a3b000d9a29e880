"""Across a slow link (lesson 15): the probes that lesson runs on the one-machine cluster, and the
arithmetic it predicts them with.

- **The links and the all-reduces** (:func:`link_probe`): 2 nodes x 2 workers under torchrun,
  each rank running this module (``python -m course_utils.slow_link --worker SPEC``): both
  links' timings for :func:`course_utils.topology.fit_two_links`, the hierarchical all-reduce
  against ``dist.all_reduce`` (:func:`hierarchical_check`), every all-reduce of
  :func:`course_utils.topology.all_reduces` timed over sizes, and the bytes each put on the links
  (:func:`link_sent`).
- **A decision guide** (:func:`layouts`): the communication one training step needs under each
  placement of tensor parallel, FSDP, HSDP and DDP on ``nodes`` x ``per_node`` ranks, priced by a
  fitted :class:`~course_utils.topology.TwoLinks`: predictions, compute and overlap left out.
- **Placement, measured** (:func:`placement_sweep`): the transformer under the entry point with
  each layout's flags on 2 nodes x 2 workers: the bytes on each node's link and the step, against
  each layout's collectives (:func:`placement_bytes`).
- **Compression across the link** (:func:`compress_sweep`): DDP with each ``--compress`` hook
  (:mod:`course_utils.compression`) at each link rate, 1 worker per node: the bytes each node
  sent, the step, the losses; and the rate below which a hook pays (:func:`break_even_rate`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from course_utils import cluster, collectives, compression, launch, many_machines, models, topology
from course_utils.cluster import Cluster, torchrun
from course_utils.collectives import AlphaBeta
from course_utils.topology import TwoLinks

NAME = (
    "lesson15"  # the lesson's cluster: namespaces lesson15-node0, lesson15-node1, lesson15-switch
)
PER_NODE = 2  # workers on each node in the link probe
EQUAL_NUMEL = 2**18 + 3  # the equality check's tensor: 1 MB of float32, not a multiple of PER_NODE
# Links to predict with where no cluster can be made: the node's inside as a 2-rank all-reduce on
# loopback of a small machine, the link between nodes a 1 Gbit/s wire with 50 us a message.
ASSUMED = TwoLinks(intra=AlphaBeta(20e-6, 2e9, 2), inter=AlphaBeta(50e-6, 1.25e8, 2))


# --- the decision guide ---------------------------------------------------------------------


def tp_bytes(layers: int, tokens: int, hidden: int, bytes_per_value: int = 4) -> float:
    """Bytes Megatron's tensor parallel all-reduces per step on each rank: two all-reduces of the
    activations (tokens x hidden) per layer forward (after attention, after the MLP), two backward
    (lesson 09)."""
    return 4.0 * layers * tokens * hidden * bytes_per_value


def _gather_time(link: AlphaBeta, nbytes: float, ranks: int, sharing: int = 1) -> float:
    """An all-gather (or a reduce-scatter) of ``nbytes`` over a ring of ``ranks`` on ``link``:
    ``ranks - 1`` steps of a chunk ``nbytes / ranks``, ``sharing`` such rings on the same link."""
    if ranks < 2:
        return 0.0
    return (ranks - 1) * float(link.alpha_s + sharing * nbytes / ranks / link.beta_bytes_per_s)


def layouts(links: TwoLinks, grad_bytes: float, tp: float, nodes: int, per_node: int) -> list[dict]:
    """Each placement's communication per training step, predicted: ``layout``, the ``seconds``
    (``inside`` and ``across`` the nodes), the bytes each node's link carries each way
    (``link_bytes``) and the weights each rank holds (``held``, bytes); sorted fastest first.
    ``grad_bytes``: the model's float32 gradient; ``tp``: what tensor parallel all-reduces per
    step for the whole global batch (:func:`tp_bytes`; each replica's share of it: its tokens).
    Each kind of message is priced as one large collective (its latency counted once)."""
    n, flat = nodes * per_node, links.flat(grad_bytes, nodes, per_node)
    inside, mesh = (
        links.inside(grad_bytes, nodes, per_node),
        links.mesh(grad_bytes, nodes, per_node),
    )
    rows = [  # (layout, seconds inside, seconds across, link bytes, held)
        ("DDP, flat ring over all ranks", 0.0, float(flat), 2 * (n - 1) / n * grad_bytes, 1.0),
        ("DDP, hierarchical all-reduce", float(inside), float(mesh),
         2 * (nodes - 1) / nodes * grad_bytes, 1.0),
        ("FSDP over all ranks", 0.0, 1.5 * float(flat), 3 * (n - 1) / n * grad_bytes, 1 / n),
        ("HSDP: shard inside, replicate across", 1.5 * float(inside), float(mesh),
         2 * (nodes - 1) / nodes * grad_bytes, 1 / per_node),
        ("TP inside, DDP across", 2 * _gather_time(links.intra, tp / nodes, per_node),
         float(mesh), 2 * (nodes - 1) / nodes * grad_bytes, 1 / per_node),
        ("TP across, DDP inside", float(links.mesh(grad_bytes, nodes, per_node, dp_across=False)),
         2 * _gather_time(links.inter, tp / per_node, nodes, sharing=per_node),
         2 * (nodes - 1) / nodes * tp, 1 / nodes),
    ]  # fmt: skip
    table = [
        {"layout": name, "inside": a, "across": b, "seconds": a + b, "link_bytes": moved,
         "held": share * grad_bytes}
        for name, a, b, moved, share in rows
    ]  # fmt: skip
    return sorted(table, key=lambda row: row["seconds"])


# --- compression, predicted -----------------------------------------------------------------


def payload(compress: str, model: str = "cnn") -> int:
    """Bytes one rank hands to its collectives per compressed step of the course's ``model``."""
    shapes = [p.shape for p in models.build(model).parameters()]
    return compression.payload_bytes(compress, shapes)


def break_even_rate(saved_bytes: float, overhead_s: float) -> float:
    """The link rate (bytes/s) below which a hook pays: where the ``saved_bytes`` per step (on
    the wire, :data:`course_utils.many_machines.WIRE` included) take as long as the hook's own
    work per step (``overhead_s``). Infinite when the hook costs nothing; 0 when it saves nothing."""
    if saved_bytes <= 0:
        return 0.0
    return math.inf if overhead_s <= 0 else many_machines.WIRE * saved_bytes / overhead_s


# --- the link probe (2 nodes x 2 workers) ---------------------------------------------------


def _sent_here() -> int:
    """Bytes this process's network namespace has sent on its link (``/proc/self/net/dev``)."""
    for row in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = row.partition(":")
        if name.strip() == cluster.LINK:
            return int(counters.split()[8])  # 8 received counters, then sent: bytes first
    raise RuntimeError(f"no {cluster.LINK} here: not on a node of the cluster")


def link_sent(call, tensor: torch.Tensor, per_node: int) -> list[float]:
    """Bytes each node's link sent while every rank ran ``call(tensor)`` once (its local rank 0
    reads the node's counters)."""
    node, local_rank = divmod(dist.get_rank(), per_node)
    sent = torch.zeros(dist.get_world_size() // per_node, dtype=torch.float64)
    dist.barrier()
    before = _sent_here() if local_rank == 0 else 0
    dist.barrier()
    call(tensor)
    dist.barrier()
    if local_rank == 0:
        sent[node] = _sent_here() - before
    dist.all_reduce(sent)
    return sent.tolist()


def hierarchical_check(
    groups: topology.NodeGroups, numel: int = EQUAL_NUMEL
) -> tuple[torch.Tensor, float]:
    """On every rank: ``numel`` values drawn from the rank's own seed, summed over all ranks by
    :func:`course_utils.topology.hierarchical_all_reduce` and by ``dist.all_reduce``. Returns
    the values as drawn and the largest difference between the two sums on any rank."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(dist.get_rank()))
    mine, builtin = x.clone(), x.clone()
    topology.hierarchical_all_reduce(mine, groups)
    dist.all_reduce(builtin)
    diff = (mine - builtin).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return x, diff.item()


def _worker(spec: str) -> None:
    """One rank of :func:`link_probe`; rank 0 writes the JSON."""
    sizes, repeats, per_node, out = json.loads(spec)
    with launch.process_group("cpu", 120) as me:
        groups = topology.node_groups(per_node)
        x, diff = hierarchical_check(groups)
        links = topology.time_links(sizes, per_node, repeats)
        calls = topology.all_reduces(groups)
        timings = topology.timed(calls, sizes, repeats)
        sent = {name: link_sent(call, x.clone(), per_node) for name, call in calls.items()}
        if me.is_main:
            result = {"max_diff": diff, "links": links, "timings": timings, "sent": sent}
            Path(out).write_text(json.dumps(result | {"sent_numel": EQUAL_NUMEL}))


def link_probe(
    made: Cluster, folder: str | Path, sizes: Sequence[int], repeats: int = 5,
    per_node: int = PER_NODE, timeout: float = 300.0,
) -> dict:  # fmt: skip
    """Run the probe on every node of ``made``, ``per_node`` ranks each: ``max_diff`` (the
    hierarchical all-reduce against ``dist.all_reduce``), ``links`` (rows to fit), ``timings``
    (every all-reduce at every size), ``sent`` (bytes each node's link sent in each, on
    ``sent_numel`` float32 values) and the fitted ``model`` (a :class:`TwoLinks`)."""
    folder = Path(tempfile.mkdtemp(prefix="links-", dir=folder))
    out = folder / "probe.json"
    spec = json.dumps([list(sizes), repeats, per_node, str(out)])
    job = torchrun.Job(made)
    for node in range(made.nodes):
        argv = torchrun.command(made, node, [], nnodes=str(made.nodes), nproc_per_node=per_node)
        argv[argv.index("-m") + 1 :] = [__name__, "--worker", spec]  # this module, not train
        job.logs[node] = folder / f"node{node}.log"
        with open(job.logs[node], "wb") as log:
            job.agents[node] = cluster.spawn(
                made, node, argv, stdout=log, stderr=subprocess.STDOUT,
                env=torchrun.environment(),
            )  # fmt: skip
    result = torchrun.results(job, timeout, out)
    return result | {"model": fit_links(result["links"])}


def fit_links(rows: Sequence[dict]) -> TwoLinks:
    """:func:`course_utils.topology.fit_two_links`, kept sane on a noisy machine: a fit over few
    sizes can put all of a link's time into alpha (beta, unbounded, at the clamp of
    :func:`~course_utils.collectives.fit_alpha_beta`); that link is then read from its largest
    size alone, as a bandwidth: ``2 alpha + bytes / beta`` with alpha 0."""
    fitted = topology.fit_two_links(rows)

    def sane(op: str, link: AlphaBeta) -> AlphaBeta:
        largest = max((r for r in rows if r["op"] == op), key=lambda r: r["bytes"])
        if link.beta_bytes_per_s <= 100 * largest["bytes"] / largest["seconds"]:
            return link
        return AlphaBeta(0.0, largest["bytes"] / largest["seconds"], 2)

    return TwoLinks(sane("intra", fitted.intra), sane("inter", fitted.inter))


# --- runs of the entry point across the nodes ------------------------------------------------


def measured_run(
    made: Cluster, folder: str | Path, args: Sequence[str], steps: int, batch_size: int = 64,
    timeout: float = 300.0, **options,
) -> dict:  # fmt: skip
    """The entry point under torchrun on every node of ``made`` with ``args`` and ``steps`` of
    ``batch_size`` (``options`` to :func:`course_utils.cluster.torchrun.job`: one worker per
    node by default): the run's JSON (``result``), the bytes each node's link ``sent`` during
    it, start-up included, and the step (``step_s``: ``batch_size / samples_per_s``, after the
    first step)."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    out = folder / "run.json"
    args = [*args, "--steps", str(steps), "--batch-size", str(batch_size), "--json", str(out)]
    before = [cluster.link_bytes(made, n)["sent"] for n in range(made.nodes)]
    result = torchrun.results(torchrun.job(made, args, logs=folder, **options), timeout, out)
    sent = [cluster.link_bytes(made, n)["sent"] - b for n, b in enumerate(before)]
    return {"result": result, "sent": sent, "step_s": batch_size / result["samples_per_s"]}


# --- placement, measured (2 nodes x 2 workers) ----------------------------------------------

TRANSFORMER = ["--model", "transformer", "--optimizer", "adamw", "--lr", "0.001", "--threads", "1"]
GUIDE = {  # the layouts the lesson runs, by their name in the decision guide (layouts)
    "ddp": "DDP, flat ring over all ranks",
    "fsdp": "FSDP over all ranks",
    "hsdp": "HSDP: shard inside, replicate across",
}


def placement_sweep(
    made: Cluster, folder: str | Path, placements: dict[str, Sequence[str]], steps: int,
    batch_size: int = 64, rate: str | None = None, per_node: int = PER_NODE,
    progress: str | None = None,
) -> dict[str, dict]:  # fmt: skip
    """:func:`measured_run` of the transformer (:data:`TRANSFORMER`) with each layout's flags
    (``{layout: flags}``), ``per_node`` workers on each node, one layout after another:
    ``{layout: run}``. ``rate``: the link's rate meanwhile (the cluster's own is put back
    afterwards); None: the cluster's own."""
    runs, bar = {}, tqdm(total=len(placements), desc=progress, disable=progress is None)
    try:
        cluster.set_rate(made, rate or made.rate)
        for layout, flags in placements.items():
            args = [*TRANSFORMER, *flags]
            runs[layout] = measured_run(
                made, folder, args, steps, batch_size, nproc_per_node=per_node
            )
            bar.update()
    finally:
        cluster.set_rate(made, made.rate)
        bar.close()
    return runs


def placement_bytes(
    layout: str, nodes: int = 2, per_node: int = PER_NODE, gloo: bool = True
) -> float:
    """Bytes each node's link carries per step, each way, under ``layout`` (:data:`GUIDE`'s
    keys) of the transformer, by its collectives on its float32 gradient B. A ring over all ranks
    puts ``2(N-1)/N`` of what it all-reduces on the link, half of that for an all-gather or a
    reduce-scatter. ``ddp``: a ring all-reduce of B. ``fsdp``: FSDP2 gathers every block twice
    (forward, and again in backward: it reshards between) and the root (embedding, positions,
    head) once, and reduce-scatters every gradient, all on the ring. ``hsdp``: the gathers and
    reduce-scatters stay inside the node; each rank's shard is all-reduced with its twin on the
    other node, ``2(M-1)/M`` B. ``gloo``: gloo's reduce-scatter is an all-reduce of which each
    rank keeps its chunk (``ProcessGroupGloo``), a ring all-reduce's bytes, twice NCCL's."""
    if layout not in GUIDE:
        raise ValueError(f"unknown layout {layout!r}: choose from {sorted(GUIDE)}")
    model = models.build("transformer")
    whole, blocks = (sum(4 * p.numel() for p in m.parameters()) for m in (model, model.blocks))
    if layout == "hsdp":
        return float(TwoLinks.link_bytes("mesh", whole, nodes, per_node))
    ring = float(TwoLinks.link_bytes("flat", 1.0, nodes, per_node))  # per byte all-reduced
    if layout == "ddp":
        return ring * whole
    scatter = 1.0 if gloo else 0.5  # a reduce-scatter, in ring all-reduces
    return ring * (blocks * (2 * 0.5 + scatter) + (whole - blocks) * (0.5 + scatter))


# --- compression across the link (2 nodes x 1 worker) ---------------------------------------


def compress_run(
    made: Cluster, folder: str | Path, compress: str, steps: int, batch_size: int = 64,
    timeout: float = 300.0,
) -> dict:  # fmt: skip
    """DDP of the CNN across the nodes, one worker each, with ``--compress compress``: what
    :func:`measured_run` returns, and the mean of the last three losses (``loss``)."""
    args = ["--model", "cnn", "--parallel", "ddp", "--compress", compress, "--threads", "1"]
    run = measured_run(made, folder, args, steps, batch_size, timeout)
    return run | {"loss": sum(run["result"]["losses"][-3:]) / 3}


def compress_sweep(
    made: Cluster, folder: str | Path, hooks: Sequence[str], rates: Sequence[str], steps: int,
    batch_size: int = 64, progress: str | None = None,
) -> dict[str, dict[str, dict]]:  # fmt: skip
    """:func:`compress_run` for every hook at every rate (``{rate: {hook: run}}``), the link set
    to each rate in turn and put back to the cluster's own afterwards."""
    runs = {rate: {} for rate in rates}
    bar = tqdm(total=len(hooks) * len(rates), desc=progress, disable=progress is None)
    try:
        for rate in rates:
            cluster.set_rate(made, None if rate == many_machines.UNLIMITED else rate)
            for hook in hooks:
                runs[rate][hook] = compress_run(made, folder, hook, steps, batch_size)
                bar.update()
    finally:
        cluster.set_rate(made, made.rate)
        bar.close()
    return runs


def predicted_sent(compress: str, steps: int, model: str = "cnn", plain: int = 2) -> float:
    """Bytes node 1 sends in a 2-node run of ``steps`` with ``compress``: every step's payload
    (PowerSGD's first ``plain`` steps all-reduce the whole gradient), as TCP puts it on the wire.
    The few small messages besides (the losses' sums, the rendezvous) are left out."""
    full, each = payload("none", model), payload(compress, model)
    first = min(plain, steps) if compress.startswith("powersgd") else 0
    on_link = first * full + (steps - first) * each
    return many_machines.WIRE * collectives.ring_bytes_sent(on_link, 2)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
