"""A cluster on one machine (``scripts/cluster``, lesson 14): what bringing one up costs, and a DDP
step across two nodes against the alpha-beta model at the link's rate.

    python benchmarks/bench_cluster.py [--repeats 5] [--rates 1gbit 100mbit 20mbit]
        [--steps 40] [--batch-size 64] [--traced-runs 1] [--quick]

It needs root (network namespaces); without, it says why in one line and measures nothing. Every
cluster it makes has a name of its own (``benchcli``, ``benchapi``, ``benchddp``), an earlier
run's leftovers of those names are removed first, and each goes down in ``finally`` (SIGTERM
included): one run at a time, then (a second would take the first's clusters down). In order:

1. **Bring-up and tear-down** of 2 nodes at 1 Gbit/s, in turns: ``python -m course_utils.cluster
   up`` and ``down`` in a fresh process each (Python's start and imports included), then
   ``cluster.up`` and ``cluster.down`` in this process. Seconds, median and min-max.
2. **The link** (:func:`probe`): one process on each node, ``collectives.bandwidth_probe`` of
   gloo's all-reduce across them. Unlimited, ``fit_alpha_beta`` over 1 KB-4 MB gives alpha (and
   the veths' own beta); at each rate, the slope between the two largest sizes, repeats back to
   back, is the payload the link carries once its token bucket is empty.
3. **DDP across 2 nodes x 1 worker**: ``python -m course_utils.train --model cnn --parallel ddp
   --threads 1`` under torchrun on each node (``cluster.torchrun.job``, static rendezvous), one
   cluster whose rate changes between runs, every rate once per round, unlimited first; and one
   process on half the batch (``--parallel none``, a fresh process), the step's arithmetic alone.
   A step's time is rank 0's mean over the steps after the first, ``batch_size / samples_per_s``
   from the JSON. The model, per round: compute C = the unlimited link's step less its modelled
   all-reduce; ``model = C + ring_cost(gradient bytes, 2, alpha, rate)``, beta = the rate in
   bytes/s; gap = measured / model - 1. Beside it the same with the link's token bucket
   (:func:`bucket_ms`): its ``burst`` bytes (read from ``tc``) leave at once, the bucket refills
   at the rate while the ranks compute, and the rest leaves at the rate less the packets'
   headers (:func:`payload_share`, which the probe's slopes check).
4. **Bytes on the link** per step: each node's counters (``cluster.link_bytes``) around every run,
   less those of one 10-step run (start-up, DDP's first broadcast), per extra step; against
   ``ring_bytes_sent`` of the gradient.
5. **Where a step goes** (:func:`step_parts`): runs with ``--profile`` at each rate; from both
   ranks' traces, the arithmetic, the all-reduce on the rank that reached it last (the transfer,
   set beside both models' all-reduce: a test of the link's model free of the compute's noise),
   and how long the first rank waited for the other to arrive.

The machine's other programs slow a synchronous run more than one process: read the min-max.
Writes benchmarks/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import _command_line as command_line
from _results import save, skip

import course_utils as cu
from course_utils import cluster, collectives, profiling
from course_utils.cluster import torchrun
from course_utils.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"cli": "benchcli", "api": "benchapi", "ddp": "benchddp"}  # this benchmark's clusters
SHORT_STEPS = 10  # the run whose bytes are start-up and few steps: subtracted per step
TRACED_STEPS = 8  # profiling.Recorder records steps 3-5; the loss sum at step 8 is outside
PROBE_SIZES = [2**k for k in range(10, 23, 2)]  # 1 KiB .. 4 MiB: alpha, the veths' beta
RUN_TIMEOUT_S = 240  # one torchrun job; a collective itself gives up after --timeout (60 s)


def gradient_bytes() -> int:
    """The CNN's gradient: what DDP all-reduces every step (float32)."""
    model = cu.models.build("cnn", seed=0)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bring_up(repeats: int) -> dict:
    """Seconds to make and remove 2 nodes, by the command line and by the API, in turns."""

    def cli(action: str, *more: str) -> float:
        argv = [sys.executable, "-m", "course_utils.cluster", "--name", NAMES["cli"], action]
        start = time.perf_counter()
        subprocess.run([*argv, *more], cwd=ROOT, check=True, capture_output=True, timeout=120)
        return time.perf_counter() - start

    def api(make: bool) -> float:
        start = time.perf_counter()
        if make:
            cluster.up(cluster.Cluster(NAMES["api"], 2, "1gbit"))
        else:
            cluster.down(NAMES["api"])
        return time.perf_counter() - start

    measures = {  # the API first: where no cluster can be made, its ClusterError says why
        "api_up_s": partial(api, True),
        "api_down_s": partial(api, False),
        "cli_up_s": partial(cli, "up", "--nodes", "2", "--rate", "1gbit"),
        "cli_down_s": partial(cli, "down"),
    }
    spreads = cu.measure.interleaved(measures, repeats)
    return {name: s.as_dict("median") for name, s in spreads.items()}


