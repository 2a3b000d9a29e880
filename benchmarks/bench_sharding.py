"""Sharded data parallel against DDP: the state each rank holds and the throughput, 2 ranks.

    python benchmarks/bench_sharding.py [--repeats 5] [--batch-sizes 128 256] [--steps 20]

The transformer with AdamW (the state sharding is for: Adam keeps two numbers per parameter) on 2
workers x 1 thread at the same global batch: DDP; FSDP2 as ``--parallel fsdp`` runs it (small
blocks grouped into units of at least ``MIN_UNIT_PARAMS`` parameters: here the whole model is one
unit, FSDP2's default resharding); and FSDP2 block by block with every unit resharded after its
forward (ZeRO-3 layer by layer, the most communication). They run in turns (A B C A B C ...) so that
load elsewhere hits all alike; a run's step time is the median of its steps after the first two;
ratios are medians of the paired ratios, with min-max. The bytes are what rank 0 holds after
training (parameters, gradients, optimizer state: deterministic), and the bytes each hand-written
ZeRO stage sends per step (counted). Writes benchmarks/results/sharding.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import course_utils as cu
from course_utils import sharding

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("ddp", "fsdp (as --parallel fsdp)", "fsdp block by block, ZeRO-3")


def train(variant: str, batch_size: int, steps: int) -> dict:
    """Worker: ``steps`` steps of the transformer under ``variant``; step time and state held."""
    torch.set_num_threads(1)
    model = cu.models.build("transformer", seed=0)
    if variant == "ddp":
        module = cu.ddp.wrap(model, torch.device("cpu"))
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        if variant.startswith("fsdp (as"):
            units = sharding.grouped_units(model)
            sharding.fully_sharded(model, mesh, reshard_after_forward=None, units=units)
        else:
            sharding.fully_sharded(model, mesh, reshard_after_forward=True)
        module = model
    optimizer = cu.loop.make_optimizer(module, 1e-3, "adamw")
    X, y = cu.data.mnist("train")
    X = cu.models.prepare_input("transformer", X)
    rank, world = dist.get_rank(), dist.get_world_size()
    history = cu.loop.fit(
        module,
        optimizer,
        cu.data.batches(X, y, batch_size, steps, 0, rank, world),
        steps,
        batch_size=batch_size,
        reduce=cu.collectives.all_reduce_sum,
        progress=False,
    )
    held = sharding.state_bytes(model.parameters(), optimizer)
    return {"step_s": statistics.median(history.step_times[2:]), "state_bytes": held}


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
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    start = time.perf_counter()
    rows, held = [], {}
    with cu.measure.Watch() as watch:
        for batch in args.batch_sizes:
            samples = {v: [] for v in VARIANTS}
            for _ in range(args.repeats):
                for v in VARIANTS:
                    r = cu.launch.run(train, 2, v, batch, args.steps, threads=1, device="cpu")[0]
                    samples[v].append(r["step_s"])
                    held[v] = r["state_bytes"]
            steps = {v: cu.measure.spread(s) for v, s in samples.items()}
            for v in VARIANTS[1:]:
                ratio = cu.measure.ratios(steps["ddp"], steps[v])  # time ratio = throughput ratio
                rows.append(
                    {
                        "batch_size": batch,
                        "variant": v,
                        "ddp_step_s": steps["ddp"].median,
                        "step_s": steps[v].median,
                        "throughput_vs_ddp": ratio.median,
                        "min": ratio.low,
                        "max": ratio.high,
                    }
                )
                print(f"batch {batch}, {v}: {ratio} of DDP's throughput", flush=True)
    num_params = cu.models.count_parameters(cu.models.build("transformer"))
    traffic = {
        stage: cu.launch.run(zero_traffic, 2, stage, 128, device="cpu")[0] for stage in (1, 2, 3)
    }
    cli = VARIANTS[1]
    out = {
        "machine": platform.machine(),
        "cores": cu.hardware.num_cores(),
        "model": "transformer",
        "optimizer": "adamw",
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "state_bytes": held,
        "state_share": held[cli]["total"] / held["ddp"]["total"],
        "bytes_sent_per_step": {
            "ddp (formula)": sharding.comm_per_rank(num_params, 2, 0),
            **{f"zero-{s} (counted)": b for s, b in traffic.items()},
        },
        "load": watch.note(),
        "seconds": time.perf_counter() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sharding.json").write_text(json.dumps(out, indent=1))
    print(f"state per rank: fsdp {out['state_share']:.3f} of ddp's ({held[cli]['total']:,} B)")
    for name, sent in out["bytes_sent_per_step"].items():
        print(f"{name}: {sent / 1e6:.2f} MB sent per rank and step")
    print(watch.note())


if __name__ == "__main__":
    main()
