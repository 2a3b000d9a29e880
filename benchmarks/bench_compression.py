"""Gradient compression across the cluster's slow link (issue 27, lesson 14): DDP with each
``--compress`` hook against plain DDP, on 2 nodes of ``worker`` ranks each.

    python benchmarks/bench_compression.py [--repeats 3] [--steps 40] [--rate 20mbit]
        [--workers 1] [--hooks none bf16 powersgd:1 ...] [--quick]

It needs root (network namespaces); without, it says why in one line and measures nothing. Its
cluster is ``compbench`` (an earlier run's leftovers of that name are removed first; it goes down
in ``finally``, SIGTERM included). For each setting, ``python -m course_utils.train --parallel ddp
--compress X --threads 1 --eval`` under torchrun on each node (``cluster.torchrun.job``), every
hook once per round, in turns (``cu.measure.interleaved``), medians:

- **slow link, transformer** (the issue's target: PowerSGD rank 2 at least 1.5x plain DDP's step):
  the step (``batch_size / samples_per_s`` of rank 0's JSON), the bytes each node sent per step
  (``cluster.link_bytes`` around the run, less a short run's with the same hook, per extra step:
  start-up and DDP's first broadcast drop out) against ``compression.payload_bytes``, and the test
  accuracy after the fixed number of steps;
- **no limit on the link, transformer** and **slow link, CNN** (a model of 84k parameters):
  where compression stops paying, the step only.

Every rank computes on one thread of a 2-core machine that other programs share: the compute
part of a step is noisy, the link's part is not; read the min-max beside each median. Writes
benchmarks/results/compression.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

from _results import check_link, on_cluster, save, skip

import course_utils as cu
from course_utils import cluster, compression
from course_utils.cluster import torchrun

NAME = "compbench"  # this benchmark's cluster
HOOKS = ["none", "bf16", "powersgd:1", "powersgd:2", "powersgd:4", "topk:0.01", "sign"]
SHORT_STEPS = 6  # the run whose bytes are start-up and a few steps: subtracted per step
RUN_TIMEOUT_S = 300
MODELS = {  # what each model trains best with (docs/command_line.md)
    "transformer": ["--optimizer", "adamw", "--lr", "0.001"],
    "cnn": [],
}


def run(made, model: str, compress: str, steps: int, batch: int, workers: int, folder: Path):
    """One torchrun job across the nodes: rank 0's JSON, with the bytes each node sent."""
    out = folder / "run.json"
    out.unlink(missing_ok=True)
    args = ["--model", model, "--parallel", "ddp", "--compress", compress, *MODELS[model]]
    args += ["--batch-size", str(batch), "--steps", str(steps), "--threads", "1", "--eval"]
    args += ["--json", str(out)]
    before = [cluster.link_bytes(made, node)["sent"] for node in range(made.nodes)]
    job = torchrun.job(made, args, logs=folder, nproc_per_node=workers)
    try:
        result = torchrun.results(job, RUN_TIMEOUT_S, out)
    except RuntimeError as err:
        raise RuntimeError(f"--compress {compress}: {err}") from None
    finally:
        for node in range(made.nodes):  # workers a killed agent left behind
            cluster.kill_node(made, node)
    result["sent"] = [cluster.link_bytes(made, n)["sent"] - b for n, b in enumerate(before)]
    result["step_ms"] = batch / result["samples_per_s"] * 1e3
    return result


def setting(made, model: str, rate: str | None, args, folder: Path, count_bytes: bool) -> list:
    """Every hook of ``args.hooks`` once per round at ``rate``: one row per hook."""
    made = cluster.set_rate(made, rate)
    runs: dict[str, list[dict]] = {}

    def timed(compress: str) -> float:
        result = run(made, model, compress, args.steps, args.batch_size, args.workers, folder)
        runs.setdefault(compress, []).append(result)
        return result["step_ms"]

    measures = {hook: partial(timed, hook) for hook in args.hooks}
    spreads = cu.measure.interleaved(measures, args.repeats, progress=f"{model} at {rate}")
    shapes = [p.shape for p in cu.models.build(model, seed=0).parameters()]
    rows = []
    for hook in args.hooks:
        last = runs[hook][-1]
        row = {"model": model, "link": rate or "unlimited", "compress": hook}
        row |= spreads[hook].as_dict("step_ms") | {"step_ms_samples": list(spreads[hook].samples)}
        row["of_plain"] = cu.measure.ratios(spreads["none"], spreads[hook]).as_dict("speedup")
        row["test_accuracy"] = last.get("test_accuracy")
        row["final_loss"] = last["losses"][-1]
        if count_bytes:
            short = run(made, model, hook, SHORT_STEPS, args.batch_size, args.workers, folder)
            extra = args.steps - SHORT_STEPS
            row["sent_per_step"] = [
                statistics.median(r["sent"][n] - short["sent"][n] for r in runs[hook]) / extra
                for n in range(made.nodes)
            ]
            row["payload_bytes"] = compression.payload_bytes(hook, shapes)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    s = row["of_plain"]
    text = (
        f"{row['model']} at {row['link']}, --compress {row['compress']}: step "
        f"{row['step_ms']:.0f} ms ({row['step_ms_min']:.0f}-{row['step_ms_max']:.0f}), "
        f"{s['speedup']:.2f}x plain ({s['speedup_min']:.2f}-{s['speedup_max']:.2f}); "
        f"test accuracy {row['test_accuracy']:.3f}, last loss {row['final_loss']:.3f}"
    )
    if "sent_per_step" in row:
        text += "; sent per step " + "/".join(f"{b:,.0f}" for b in row["sent_per_step"])
        text += f" B (payload {row['payload_bytes']:,})"
    return text


def measure(args, folder: Path) -> list[dict]:
    made = cluster.up(cluster.Cluster(NAME, 2, args.rate))
    rows = setting(made, "transformer", args.rate, args, folder, count_bytes=True)
    rows += setting(made, "transformer", None, args, folder, count_bytes=False)
    rows += setting(made, "cnn", args.rate, args, folder, count_bytes=False)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps of each timed run")
    p.add_argument("--batch-size", type=int, default=64, help="global")
    p.add_argument("--rate", default="20mbit", help="the slow link (tc's units)")
    p.add_argument("--workers", type=int, default=1, help="workers per node")
    p.add_argument("--hooks", nargs="+", default=HOOKS)
    p.add_argument("--quick", action="store_true", help="1 repeat, 16 steps: a short check")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 16
    check_link(p, args, SHORT_STEPS)
    if "none" not in args.hooks:
        args.hooks = ["none", *args.hooks]  # every speedup is against plain DDP
    for hook in args.hooks:
        try:
            compression.parse(hook)
        except ValueError as err:
            p.error(str(err))
    start = time.perf_counter()
    with cu.measure.Watch() as watch:
        rows, reason = on_cluster(NAME, partial(measure, args))
    if reason is not None:
        skip("compression", reason, args.repeats, watch)
        return
    settings = {"steps": args.steps, "batch_size": args.batch_size, "rate": args.rate}
    settings |= {"workers_per_node": args.workers, "threads": 1, "quick": args.quick}
    path = save("compression", rows, args.repeats, watch, settings)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s; other programs kept "
          f"{watch.others:.1f} cores busy")  # fmt: skip


if __name__ == "__main__":
    main()
