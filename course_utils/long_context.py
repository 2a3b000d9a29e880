"""Measuring context parallelism and mixtures of experts (lesson 10): the probes and sweeps the
lesson runs but does not teach, so that the notebook keeps the techniques in view. (Expert
parallelism is measured in the lesson itself: an experiments module imports one room.)

- attention over a long sequence (:data:`METHODS`) on the ranks of a launch: peak bytes per rank
  (:func:`attention_memory`, :func:`memory_sweep`), timed steps (:func:`timed_attention`, in
  turns by :func:`attention_sweep`), the bytes sent by the formulas (:func:`sent_per_rank`);
- the ring as a timeline: a traced step (:func:`ring_trace`), its spans (:func:`ring_spans`) and
  the share of each transfer hidden behind arithmetic (:func:`transfers`);
- a mixture of experts: the balancing loss and capacity swept (:func:`moe_run`,
  :func:`moe_sweep`, :func:`moe_points`); an all-to-all is priced with lesson 04's alpha and
  beta by ``collectives.all_to_all_cost``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm.auto import tqdm

from course_utils import data, launch, loop, measure, models, moe, profiling
from course_utils.context_parallel import ring, split, ulysses

SHAPE = dict(batch=4, heads=4, head_dim=16)  # the attention the probes run: B, heads, head dim
TRANSFER_ALONE = "ring: transfer alone"  # the trace's label of a bare K/V transfer
STEP = "ring: step"  # the trace's label of one forward and backward


def whole_attention(q, k, v, positions=None, group=None, causal=True) -> torch.Tensor:
    """Attention with its (B, heads, T, T) scores whole, the textbook way; the ring's signature."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, heads, T, T)
    if causal:
        seen = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~seen, float("-inf"))
    return scores.softmax(dim=-1) @ v


METHODS = {
    "whole": whole_attention,
    "ring": ring.ring_attention,
    "ulysses": ulysses.ulysses_attention,
}
COUNTERS = {"ring": ring.COMM, "ulysses": ulysses.COMM}


def _rank() -> tuple[int, int]:
    """(rank, ranks) of the launch, or (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_inputs(seq_len: int, layout="zigzag", seed=0, batch=4, heads=4, head_dim=16) -> tuple:
    """This rank's q, k, v (requiring gradients), the cotangent of its output, each (B, heads,
    T/cp, head_dim), and its positions: its share of one sequence drawn from ``seed``."""
    rank, cp = _rank()
    held = split.positions(seq_len, cp, rank, layout)
    g = torch.Generator().manual_seed(seed)
    whole = [torch.randn(batch, heads, seq_len, head_dim, generator=g) for _ in range(4)]
    q, k, v = (x[:, :, held].clone().requires_grad_() for x in whole[:3])
    return q, k, v, whole[3][:, :, held].clone(), held


def attention_step(method: str, q, k, v, grad, held, causal: bool = True) -> torch.Tensor:
    """One forward and backward of this rank's share: its output (detached)."""
    group = dist.group.WORLD if dist.is_initialized() else None
    out = METHODS[method](q, k, v, held, group, causal=causal)
    out.backward(grad)
    return out.detach()


def attention_memory(method: str, seq_len: int, fused: bool = True, **shape) -> int:
    """In a worker (or one process for "whole"): the peak bytes this rank allocates during one
    forward and backward (zigzag split), above what it held before (its inputs), from the
    allocator's records in a ``torch.profiler`` trace. ``fused``: the ring's blocks through
    PyTorch's flash kernel, or written out, each block's scores whole (``ring.FUSED``)."""
    rank, _ = _rank()
    inputs = local_inputs(seq_len, **(SHAPE | shape))
    was, ring.FUSED = ring.FUSED, fused
    try:
        with tempfile.TemporaryDirectory() as folder:
            with profiling.Recorder(folder, rank, num_steps=1, active=1) as recorder:
                attention_step(method, *inputs)
                recorder.step()
            found = profiling.memory_by_phase(profiling.events(recorder.path))
    finally:
        ring.FUSED = was
    return found["peak"] - found["start"]