def _shown(made: cluster.Cluster, tool: str, what: str) -> list[dict]:
    """``ip``'s or ``tc``'s JSON about node 0's link (``what``: "link" or "qdisc")."""
    argv = [tool, "-j", "-n", made.namespace(0), what, "show", "dev", cluster.LINK]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def burst_bytes(made: cluster.Cluster) -> int | None:
    """The token bucket's size on node 0's link, as ``tc`` reports it (None: no limit)."""
    found = [q["options"]["burst"] for q in _shown(made, "tc", "qdisc") if q["kind"] == "tbf"]
    return found[0] if found else None


def payload_share(made: cluster.Cluster) -> float:
    """The share of the bytes the token bucket counts that are payload: it splits veths' 64 KiB
    segments into packets of the link's MTU and counts each whole, its Ethernet (14 bytes), IP
    (20) and TCP (32, timestamps included) headers too."""
    mtu = _shown(made, "ip", "link")[0]["mtu"]
    return (mtu - 20 - 32) / (mtu + 14)


def probe_worker(sizes: list[int], repeats: int, out: str) -> None:
    """On a node: gloo's all-reduce at each size against the other node's process."""
    with cu.launch.process_group("cpu", 60) as me:
        got = collectives.bandwidth_probe(sizes, repeats, "all_reduce", warmup=1)
        if me.is_main:
            Path(out).write_text(json.dumps(got))


