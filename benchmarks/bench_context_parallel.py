"""Context parallelism on 2 ranks x 1 thread against one process: throughput, how much of the
ring's K/V transfer hides behind attention, the zigzag split against the contiguous one, and
the attention's peak bytes per rank.

    python benchmarks/bench_context_parallel.py [--repeats 5] [--batch-size 64]
        [--long-batch-size 16] [--steps 11] [--traced-runs 2] [--quick]

The long-sequence model, causal: ``--model pixels`` (196 tokens of 2x2 patches), and in a
harness the same model at patch 1, 784 tokens (:class:`LongPixels`, which the command line has
no name for). Configurations, each in fresh processes, in turns (A B C ... A B C ...):

- ``cp zigzag``: ``--parallel none --nproc 2 --cp 2 --threads 1``, as the command line runs it
  (196 tokens: ``python -m course_utils.train``, ``_command_line``; 784 tokens: the command
  line's worker, ``train_worker``, with the model swapped, through ``cu.launch.run``);
- ``cp contiguous``: the same worker with ``context_parallel.apply(..., layout="contiguous")``
  (the command line always splits zigzag);
- ``one``, ``one x 2 threads``: ``--parallel none`` with 1 and 2 threads.

Ratios are medians of the paired ratios of a round, with min-max. Then, from the traces of
profiled runs (``--profile``; :func:`ring_step`), per rank and step: the ring's arithmetic
(its "ring: block" spans), the time it waited for a transfer ("ring: wait") against the
transfer's span (gloo's send and receive events, from the post to the end of the wait), the
share hidden, the time spent posting, and what the step spent outside the ring; for one
process, the attention's arithmetic (:func:`one_step`). The contiguous split's busy time per
rank is set beside ``split.work``'s count of score pairs. Last, one attention's forward and
backward under the profiler's memory events, at cp = 1 (PyTorch's SDPA, the model's own path)
and cp = 2 (the ring), per rank (:func:`attention_bytes`). Writes
benchmarks/results/context_parallel.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from unittest import mock

import _command_line as command_line
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _results import save
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

import course_utils as cu
from course_utils import context_parallel, models, profiling
from course_utils.config import RunConfig
from course_utils.context_parallel import ring, split

CONFIGS = ("cp zigzag", "cp contiguous", "one", "one x 2 threads")
TRACED_STEPS = 6  # profiling.Recorder records steps 3-5
HEADS, HEAD_DIM = 4, 8  # the pixel model's attention (dim 32, 4 heads)


class LongPixels(models.Transformer):
    """The pixel model at patch 1: 784 tokens, causal (the benchmark's alone)."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, depth: int = 2):
        super().__init__(dim, heads, hidden, depth, patch=1, causal=True)


def harness_worker(cfg: RunConfig, tokens: int, layout: str) -> dict | None:
    """In a worker: the command line's ``train_worker`` on ``cfg``, with the pixel model at
    ``tokens`` tokens and the context-parallel split ``layout``."""
    with ExitStack() as stack:
        if tokens != 196:
            stack.enter_context(mock.patch.dict(models.MODELS, {"pixels": LongPixels}))
        if layout != "zigzag":
            apply = functools.partial(context_parallel.apply, layout=layout)
            stack.enter_context(mock.patch.object(context_parallel, "apply", apply))
        return cu.train.train_worker(cfg)


def config(name: str, batch_size: int, steps: int, profile: str | None = None) -> RunConfig:
    cfg = RunConfig(
        model="pixels", batch_size=batch_size, steps=steps, threads=1, device="cpu", profile=profile
    )
    if name.startswith("cp"):
        return replace(cfg, nproc=2, cp=2)
    return replace(cfg, threads=2) if name == "one x 2 threads" else cfg


def run(name: str, tokens: int, batch_size: int, steps: int, profile: str | None = None) -> float:
    """Samples/s of one run of configuration ``name`` at ``tokens`` tokens, in fresh processes."""
    cfg = config(name, batch_size, steps, profile)
    if tokens == 196 and name != "cp contiguous":  # the command line can say it
        return command_line.run(cfg)[0]["samples_per_s"]
    layout = name.split()[1] if name.startswith("cp") else "zigzag"
    # spawned, as the command line's workers start: fresh interpreters, which import the worker
    # from this file as a module (run as a script, its functions belong to __main__)
    worker = importlib.import_module("bench_context_parallel").harness_worker
    result = cu.launch.run(
        worker,
        cfg.nproc,
        cfg,
        tokens,
        layout,
        threads=cfg.threads,
        device="cpu",
        start_method="spawn",
    )
    return result[0]["samples_per_s"]


def _per_step(events: list[dict]) -> tuple[list[dict], int, float]:
    """The complete events, the number of profiled steps and their mean ms."""
    complete = [e for e in events if e.get("ph") == "X"]
    steps = [e for e in complete if e["name"].startswith("ProfilerStep#")]
    return complete, len(steps), statistics.mean(e["dur"] for e in steps) / 1e3


def _ms(spans, num_steps: int) -> float:
    return sum(b - a for a, b in spans) / 1e3 / num_steps


def ring_step(events: list[dict]) -> dict:
    """One rank's ring, ms per profiled step: ``step``; ``blocks`` (its arithmetic, forward
    and backward); ``posting`` (starting the messages: gloo writes a message on the calling
    thread where the socket takes it); ``transfer`` (the union of gloo's send and receive
    events, each from its post to the end of its wait); ``waited`` (the part of the transfer
    the ring waited in "ring: wait"); ``hidden`` = 1 - waited / transfer; ``outside`` (the
    step less the ring's spans: embedding, projections, MLPs, norms, loss, optimizer,
    gradient all-reduce); ``forward_blocks_in_flight`` and ``forward_blocks_alone``: forward's
    blocks while a K/V transfer was in flight and while none was (at cp 2 zigzag, every rank's
    two blocks of a layer hold the same number of score pairs: their ratio is what the transfer
    costs the arithmetic it hides behind, on cores that also move the bytes)."""
    complete, n, step = _per_step(events)

    def spans(prefix: str):
        return profiling.intervals(complete, lambda e: e["name"].startswith(prefix))

    transfer = profiling.intervals(complete, lambda e: e["name"] in ("gloo:send", "gloo:recv"))
    waits, blocks, posts = spans(ring.SPANS["wait"]), spans(ring.SPANS["block"]), spans("ring: ")
    waited = profiling.common_us(transfer, waits) / 1e3 / n
    in_flight = alone = 0.0  # forward blocks with a transfer in flight, and without one
    for e in complete:
        if e["name"] == ring.SPANS["block"]:
            span = [[e["ts"], e["ts"] + e["dur"]]]
            if profiling.common_us(span, transfer) > e["dur"] / 2:
                in_flight += e["dur"] / 1e3 / n
            else:
                alone += e["dur"] / 1e3 / n
    moved = _ms(transfer, n)
    return {
        "step_ms": step,
        "blocks_ms": _ms(blocks, n),
        "posting_ms": _ms(spans(ring.SPANS["post"]), n),
        "transfer_ms": moved,
        "waited_ms": waited,
        "hidden": 1 - waited / moved if moved else 1.0,
        "outside_ms": step - _ms(posts, n),
        "forward_blocks_in_flight_ms": in_flight,
        "forward_blocks_alone_ms": alone,
    }


def one_step(events: list[dict]) -> dict:
    """One process, ms per profiled step: the step, and its attention's arithmetic (SDPA's
    forward and backward)."""
    complete, n, step = _per_step(events)
    attention = profiling.intervals(
        complete,
        lambda e: (
            "scaled_dot_product" in e["name"].lower()
            or "attentionforcpubackward" in e["name"].lower().replace("_", "")
        ),
    )
    return {"step_ms": step, "attention_ms": _ms(attention, n)}


def traced(name: str, tokens: int, batch_size: int, runs: int) -> list[dict]:
    """Per rank, the medians over ``runs`` profiled runs of :func:`ring_step` (cp) or
    :func:`one_step` (one process)."""
    found = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            run(name, tokens, batch_size, TRACED_STEPS, profile=folder)
            ranks = 2 if name.startswith("cp") else 1
            read = ring_step if name.startswith("cp") else one_step
            found.append(
                [read(profiling.events(profiling.trace_path(folder, r))) for r in range(ranks)]
            )
    return [
        {k: statistics.median(run_[r][k] for run_ in found) for k in found[0][r]}
        for r in range(len(found[0]))
    ]


def quiet_blocks(tokens: int, batch_size: int, repeats: int = 5) -> list[list[float]]:
    """Per rank of cp 2 zigzag, ms of forward's arithmetic for each ring step's key block
    (``ring.block_forward`` and the merge, exactly the ring's pieces) with no message in flight,
    here in this process on 1 thread, best of ``repeats``: what the same blocks cost when no
    transfer shares the cores. Last, one process's SDPA forward over the whole sequence."""
    torch.manual_seed(0)
    out = []
    with cu.loop.num_threads(1):
        for rank in range(2):
            q, k, v = (torch.randn(batch_size, HEADS, tokens // 2, HEAD_DIM) for _ in range(3))
            times = []
            for owner in (rank, 1 - rank):  # step 0: its own block; step 1: the other's
                best = float("inf")
                for _ in range(repeats):
                    o, lse = torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"))
                    start = time.perf_counter()
                    for rows, cols, diagonal in split.plan(tokens, 2, rank, owner):
                        got = ring.block_forward(
                            q[..., rows, :], k[..., cols, :], v[..., cols, :], diagonal, 0.35
                        )
                        ring._merge(o, lse, rows, *got)
                    best = min(best, time.perf_counter() - start)
                times.append(best * 1e3)
            out.append(times)
        q, k, v = (torch.randn(batch_size, HEADS, tokens, HEAD_DIM) for _ in range(3))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            best = min(best, time.perf_counter() - start)
    return out + [[best * 1e3]]


def attention_worker(tokens: int, batch_size: int, fused: bool) -> int:
    """In a worker: the bytes one attention's forward and backward hold at their fullest on this
    rank, its inputs (q, k, v and the output's gradient) included. One rank: PyTorch's SDPA,
    causal (the model's own path); several: the ring, zigzag. ``fused``: False runs the
    written-out arithmetic (SDPA's math kernel, the ring's ``FUSED = False``), which holds each
    block's scores whole."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    held = split.positions(tokens, cp, rank, "zigzag")
    torch.manual_seed(rank)
    q, k, v, dout = (torch.randn(batch_size, HEADS, len(held), HEAD_DIM) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    ring.FUSED = fused
    with ExitStack() as stack:
        if not fused:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        attend = (
            functools.partial(F.scaled_dot_product_attention, is_causal=True)
            if cp == 1
            else functools.partial(ring.ring_attention, positions=held, group=dist.group.WORLD)
        )
        attend(q, k, v).backward(dout)  # once unprofiled: whatever is built once, built
        q.grad = k.grad = v.grad = None
        with profile(profile_memory=True) as prof:
            attend(q, k, v).backward(dout)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "memory.json")
            prof.export_chrome_trace(path)
            used = profiling.memory_by_phase(profiling.events(path))
    return inputs + used["peak"] - used["start"]


def attention_bytes(tokens: int, batch_size: int) -> dict:
    """Per rank, :func:`attention_worker` at cp = 1 and 2, fused and written out."""
    out = {"tokens": tokens, "batch_size": batch_size}
    for fused in (True, False):
        for cp in (1, 2):
            got = cu.launch.run(
                attention_worker, cp, tokens, batch_size, fused, threads=1, device="cpu"
            )
            out[f"{'fused' if fused else 'written_out'}_cp{cp}_bytes"] = got
    return out


def _explain(row: dict) -> list[str]:
    """The printed summary of one sequence length: where a cp rank's step went against one
    process's, and the contiguous split's ranks against ``split.work``."""
    t, lines = row["traces"], []
    one = t["one"][0]
    for name in ("cp zigzag", "cp contiguous"):
        for r, s in enumerate(t[name]):
            lines.append(
                f"  {name}, rank {r}: step {s['step_ms']:.0f} ms = ring arithmetic "
                f"{s['blocks_ms']:.0f} + posting {s['posting_ms']:.0f} + waiting "
                f"{s['waited_ms']:.0f} (of a transfer span of {s['transfer_ms']:.0f}: "
                f"{s['hidden']:.0%} hidden) + outside the ring {s['outside_ms']:.0f}; forward "
                f"blocks with a transfer in flight {s['forward_blocks_in_flight_ms']:.0f} ms, "
                f"without {s['forward_blocks_alone_ms']:.0f}"
            )
    lines.append(
        f"  one process: step {one['step_ms']:.0f} ms, attention {one['attention_ms']:.0f}, the "
        f"rest {one['step_ms'] - one['attention_ms']:.0f}: a perfect split would give each rank "
        f"{one['step_ms'] / 2:.0f}"
    )
    quiet = row["quiet_blocks_ms"]
    lines.append(
        "  the same forward blocks (one layer) with no transfer in flight, per rank, step 0 and "
        "step 1: "
        + ", ".join(f"{a:.1f} and {b:.1f} ms" for a, b in quiet[:2])
        + f"; one process's SDPA forward over the whole sequence {quiet[2][0]:.1f} ms"
    )
    work = row["score_pairs"]
    for layout in split.LAYOUTS:
        busy = [s["blocks_ms"] for s in t[f"cp {layout}"]]
        lines.append(
            f"  {layout}: score pairs per rank {work[layout]} (last/first "
            f"{work[layout][-1] / work[layout][0]:.2f}), ring arithmetic per rank "
            + "/".join(f"{b:.0f}" for b in busy)
            + f" ms (last/first {busy[-1] / busy[0]:.2f})"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="at 196 tokens")
    p.add_argument("--long-batch-size", type=int, default=16, help="at 784 tokens")
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--traced-runs", type=int, default=2, help="profiled runs of each, for traces")
    p.add_argument("--quick", action="store_true", help="2 repeats, 4 steps, 1 traced run")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps, args.traced_runs = 2, 4, 1
    rows, memory = [], []
    with cu.measure.Watch() as watch:
        for tokens, batch in ((196, args.batch_size), (784, args.long_batch_size)):
            measures = {n: functools.partial(run, n, tokens, batch, args.steps) for n in CONFIGS}
            rate = cu.measure.interleaved(measures, args.repeats, progress=f"{tokens} tokens")
            row = {"tokens": tokens, "batch_size": batch, "steps": args.steps}
            for name, spread in rate.items():
                row |= spread.as_dict(f"samples_per_s {name}")
            ratios = {
                "zigzag_vs_one": ("cp zigzag", "one"),
                "zigzag_vs_one_x_2_threads": ("cp zigzag", "one x 2 threads"),
                "contiguous_vs_one": ("cp contiguous", "one"),
                "zigzag_vs_contiguous": ("cp zigzag", "cp contiguous"),
            }
            for key, (a, b) in ratios.items():
                row |= cu.measure.ratios(rate[a], rate[b]).as_dict(key)
            row["score_pairs"] = {lay: split.work(tokens, 2, lay) for lay in split.LAYOUTS}
            row["quiet_blocks_ms"] = quiet_blocks(tokens, batch)
            row["traces"] = {n: traced(n, tokens, batch, args.traced_runs) for n in CONFIGS[:3]}
            rows.append(row)
            print(
                f"{tokens} tokens, batch {batch}: cp 2 zigzag "
                f"{cu.measure.ratios(rate['cp zigzag'], rate['one'])}x one process, "
                f"{cu.measure.ratios(rate['cp zigzag'], rate['one x 2 threads'])}x one process "
                f"with 2 threads, {cu.measure.ratios(rate['cp zigzag'], rate['cp contiguous'])}x"
                " the contiguous split",
                *_explain(row),
                sep="\n",
                flush=True,
            )
        for tokens, batch in ((196, args.batch_size), (784, args.long_batch_size)):
            m = attention_bytes(tokens, batch)
            memory.append(m)
            print(
                f"{tokens} tokens, batch {batch}: one attention's peak bytes per rank at cp 2 "
                f"over one process's: {max(m['fused_cp2_bytes']) / m['fused_cp1_bytes'][0]:.2f} "
                "(SDPA's flash kernel against the ring's), "
                f"{max(m['written_out_cp2_bytes']) / m['written_out_cp1_bytes'][0]:.2f} "
                "(both written out, whole score blocks)",
                flush=True,
            )
    print(watch.note())
    extra = {"memory": memory, "quick": args.quick}
    print(f"wrote {save('context_parallel', rows, args.repeats, watch, extra)}")


if __name__ == "__main__":
    main()