MEMORY_SERIES = {  # name: (method, ranks, fused)
    "scores whole, 1 process": ("whole", 1, False),
    "ring written out, cp 1": ("ring", 1, False),
    "ring written out, cp 2": ("ring", 2, False),
    "ring flash kernel, cp 1": ("ring", 1, True),
    "ring flash kernel, cp 2": ("ring", 2, True),
}


def memory_sweep(lengths: Sequence[int], progress: str | None = None) -> dict[str, list[int]]:
    """:func:`attention_memory` of every :data:`MEMORY_SERIES` at every sequence length: the
    peak bytes of its fullest rank, one list per series."""
    runs = [(name, seq_len) for name in MEMORY_SERIES for seq_len in lengths]
    found: dict[str, list[int]] = {name: [] for name in MEMORY_SERIES}
    for name, seq_len in tqdm(runs, desc=progress, leave=False, disable=progress is None):
        method, ranks, fused = MEMORY_SERIES[name]
        args = (attention_memory, ranks, method, seq_len, fused)
        found[name].append(max(launch.run(*args, threads=1, device="cpu")))
    return found


def timed_attention(
    method: str, seq_len: int, steps: int, layout: str = "zigzag", causal: bool = True, **shape
) -> list[dict]:
    """In a worker: one untimed warm-up, then ``steps`` forwards and backwards of this rank's
    share; per step ``step_s``, ``compute_s`` (the ring's blocks; 0 for the others), ``comm_s``
    (the ring's waits, Ulysses's all-to-alls) and the bytes this rank ``sent``."""
    inputs = local_inputs(seq_len, layout, **(SHAPE | shape))
    counter = COUNTERS.get(method, {"bytes": 0, "seconds": 0.0})
    record = []
    for step in range(steps + 1):
        ring.LOG.clear()
        before = dict(counter)
        start = time.perf_counter()
        attention_step(method, *inputs, causal=causal)
        step_s = time.perf_counter() - start
        blocks = sum(s.stop - s.start for s in ring.LOG if s.kind == "block")
        if step:  # the first step warms up (allocations, gloo's buffers): not kept
            comm_s, sent = (counter[key] - before[key] for key in ("seconds", "bytes"))
            record.append({"step_s": step_s, "compute_s": blocks, "comm_s": comm_s, "sent": sent})
    return record


def attention_sweep(
    settings: dict, steps: int, repeats: int, progress: str | None = None, launcher=launch.run
) -> tuple[dict, dict]:
    """Every setting, ``name: (method, nproc, seq_len, layout)``, launched ``repeats`` times in
    turns, 1 thread per worker, pinned: ``step_times[name]``, a Spread of each launch's median
    step (seconds, the slowest rank's), and ``records[name]``, each launch's per-rank records."""
    records: dict[str, list] = {name: [] for name in settings}

    def measure_one(name: str) -> float:
        method, nproc, seq_len, layout = settings[name]
        ranks = launcher(
            timed_attention, nproc, method, seq_len, steps, layout,
            threads=1, device="cpu", pin=True,
        )  # fmt: skip
        records[name].append(ranks)
        return max(statistics.median(s["step_s"] for s in record) for record in ranks)

    measures = {name: (lambda name=name: measure_one(name)) for name in settings}
    return measure.interleaved(measures, repeats, progress=progress), records


def sent_per_rank(method: str, batch, seq_len, dim, cp, itemsize=4, backward=False) -> float:
    """Bytes one rank sends in one attention's forward (``backward``: and its backward), by the
    formulas. The ring, forward: the K and V of every other rank, ``(cp - 1) 2 B (T/cp) dim``;
    backward, the K and V again and the dK/dV accumulators over ``cp`` hops (the last one home):
    ``(3 cp - 2) 2 B (T/cp) dim`` in all. Ulysses: q, k, v and the output each keeping 1/cp at
    home, ``4 (cp - 1)/cp B (T/cp) dim``, and as much again backward."""
    block = batch * seq_len / cp * dim * itemsize  # one (B, T/cp, dim) activation
    if method == "ring":
        return (3 * cp - 2 if backward and cp > 1 else cp - 1) * 2 * block
    if method == "ulysses":
        return (2 if backward else 1) * 4 * (cp - 1) / cp * block
    raise ValueError(f"method must be ring or ulysses, got {method!r}")