def probe(made: cluster.Cluster, sizes: list[int], repeats: int, folder: Path) -> list[dict]:
    """:func:`probe_worker` on each node of ``made`` at its present rate; rank 0's timings."""
    out = folder / "probe.json"
    out.unlink(missing_ok=True)
    spec = json.dumps([sizes, repeats, str(out)])
    procs = []
    try:
        for node in range(2):
            env = {"RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
            env |= {"MASTER_ADDR": made.address(0), "MASTER_PORT": str(torchrun.PORT)}
            argv = [sys.executable, __file__, "--probe-worker", spec]
            procs.append(
                cluster.spawn(
                    made, node, argv, cwd=ROOT, env=torchrun.environment(env),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
            )  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
            if proc.returncode:
                raise RuntimeError(f"the all-reduce probe failed:\n{err[-2000:]}")
    finally:
        for node in range(2):
            cluster.kill_node(made, node)
    return json.loads(out.read_text())


def link(made: cluster.Cluster, rates: list[str], repeats: int, folder: Path) -> dict:
    """Alpha and the veths' beta on the unlimited link; at each rate, the bytes per second the
    link carries between the two largest sizes that take at most half a second there."""
    cluster.set_rate(made, None)
    found = probe(made, PROBE_SIZES, repeats, folder)
    fit = collectives.fit_alpha_beta([r["bytes"] for r in found], [r["seconds"] for r in found], 2)
    out = {"alpha_s": fit.alpha_s, "beta_bytes_per_s": fit.beta_bytes_per_s, "unlimited": found}
    out["payload_share"] = payload_share(made)
    for rate in rates:
        made = cluster.set_rate(made, rate)
        burst = burst_bytes(made)
        sizes = [s for s in (2**18, 2**20, 2**22) if s / cluster.rate_bytes(rate) <= 0.5]
        found = probe(made, sizes, repeats, folder)
        (small, t0), (large, t1) = [(r["bytes"], r["seconds"]) for r in found[-2:]]
        sent = collectives.ring_bytes_sent(large, 2) - collectives.ring_bytes_sent(small, 2)
        out[rate] = {"slope_bytes_per_s": sent / (t1 - t0), "burst_bytes": burst, "sizes": found}
    return out


def ddp(made: cluster.Cluster, rate: str | None, steps: int, batch: int, folder: Path,
        profile: Path | None = None) -> dict:  # fmt: skip
    """One DDP run across the nodes at ``rate``: its JSON, and the bytes each node sent."""
    made = cluster.set_rate(made, rate)
    out = folder / "run.json"
    out.unlink(missing_ok=True)
    args = ["--model", "cnn", "--parallel", "ddp", "--batch-size", str(batch)]
    args += ["--steps", str(steps), "--threads", "1", "--json", str(out)]
    args += ["--profile", str(profile)] if profile else []
    before = [cluster.link_bytes(made, node)["sent"] for node in range(2)]
    job = torchrun.job(made, args, logs=folder)
    try:
        codes = torchrun.finish(job, RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"DDP at {rate} timed out; node 0 said:\n{job.log(0)[-2000:]}") from None
    finally:
        job.stop()
        for node in range(2):  # workers a killed agent left behind
            cluster.kill_node(made, node)
    if any(codes.values()):
        raise RuntimeError(f"DDP at {rate} failed {codes}; node 0 said:\n{job.log(0)[-2000:]}")
    result = json.loads(out.read_text())
    result["sent"] = [cluster.link_bytes(made, n)["sent"] - b for n, b in enumerate(before)]
    result["step_ms"] = batch / result["samples_per_s"] * 1e3
    return result


def one_process(steps: int, batch: int) -> float:
    """ms per step of one process on half the batch, 1 thread: a DDP rank's arithmetic."""
    cfg = RunConfig(model="cnn", parallel="none", batch_size=batch // 2, steps=steps, threads=1)
    return batch // 2 / command_line.run(cfg)[0]["samples_per_s"] * 1e3


def bucket_ms(
    compute_ms: float, nbytes: float, burst: int, rate: float, share: float, alpha: float
) -> float:
    """A step through the link's token bucket: when the all-reduce starts, the bucket holds
    ``min(burst, rate x compute)`` bytes (it refilled while the ranks computed), which leave at
    once; the rest of ``nbytes`` leaves at ``share x rate`` (:func:`payload_share`). Far below the
    burst the step is its compute; far above, ``nbytes / (share x rate)`` whatever the compute."""
    ready = min(burst, rate * compute_ms / 1e3) * share  # payload bytes in the bucket
    return compute_ms + (2 * alpha + max(0.0, nbytes - ready) / (share * rate)) * 1e3


def step_parts(folder: Path) -> dict:
    """From a profiled run's two traces, ms per profiled step: each rank's step, arithmetic
    (forward, backward's gradient computations, optimizer) and gloo all-reduce; from the ranks'
    arrivals at the gradient's all-reduce (medians over the steps), how long the first rank
    waited for the second (``waited_ms``) and how long the all-reduce took on the rank that came
    last (``transfer_ms``: the bytes crossing, with nobody left to wait for)."""
    traces = {r: profiling.events(profiling.trace_path(folder, r)) for r in range(2)}
    out: dict = {"step_ms": [], "arithmetic_ms": [], "all_reduce_ms": []}
    for events in traces.values():
        steps = [e["dur"] for e in events if e["name"].startswith("ProfilerStep#")]
        work = profiling.intervals(
            events,
            lambda e: profiling.is_phase(e, ("forward", "optimizer"))
            or profiling.is_backward_arithmetic(e),
        )  # fmt: skip
        reduce = profiling.intervals(events, lambda e: e["name"] == "gloo:all_reduce")
        out["step_ms"].append(statistics.mean(steps) / 1e3)
        out["arithmetic_ms"].append(sum(b - a for a, b in work) / 1e3 / len(steps))
        out["all_reduce_ms"].append(sum(b - a for a, b in reduce) / 1e3 / len(steps))
    met = profiling.arrivals(traces, len(steps))
    out["waited_ms"] = statistics.median(m["start_gap_ms"] for m in met)
    out["transfer_ms"] = statistics.median(m["last_ms"] for m in met)
    return out


def traced(made: cluster.Cluster, rate: str | None, batch: int, runs: int, folder: Path) -> dict:
    """:func:`step_parts` of ``runs`` profiled runs at ``rate``: the median of each figure."""
    found = []
    for i in range(runs):
        where = folder / f"trace-{rate}-{i}"
        ddp(made, rate, TRACED_STEPS, batch, folder, profile=where)
        found.append(step_parts(where))
    return {
        key: [statistics.median(f[key][r] for f in found) for r in range(2)]
        if isinstance(value, list)
        else statistics.median(f[key] for f in found)
        for key, value in found[0].items()
    }


def label(rate: str | None) -> str:
    return rate or "unlimited"


def steps_in_turns(made, rates: list[str], args, folder: Path) -> tuple[dict, dict]:
    """Every configuration once per round, in turns: the step's ms (spreads) and each DDP run's
    JSON by link."""
    runs: dict[str, list[dict]] = {}

    def timed(rate: str | None) -> float:
        result = ddp(made, rate, args.steps, args.batch_size, folder)
        runs.setdefault(label(rate), []).append(result)
        return result["step_ms"]

    measures = {"one process, half batch": partial(one_process, args.steps, args.batch_size)}
    measures |= {label(rate): partial(timed, rate) for rate in [None, *rates]}
    return cu.measure.interleaved(measures, args.repeats, progress="cluster"), runs


def rows(spreads: dict, runs: dict, short: list[int], fit: dict, args) -> list[dict]:
    """One row per link (and the one-process reference): the step, the models and their gaps
    (paired with the round's unlimited run), the bytes sent per step."""
    grad = gradient_bytes()
    unlimited = collectives.ring_cost(grad, 2, fit["alpha_s"], fit["beta_bytes_per_s"]) * 1e3
    compute = [t - unlimited for t in spreads["unlimited"].samples]  # per round
    one = "one process, half batch"
    out = [{"link": one, **spreads[one].as_dict("step_ms")}]
    out[0]["step_ms_samples"] = list(spreads[one].samples)
    for name, results in runs.items():
        extra = args.steps - SHORT_STEPS
        sent = [statistics.median(r["sent"][n] - short[n] for r in results) / extra for n in (0, 1)]
        row = {"link": name, **spreads[name].as_dict("step_ms"), "sent_per_step": sent}
        row["step_ms_samples"] = list(spreads[name].samples)  # by round, unlimited's paired
        row |= {"ring_bytes_sent": collectives.ring_bytes_sent(grad, 2), "gradient_bytes": grad}
        row["compute_ms"] = statistics.median(compute)
        if name != "unlimited":
            rate, burst = cluster.rate_bytes(name), fit[name]["burst_bytes"]
            share, alpha = fit["payload_share"], fit["alpha_s"]
            plain = [c + collectives.ring_cost(grad, 2, alpha, rate) * 1e3 for c in compute]
            bucket = [bucket_ms(c, grad, burst, rate, share, alpha) for c in compute]
            row |= {"rate_bytes_per_s": rate, "burst_bytes": burst}
            for key, model in (("model", plain), ("bucket_model", bucket)):
                row[f"{key}_ms"] = statistics.median(model)
                ratio = cu.measure.ratios(spreads[name], cu.measure.spread(model))
                row |= ratio.as_dict(f"of_{key}")
            # the all-reduce alone, against the trace's: no compute in it, none of its noise
            row["model_comm_ms"] = collectives.ring_cost(grad, 2, alpha, rate) * 1e3
            c = row["compute_ms"]
            row["bucket_model_comm_ms"] = bucket_ms(c, grad, burst, rate, share, alpha) - c
        out.append(row)
    return out


def measure(args, folder: Path) -> tuple[list[dict], dict]:
    """Everything of the module docstring, in its order; the rows and the rest of the results."""
    extra = {"bring_up": bring_up(args.repeats)}
    print(
        "bring-up and tear-down, s: "
        + ", ".join(f"{k} {v['median']:.2f} ({_range(v)})" for k, v in extra["bring_up"].items()),
        flush=True,
    )
    made = cluster.up(cluster.Cluster(NAMES["ddp"], 2, None))
    extra["link"] = fit = link(made, args.rates, args.repeats, folder)
    print(
        f"link: alpha {fit['alpha_s'] * 1e6:.0f} us, unlimited {fit['beta_bytes_per_s'] / 1e6:.0f}"
        " MB/s; " + ", ".join(f"{r} carries {fit[r]['slope_bytes_per_s'] / 1e6:.2f} MB/s "
        f"(payload at the rate {cluster.rate_bytes(r) * fit['payload_share'] / 1e6:.2f}), "
        f"bucket {fit[r]['burst_bytes']:,} B"
        for r in args.rates),
        flush=True,
    )  # fmt: skip
    short = ddp(made, None, SHORT_STEPS, args.batch_size, folder)["sent"]
    spreads, runs = steps_in_turns(made, args.rates, args, folder)
    table = rows(spreads, runs, short, fit, args)
    for row in table:
        if row["link"] in runs:
            row["trace"] = traced(made, row["link"] if row["link"] != "unlimited" else None,
                                  args.batch_size, args.traced_runs, folder)  # fmt: skip
        print(_line(row), flush=True)
    return table, extra


def _range(d: dict, key: str = "median") -> str:
    return f"{d[key + '_min']:.2f}-{d[key + '_max']:.2f}"


def _line(row: dict) -> str:
    """One printed line per row of the results."""
    text = f"{row['link']}: step {row['step_ms']:.1f} ms ({_range(row, 'step_ms')})"
    if "model_ms" in row:
        text += (
            f"; alpha-beta model {row['model_ms']:.1f} ms, gap {row['of_model'] - 1:+.0%} "
            f"({row['of_model_min'] - 1:+.0%} to {row['of_model_max'] - 1:+.0%}); with the token "
            f"bucket {row['bucket_model_ms']:.1f} ms, gap {row['of_bucket_model'] - 1:+.0%}"
        )
    if "sent_per_step" in row:
        text += "; sent per step " + "/".join(f"{b:,.0f}" for b in row["sent_per_step"])
        text += f" B (ring of the gradient: {row['ring_bytes_sent']:,.0f})"
    if "model_comm_ms" in row:
        text += (
            f"; all-reduce by the model {row['model_comm_ms']:.1f} ms, with the bucket "
            f"{row['bucket_model_comm_ms']:.1f}"
        )
    if "trace" in row:
        t = row["trace"]
        text += (
            "; traced: arithmetic "
            + "/".join(f"{ms:.1f}" for ms in t["arithmetic_ms"])
            + f" ms, all-reduce on the last rank {t['transfer_ms']:.1f}, first rank waited "
            f"{t['waited_ms']:.1f}"
        )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rates", nargs="+", default=["1gbit", "100mbit", "20mbit"])
    p.add_argument("--steps", type=int, default=40, help="steps of each timed DDP run")
    p.add_argument("--batch-size", type=int, default=64, help="global: half on each node")
    p.add_argument("--traced-runs", type=int, default=1, help="profiled runs at each rate")
    p.add_argument("--quick", action="store_true", help="2 repeats, 20 steps: a short check")
    p.add_argument("--probe-worker", help=argparse.SUPPRESS)  # on a node: probe_worker's args
    args = p.parse_args()
    if args.probe_worker:
        probe_worker(*json.loads(args.probe_worker))
        return
    if args.quick:
        args.repeats, args.steps, args.traced_runs = 2, 20, 1
    if args.steps <= SHORT_STEPS:
        p.error(f"--steps must be above {SHORT_STEPS} (the bytes per step are a difference)")
    for rate in args.rates:
        try:
            cluster.rate_bytes(rate)
        except ValueError as err:
            p.error(str(err))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally takes it all down
    start, reason = time.perf_counter(), cluster.unavailable()
    table, extra = [], {}
    with cu.measure.Watch() as watch, tempfile.TemporaryDirectory() as folder:
        if reason is None:
            try:
                for name in NAMES.values():  # an earlier run's leftovers (this benchmark's only)
                    cluster.down(name)
                table, extra = measure(args, Path(folder))
            except cluster.ClusterError as err:  # the cluster can't be made (or changed) here
                reason = str(err)
            finally:
                for name in NAMES.values():
                    cluster.down(name)
    if reason is not None:
        skip("cluster", reason, args.repeats, watch)
        return
    print(watch.note())
    extra |= {"steps": args.steps, "batch_size": args.batch_size, "quick": args.quick}
    extra["duration_s"] = time.perf_counter() - start
    print(f"wrote {save('cluster', table, args.repeats, watch, extra)}")


if __name__ == "__main__":
    main()
