"""Data parallel on the command line's own path: the CNN on 2 DDP workers x 1 thread, against
its limit on this machine, two independent processes each training on half the batch at once.

    python benchmarks/bench_ddp.py [--batch-sizes 64 256] [--repeats 5] [--samples 3072]

Every run is a ``RunConfig`` run as a user runs it: ``python -m course_utils.train`` with its
flags, a fresh process each (``_command_line``), on the CPU, with steps enough for ``--samples``
samples; each reports ``samples_per_s`` as the command line does (the steps after the first):

- ``ddp``: ``--parallel ddp --nproc 2 --threads 1``, the global batch split over the workers;
- ``independent``: the limit. Two ``--parallel none`` runs on half the batch each, started
  together, their samples/s summed: what 2 processes do here when they never wait for each
  other;
- ``one``: ``--parallel none --threads 1``, the whole batch in one process;
- ``one x 2 threads``: ``--parallel none --threads 2``, one process on both cores.

Every batch size and configuration runs once per round, in turns (A B C D A B C D ...), so that
load elsewhere hits them alike; the ratios are medians of each round's ratios, with min-max:
``ddp / independent`` (the share of the limit), ``ddp / one`` (the speedup), ``independent / 2
one`` (the limit against twice one process). Then where a DDP step's time goes, from the traces
of profiled runs of DDP and of the limit (``--profile``, ``--traced-runs`` of each:
:func:`where_time_goes`). Writes benchmarks/results/ddp.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from functools import partial

import _command_line as command_line
from _results import save

import course_utils as cu
from course_utils import profiling
from course_utils.config import RunConfig

LIMIT = "independent"
CONFIGS = ("ddp", LIMIT, "one", "one x 2 threads")
# profiled runs: profiling.Recorder records steps 3-5 (the first builds buffers, the second DDP's
# buckets), and the run ends there
TRACED_STEPS = 6


def config(name: str, model: str, batch_size: int, steps: int) -> RunConfig:
    """The command line's configuration of ``name`` (see the module docstring)."""
    cfg = RunConfig(model=model, batch_size=batch_size, steps=steps, threads=1, device="cpu")
    if name == "ddp":
        return replace(cfg, parallel="ddp", nproc=2)
    if name == LIMIT:
        return replace(cfg, batch_size=batch_size // 2)
    return replace(cfg, threads=2) if name == "one x 2 threads" else cfg


def run(name: str, model: str, batch_size: int, steps: int, profile: str | None = None) -> float:
    """Samples/s of one run of configuration ``name``, each process a fresh ``python -m
    course_utils.train``; for the limit, two started together, their samples/s summed (each
    writes its trace, with ``profile``, in a folder of its own: ``profile/0``, ``profile/1``)."""
    cfg = config(name, model, batch_size, steps)
    if name != LIMIT:
        return command_line.run(replace(cfg, profile=profile))[0]["samples_per_s"]
    both = [replace(cfg, profile=profile and os.path.join(profile, str(i))) for i in (0, 1)]
    return sum(r["samples_per_s"] for r in command_line.run(*both))


def steps_for(batch_size: int, samples: int) -> int:
    return max(samples // batch_size, 8) + 1  # + the first step, which is not counted


def where_time_goes(model: str, batch_size: int, repeats: int) -> dict:
    """Milliseconds per step, from the traces of profiled runs of DDP and of the limit (the steps
    ``profiling.Recorder`` records; medians over ``repeats`` runs of each, in turns): see
    :func:`per_step` for each rank's share, and for DDP, how long after the other the slower rank
    reached the gradients' all-reduce (the first rank waits that long) and the all-reduce's span on
    the rank that came last (its own cost: nobody is left to wait for)."""
    runs = {name: [] for name in ("ddp", LIMIT)}
    for _ in range(repeats):
        for name, found in runs.items():
            with tempfile.TemporaryDirectory() as folder:
                run(name, model, batch_size, TRACED_STEPS, profile=folder)
                traces = {r: profiling.events(_trace(folder, name, r)) for r in (0, 1)}
            ranks = [per_step(events) for events in traces.values()]
            one = {key: statistics.mean(r[key] for r in ranks) for key in ranks[0]}
            if name == "ddp":
                num_steps = min(len(_profiled_steps(events)) for events in traces.values())
                arrivals = profiling.arrivals(traces, num_steps)
                one["wait_for_the_slower_rank_ms"] = _median(arrivals, "start_gap_ms")
                one["all_reduce_on_the_last_rank_ms"] = _median(arrivals, "last_ms")
            found.append(one)
    out = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    return {"batch_size": batch_size, "traced_runs": repeats, **out}


def per_step(events: list[dict]) -> dict:
    """One rank's milliseconds per profiled step: the whole step; its arithmetic (forward,
    backward's gradient computations, the optimizer); ``AccumulateGrad`` (where DDP's hooks copy
    each gradient into its bucket and start the bucket's all-reduce; without DDP, the plain sum
    into ``.grad``); and what else backward held (waiting for the all-reduce to end)."""
    complete = [e for e in events if e.get("ph") == "X"]
    num_steps = len(_profiled_steps(complete))

    def ms(keep) -> float:
        return sum(b - a for a, b in profiling.intervals(complete, keep)) / 1e3 / num_steps

    def arithmetic(e: dict) -> bool:
        return profiling.is_phase(e, ("forward", "optimizer")) or profiling.is_backward_arithmetic(
            e
        )

    def accumulate(e: dict) -> bool:
        return e["name"].startswith("autograd::engine") and "AccumulateGrad" in e["name"]

    backward = profiling.intervals(complete, lambda e: profiling.is_phase(e, ("backward",)))
    busy = profiling.intervals(complete, lambda e: arithmetic(e) or accumulate(e))
    held = sum(b - a for a, b in backward) - profiling.common_us(backward, busy)
    return {
        "step_ms": statistics.mean(e["dur"] for e in _profiled_steps(complete)) / 1e3,
        "arithmetic_ms": ms(arithmetic),
        "accumulate_grad_ms": ms(accumulate),
        "backward_waits_ms": held / 1e3 / num_steps,
    }


def _trace(folder: str, name: str, rank: int) -> str:
    """Where rank ``rank``'s trace of a profiled run of ``name`` is (see :func:`run`)."""
    if name == LIMIT:
        return profiling.trace_path(os.path.join(folder, str(rank)), 0)
    return profiling.trace_path(folder, rank)


def _profiled_steps(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e["name"].startswith("ProfilerStep#")]


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=["cnn", "rnn", "transformer"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=3072, help="samples per timed run")
    p.add_argument("--traced-runs", type=int, default=3, help="profiled runs of each, for traces")
    p.add_argument("--no-traces", dest="traces", action="store_false")
    args = p.parse_args()

    measures = {  # every batch size in every round: a burst of load hits them all
        (b, name): partial(run, name, args.model, b, steps_for(b, args.samples))
        for b in args.batch_sizes
        for name in CONFIGS
    }
    rows = []
    with cu.measure.Watch() as watch:
        speeds = cu.measure.interleaved(measures, args.repeats, progress="ddp")
        for b in args.batch_sizes:
            rate = {name: speeds[b, name] for name in CONFIGS}
            one = rate["one"]
            twice_one = cu.measure.spread(2 * s for s in one.samples)
            row = {"model": args.model, "batch_size": b, "steps": steps_for(b, args.samples)}
            for name, spread in rate.items():
                row |= spread.as_dict(f"samples_per_s {name}")
            for key, (a, ref) in {
                "of_the_limit": (rate["ddp"], rate[LIMIT]),
                "speedup_vs_one": (rate["ddp"], one),
                "speedup_vs_one_x_2_threads": (rate["ddp"], rate["one x 2 threads"]),
                "limit_vs_twice_one": (rate[LIMIT], twice_one),
            }.items():
                row |= cu.measure.ratios(a, ref).as_dict(key)
            rows.append(row)
            print(
                f"batch {b:4d}: DDP {cu.measure.ratios(rate['ddp'], rate[LIMIT])} of the limit "
                f"(two independent half-batch processes), {cu.measure.ratios(rate['ddp'], one)}x "
                f"one process, {cu.measure.ratios(rate['ddp'], rate['one x 2 threads'])}x one "
                f"process with 2 threads; the limit is {cu.measure.ratios(rate[LIMIT], twice_one)}"
                " of twice one process",
                flush=True,
            )
        if args.traces:
            for row in rows:
                b = row["batch_size"]
                row["where_time_goes"] = where_time_goes(args.model, b, args.traced_runs)
                print(_explain(row["where_time_goes"]), flush=True)
    print(watch.note())
    print(f"wrote {save('ddp', rows, args.repeats, watch)}")


def _explain(w: dict) -> str:
    ddp, limit = w["ddp"], w[LIMIT]
    return (
        f"batch {w['batch_size']:4d}, from the traces (ms per step, DDP against an independent "
        f"half-batch process): step {ddp['step_ms']:.1f} against {limit['step_ms']:.1f}, "
        f"arithmetic {ddp['arithmetic_ms']:.1f} against {limit['arithmetic_ms']:.1f}, "
        f"AccumulateGrad {ddp['accumulate_grad_ms']:.1f} against "
        f"{limit['accumulate_grad_ms']:.1f}, waiting in backward {ddp['backward_waits_ms']:.1f} "
        f"against {limit['backward_waits_ms']:.1f}; the first rank at the all-reduce waits "
        f"{ddp['wait_for_the_slower_rank_ms']:.1f} for the other, and it then lasts "
        f"{ddp['all_reduce_on_the_last_rank_ms']:.1f} on the rank that came last"
    )


if __name__ == "__main__":
    main()