def ring_trace(seq_len: int, folder: str, layout="zigzag", steps=3, alone=5, **shape) -> str:
    """In a worker: a warm-up step, then ``steps`` ring-attention forwards and backwards
    profiled (each a :data:`STEP` span), then ``alone`` bare transfers of the same K/V message to
    the next rank (:data:`TRANSFER_ALONE`, each after a barrier); this rank's trace file."""
    rank, cp = _rank()
    inputs = local_inputs(seq_len, layout, **(SHAPE | shape))
    attention_step("ring", *inputs)
    message = torch.stack([inputs[1], inputs[2]]).detach()  # (2, B, heads, T/cp, d): K and V
    arrived = torch.empty_like(message)
    with profiling.Recorder(folder, rank, num_steps=1, active=1, memory=False) as recorder:
        for _ in range(steps):
            with record_function(STEP):
                attention_step("ring", *inputs)
        for _ in range(alone):
            dist.barrier()
            with record_function(TRANSFER_ALONE):
                sent = dist.isend(message, dst=(rank + 1) % cp)
                dist.irecv(arrived, src=(rank - 1) % cp).wait()
                sent.wait()
        recorder.step()
    return str(recorder.path)


def ring_spans(events: Sequence[dict]) -> list[dict]:
    """The ring's spans in a trace, in time order: ``kind`` ("post", "block", "wait", "alone"
    or "step"), ``phase`` ("forward", "backward", or the kind), ``start`` and ``stop`` (ms, the
    trace's clock: the ranks of one machine share it)."""
    kinds = {label: kind for kind, label in ring.SPANS.items()} | {STEP: "step"}
    spans = []
    for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]):
        name, phase = e["name"], "forward"
        if name.endswith(" (backward)"):
            name, phase = name.removesuffix(" (backward)"), "backward"
        kind = "alone" if name == TRANSFER_ALONE else kinds.get(name)
        if kind:
            phase = phase if kind in ("post", "block", "wait") else kind
            spans.append({"phase": phase, "kind": kind, "start": e["ts"] / 1e3})
            spans[-1]["stop"] = (e["ts"] + e.get("dur", 0)) / 1e3
    return spans


def transfers(spans: Sequence[dict], alone_ms: float) -> list[dict]:
    """Each transfer of one rank's spans (:func:`ring_spans`): posted at a "post", completed by
    the next "wait" (first posted, first waited for: the ring's order), its ``step`` and the
    arithmetic between them. ``hidden``: the share of a transfer of ``alone_ms`` (the same
    message alone) that did not show as waiting, ``1 - min(wait, alone) / alone``; 0 when no
    block ran between post and wait (``behind`` False: the last hop home)."""
    found, open_posts = [], []
    steps = [s for s in spans if s["kind"] == "step"]
    for span in spans:
        if span["kind"] == "post":
            open_posts.append(span)
        elif span["kind"] == "wait" and open_posts:
            post, wait = open_posts.pop(0), span["stop"] - span["start"]
            blocks = [
                s for s in spans
                if s["kind"] == "block" and post["stop"] <= s["start"] and s["stop"] <= span["start"]
            ]  # fmt: skip
            hidden = 1 - min(wait, alone_ms) / alone_ms if blocks and alone_ms > 0 else 0.0
            step = sum(s["start"] <= span["start"] for s in steps) - 1
            blocks_ms = sum(s["stop"] - s["start"] for s in blocks)
            found.append({"phase": span["phase"], "step": step, "wait_ms": wait})
            found[-1] |= {"blocks_ms": blocks_ms, "behind": bool(blocks), "hidden": hidden}
    return found


