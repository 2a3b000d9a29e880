"""The course's ring all-reduce against ``dist.all_reduce``, and the alpha-beta model of both.

    python benchmarks/bench_collectives.py [--nproc 2] [--repeats 15] [--max-mb 64]

Two worker processes (gloo, one thread each) all-reduce float32 tensors from 1 KB to 64 MB; for
each size the two implementations run alternately (A B A B ...) in the same run, so that a noisy
machine affects both alike. Reported per size: the fastest repeat of each (interference from other
programs only ever adds time), their ratio (ring / gloo), and the alpha-beta model fitted to each
implementation's fastest times, with its relative error. On one machine the "network" is memory
copies through the kernel's loopback TCP: the figures describe this machine, not a network. (The
JSON also keeps every repeat, the medians, and the median of the paired ratios.) Writes
benchmarks/results/collectives.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import course_utils as cu
from course_utils import collectives

RESULTS = Path(__file__).resolve().parent / "results"


def measure(nproc: int, repeats: int, max_mb: int) -> dict:
    """Probe both implementations on ``nproc`` workers; fit the model; one row per size."""
    sizes = [1024 * 4**k for k in range(20) if 1024 * 4**k <= max_mb * 2**20]  # 1 KB, 4 KB, ...
    start = time.perf_counter()
    rows = cu.launch.run(
        collectives.bandwidth_probe,
        nproc,
        sizes,
        repeats,
        ("all_reduce", "ring"),
        threads=1,
        timeout=1800,
    )[0]  # identical on every rank
    wall_s = time.perf_counter() - start
    by_op = {op: [r for r in rows if r["op"] == op] for op in ("all_reduce", "ring")}
    fits = {
        op: collectives.fit_alpha_beta(
            [r["bytes"] for r in op_rows], [r["min_seconds"] for r in op_rows], nproc
        )
        for op, op_rows in by_op.items()
    }
    table = []
    for gloo, ring in zip(by_op["all_reduce"], by_op["ring"]):
        n = gloo["bytes"]
        paired = [r / g for r, g in zip(ring["samples"], gloo["samples"])]
        model_gloo = float(fits["all_reduce"].predict(n))
        model_ring = float(fits["ring"].predict(n))
        table.append(
            {
                "bytes": n,
                "all_reduce_min_s": gloo["min_seconds"],
                "all_reduce_median_s": gloo["seconds"],
                "ring_min_s": ring["min_seconds"],
                "ring_median_s": ring["seconds"],
                "ratio_ring_over_all_reduce": ring["min_seconds"] / gloo["min_seconds"],
                "ratio_paired_median": statistics.median(paired),
                "model_all_reduce_s": model_gloo,
                "model_rel_error_all_reduce": model_gloo / gloo["min_seconds"] - 1,
                "model_ring_s": model_ring,
                "model_rel_error_ring": model_ring / ring["min_seconds"] - 1,
                "all_reduce_samples": gloo["samples"],
                "ring_samples": ring["samples"],
            }
        )
    return {
        "machine": f"{platform.machine()}, {cu.hardware.num_cores()} cores",
        "nproc": nproc,
        "backend": "gloo",
        "threads_per_worker": 1,
        "repeats": repeats,
        "wall_s": wall_s,
        "fits": {
            op: {"alpha_s": f.alpha_s, "beta_bytes_per_s": f.beta_bytes_per_s}
            for op, f in fits.items()
        },
        "rows": table,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-mb", type=int, default=64)
    args = p.parse_args()
    out = measure(args.nproc, args.repeats, args.max_mb)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "collectives.json").write_text(json.dumps(out, indent=1))

    print(
        f"{out['nproc']} workers, gloo, {out['repeats']} repeats. Times: the fastest repeat; "
        "ring/gloo: ratio of the fastest; err: model / fastest - 1"
    )
    print(
        f"{'size':>8} {'gloo ms':>9} {'ring ms':>9} {'ring/gloo':>9} {'err gloo':>9} {'err ring':>9}"
    )
    for row in out["rows"]:
        print(
            f"{_size(row['bytes']):>8} {1e3 * row['all_reduce_min_s']:9.3f} "
            f"{1e3 * row['ring_min_s']:9.3f} {row['ratio_ring_over_all_reduce']:9.2f} "
            f"{row['model_rel_error_all_reduce']:+9.0%} {row['model_rel_error_ring']:+9.0%}"
        )
    for op, f in out["fits"].items():
        print(
            f"alpha-beta fit, {op}: alpha = {1e6 * f['alpha_s']:.1f} us per message, "
            f"beta = {f['beta_bytes_per_s'] / 1e9:.2f} GB/s"
        )
    print(f"({out['wall_s']:.1f} s)")


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


if __name__ == "__main__":
    main()
