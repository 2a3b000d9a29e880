"""Sharded data parallel against DDP: the state each rank holds and the throughput, 2 ranks.

    python benchmarks/bench_sharding.py [--repeats 5] [--batch-size 128] [--steps 20]

The transformer with AdamW (the state sharding is for: Adam keeps two numbers per parameter),
``--parallel ddp`` and ``--parallel fsdp`` on 2 workers x 1 thread at the same global batch, each a
real ``cu.train.run`` (forked workers, gloo). They run in turns (ddp, fsdp, ddp, fsdp ...) so that
load elsewhere hits both alike; the throughput counts the steps after the first; the ratio is the
median of the paired ratios, with min-max. The bytes are what rank 0 holds after training
(``state_bytes``: parameters, gradients, optimizer state; deterministic). Then, to show where fsdp's
time goes, the hand-written ZeRO stages 1-3 count the bytes their collectives send per step.
Writes benchmarks/results/sharding.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch.distributed as dist

import course_utils as cu
from course_utils import sharding
from course_utils.train import RunConfig

RESULTS = Path(__file__).resolve().parent / "results"


def run(parallel: str, batch_size: int, steps: int) -> dict:
    cfg = RunConfig(
        model="transformer",
        parallel=parallel,
        nproc=2,
        batch_size=batch_size,
        steps=steps,
        optimizer="adamw",
        lr=1e-3,
        threads=1,
        device="cpu",
    )
    return cu.train.run(cfg, progress=False)


def zero_traffic(stage: int, batch_size: int) -> int:
    """Bytes rank 0 sends in one step of hand-written ZeRO ``stage`` (2 ranks)."""
    model = cu.models.build("transformer", seed=0)
    zero = sharding.ZeRO(model, stage, partial(cu.loop.make_optimizer, lr=1e-3, kind="adamw"))
    X, y = cu.data.mnist("train", limit=batch_size)
    X = cu.models.prepare_input("transformer", X)
    rank, world = dist.get_rank(), dist.get_world_size()
    zero.train_step(model, zero.optimizer, X[rank::world], y[rank::world])
    return zero.traffic.bytes_sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    start = time.perf_counter()
    results = {"ddp": [], "fsdp": []}
    with cu.measure.Watch() as watch:
        for _ in range(args.repeats):
            for parallel in results:
                results[parallel].append(run(parallel, args.batch_size, args.steps))
    rate = {k: cu.measure.spread(r["samples_per_s"] for r in v) for k, v in results.items()}
    ratio = cu.measure.ratios(rate["fsdp"], rate["ddp"])
    held = {k: v[0]["state_bytes"] for k, v in results.items()}
    num_params = cu.models.count_parameters(cu.models.build("transformer"))
    traffic = {
        stage: cu.launch.run(zero_traffic, 2, stage, args.batch_size, device="cpu")[0]
        for stage in (1, 2, 3)
    }
    out = {
        "machine": platform.machine(),
        "cores": cu.hardware.num_cores(),
        "model": "transformer",
        "optimizer": "adamw",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "samples_per_s": {k: v.median for k, v in rate.items()},
        "fsdp_over_ddp": ratio.median,
        "fsdp_over_ddp_min": ratio.low,
        "fsdp_over_ddp_max": ratio.high,
        "state_bytes": held,
        "state_share": held["fsdp"]["total"] / held["ddp"]["total"],
        "bytes_sent_per_step": {
            "ddp (formula)": sharding.comm_per_rank(num_params, 2, 0),
            **{f"zero-{s} (counted)": b for s, b in traffic.items()},
        },
        "load": watch.note(),
        "seconds": time.perf_counter() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sharding.json").write_text(json.dumps(out, indent=1))
    print(
        f"state per rank: fsdp {held['fsdp']['total']:,} B, ddp {held['ddp']['total']:,} B "
        f"({out['state_share']:.3f} of ddp's)"
    )
    print(
        f"throughput: fsdp {rate['fsdp'].median:.0f}, ddp {rate['ddp'].median:.0f} samples/s: "
        f"{ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f}) of ddp's"
    )
    for name, sent in out["bytes_sent_per_step"].items():
        print(f"{name}: {sent / 1e6:.2f} MB sent per rank and step")
    print(watch.note())


if __name__ == "__main__":
    main()