def moe_run(
    aux_weight: float, capacity_factor: float, steps: int, seed: int = 0, batch_size: int = 64,
    lr: float = 2e-3, **sizes,
) -> dict:  # fmt: skip
    """Train the course's mixture of experts (:class:`course_utils.moe.MoETransformer`, AdamW)
    with this balancing-loss weight and capacity factor: per step the router's ``imbalance``
    (the busiest expert's choices over the mean, averaged over the layers; 1.0 is even) and the
    ``dropped`` share of the choices; the last batch's ``routed`` and ``kept`` per layer and
    expert and its ``capacity``; and the ``accuracy`` on the test split."""
    torch.manual_seed(seed)
    model = moe.MoETransformer(**sizes, capacity_factor=capacity_factor, aux_weight=aux_weight)
    optimizer = models.make_optimizer(model, lr, "adamw")
    X, y = data.mnist("train")
    found = {"aux_weight": aux_weight, "capacity_factor": capacity_factor, "seed": seed}
    found |= {"imbalance": [], "dropped": []}

    def on_step(step: int, history: loop.History) -> None:
        routed = torch.stack([layer.stats["routed"] for layer in moe.moe_layers(model)]).float()
        dropped = sum(layer.stats["dropped"] for layer in moe.moe_layers(model))
        found["imbalance"].append((routed.max(1).values / routed.mean(1)).mean().item())
        found["dropped"].append(dropped / routed.sum().item())

    batches = data.batches(X, y, batch_size, steps, seed=seed)
    loop.fit(model, optimizer, batches, steps, progress=False, on_step=on_step)
    layers = moe.moe_layers(model)
    found["routed"] = [layer.stats["routed"].tolist() for layer in layers]
    found["kept"] = [layer.stats["kept"].tolist() for layer in layers]
    found["capacity"] = layers[0].stats["capacity"]
    found["accuracy"] = loop.evaluate(model, *data.mnist("test"))
    return found


def _moe_pair(settings: Sequence[tuple], steps: int, sizes: dict) -> dict:
    """In a worker: this rank's setting of the pair (aux weight, capacity factor, seed)."""
    aux_weight, capacity_factor, seed = settings[dist.get_rank()]
    return moe_run(aux_weight, capacity_factor, steps, seed, **sizes)


def moe_sweep(
    aux_weights: Sequence[float], capacity_factors: Sequence[float], steps: int,
    seeds: Sequence[int] = (0,), progress: str | None = None, launcher=launch.run, **sizes,
) -> list[dict]:  # fmt: skip
    """:func:`moe_run` for every (aux weight, capacity factor, seed), two at a time on two
    workers of one thread each (no worker waits for the other: nothing is timed); the runs in
    that order."""
    settings = [(a, c, s) for a in aux_weights for c in capacity_factors for s in seeds]
    runs = []
    pairs = [settings[i : i + 2] for i in range(0, len(settings), 2)]
    for pair in tqdm(pairs, desc=progress, leave=False, disable=progress is None):
        runs += launcher(_moe_pair, len(pair), pair, steps, sizes, threads=1, device="cpu")
    return runs


def moe_points(runs: Sequence[dict], last: float = 0.25) -> list[dict]:
    """Per (aux weight, capacity factor) of :func:`moe_sweep`'s runs, Spreads over the seeds of
    the ``imbalance`` and ``dropped`` share (each run's mean over its ``last`` share of steps)
    and of the ``accuracy``: the points of :func:`course_utils.plots.moe_sweep`."""
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault((run["aux_weight"], run["capacity_factor"]), []).append(run)
    points = []
    for (aux_weight, capacity_factor), mine in groups.items():
        tail = max(1, int(len(mine[0]["imbalance"]) * last))
        point = {"aux_weight": aux_weight, "capacity_factor": capacity_factor}
        for key in ("imbalance", "dropped"):
            point[key] = measure.spread(statistics.mean(r[key][-tail:]) for r in mine)
        points.append(point | {"accuracy": measure.spread(r["accuracy"] for r in mine)})
    return points
