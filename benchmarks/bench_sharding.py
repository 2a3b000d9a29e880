"""Sharded data parallel against DDP on the command line's own path, 2 ranks: the throughput, and
the model state each rank holds between steps and at the fullest moment of a step.

    python benchmarks/bench_sharding.py [--repeats 5] [--batch-sizes 128 256] [--steps 20]

The transformer with AdamW (the state sharding is for: Adam keeps two numbers per parameter) on 2
workers x 1 thread at the same global batch, every run a ``RunConfig`` through
``course_utils.train.run`` (``train_worker``, as ``python -m course_utils.train`` runs it):

- ``ddp``: ``--parallel ddp``, a whole replica per rank;
- ``fsdp per block (--parallel fsdp)``: FSDP2 with one unit per block, and the root;
- ``fsdp grouped: N blocks per unit``: the same worker with FSDP's units grouped
  (``sharding.grouped_units``), a variant the command line does not run: fewer units pay fewer
  collectives and less of FSDP's work per unit, and hold N blocks whole at once. With all 4
  blocks in one unit the whole model is gathered during the step: it gives up what sharding is
  for, and only the state between steps stays sharded.

They run in turns (A B C D A B C D ...) so that load elsewhere hits all alike; each run reports
``samples_per_s`` as the command line does (the steps after the first); ratios to DDP are medians
of the paired ratios of a round, with min-max. The bytes are rank 0's, deterministic:
``state_bytes`` (between steps) and ``peak_state_bytes`` (``sharding.PeakState``: parameters,
gradients and optimizer state alive at the fullest moment of a step). Writes
benchmarks/results/sharding.json in the shape of the other benchmarks (``_results.save``).
"""

from __future__ import annotations

import argparse
from functools import partial
from unittest import mock

from _results import save

import course_utils as cu
from course_utils import sharding
from course_utils.config import RunConfig

CLI = "fsdp per block (--parallel fsdp)"
VARIANTS = {  # name -> FSDP blocks per unit (None: --parallel ddp)
    "ddp": None,
    CLI: 1,
    "fsdp grouped: 2 blocks per unit": 2,
    "fsdp grouped: 4 blocks per unit (the whole model gathered in the step)": 4,
}


def grouped_worker(cfg: RunConfig, blocks_per_unit: int) -> dict | None:
    """In a worker: the command line's ``train_worker``, its FSDP units grouped by
    ``blocks_per_unit`` (``sharding.apply`` calls ``fully_sharded``: here with those units)."""
    shard = sharding.fsdp.fully_sharded

    def grouped(model, mesh, **options):
        return shard(model, mesh, units=sharding.grouped_units(model, blocks_per_unit), **options)

    with mock.patch.object(sharding.fsdp, "fully_sharded", grouped):
        return cu.train.train_worker(cfg)


def run(variant: str, batch_size: int, steps: int) -> dict:
    """One run of ``variant``: rank 0's results, as ``train.run`` returns them."""
    blocks_per_unit = VARIANTS[variant]
    cfg = RunConfig(
        model="transformer",
        optimizer="adamw",
        lr=1e-3,
        parallel="ddp" if blocks_per_unit is None else "fsdp",
        nproc=2,
        batch_size=batch_size,
        steps=steps,
        threads=1,
        device="cpu",  # CPU processes, even on a GPU box
    )
    if blocks_per_unit in (None, 1):
        return cu.train.run(cfg, progress=False)
    return cu.launch.run(
        grouped_worker, cfg.nproc, cfg, blocks_per_unit, threads=cfg.threads, device=cfg.device
    )[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    rows = []
    with cu.measure.Watch() as watch:
        for batch in args.batch_sizes:
            held = {}  # variant -> rank 0's bytes (the same in every round)

            def speed(variant: str, batch: int = batch, held: dict = held) -> float:
                result = run(variant, batch, args.steps)
                held[variant] = {k: result[k] for k in ("state_bytes", "peak_state_bytes")}
                return result["samples_per_s"]

            measures = {v: partial(speed, v) for v in VARIANTS}
            speeds = cu.measure.interleaved(measures, args.repeats, progress=f"batch {batch}")
            for v, rate in speeds.items():
                ratio = cu.measure.ratios(rate, speeds["ddp"])
                rows.append(
                    {"batch_size": batch, "variant": v, "steps": args.steps}
                    | rate.as_dict("samples_per_s")
                    | {"throughput_vs_ddp": ratio.median, "min": ratio.low, "max": ratio.high}
                    | held[v]
                )
                peak = (
                    held[v]["peak_state_bytes"]["total"] / held["ddp"]["peak_state_bytes"]["total"]
                )
                rest = held[v]["state_bytes"]["total"] / held["ddp"]["state_bytes"]["total"]
                print(
                    f"batch {batch}, {v}: {ratio} of DDP's throughput; state per rank "
                    f"{peak:.2f} of DDP's at the peak of a step, {rest:.2f} between steps",
                    flush=True,
                )
    print(watch.note())
    save("sharding", rows, args.repeats, watch)


if __name__ == "__main__":
    main()
