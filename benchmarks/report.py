"""Turn benchmarks/results/*.json into docs/benchmarks.md's tables and figures, and the README's
five headline lines.

    python benchmarks/report.py           (make bench runs it after the benchmarks)
    python benchmarks/report.py --print   (the tables and lines on stdout; nothing written)

Writes docs/img/bench_*.png, rewrites the part of docs/benchmarks.md between the markers
``<!-- bench:start -->`` and ``<!-- bench:end -->`` (one table per benchmark, one row per
configuration), and the README's lines between ``<!-- headline:start -->`` and
``<!-- headline:end -->``. Every figure is a ratio measured within one run
(the benchmarks alternate what they compare), so a busy machine lowers them but does not bias them.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from course_utils import collectives, hardware, plots  # noqa: E402
from course_utils.pipeline import schedules  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"  # the tables, in docs/benchmarks.md
HEAD_START, HEAD_END = "<!-- headline:start -->", "<!-- headline:end -->"  # five lines, README


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _range(lo: float, hi: float) -> str:
    return f"{lo:.2f}–{hi:.2f}"


def loop_table(d: dict) -> tuple[str, list[str], list[list]]:
    rows = [
        [r["model"].upper(), r["batch_size"], f"{r['ratio_course_over_bare']:.3f}"]
        + [_range(min(r["ratios"]), max(r["ratios"])) if "ratios" in r else ""]
        for r in d["rows"]
    ]
    title = "The course's training loop against a bare PyTorch loop (throughput ratio)"
    return title, ["model", "batch", "course / bare", "min–max"], rows


def ddp_table(d: dict) -> tuple[str, list[str], list[list]]:
    rows = [
        [
            r["batch_size"],
            f"{r['of_the_limit']:.2f}",
            _range(r["of_the_limit_min"], r["of_the_limit_max"]),
            _x(r["speedup_vs_one"]),
            _range(r["speedup_vs_one_min"], r["speedup_vs_one_max"]),
            _x(r["speedup_vs_one_x_2_threads"]),
            f"{r['limit_vs_twice_one']:.2f}",
        ]
        for r in d["rows"]
    ]
    title = (
        "CNN, DDP on 2 workers × 1 thread as the command line runs it (`bench_ddp.py`, median of "
        f"{d['repeats']} paired rounds), against its limit here: two independent processes, each "
        "training on half the batch at the same time"
    )
    header = ["batch", "of the limit", "min–max", "vs 1 process × 1 thread", "min–max"]
    return title, header + ["vs 1 process × 2 threads", "limit / 2 × 1 process"], rows


def lockstep_table(d: dict) -> tuple[str, list[str], list[list]]:
    ways = ("lockstep", "all_reduce", "ddp")
    rows = [
        [r["batch_size"]] + [f"{r[w]:.2f} ({_range(r[w + '_min'], r[w + '_max'])})" for w in ways]
        for r in d["rows"]
    ]
    title = (
        "What keeping 2 workers in step costs, with no bytes moved (`bench_lockstep.py`, CNN, 2 "
        f"workers × 1 thread, median of {d['repeats']} paired rounds, min–max): each way's "
        "samples/s over two independent half-batch processes"
    )
    header = ["batch", "barrier only", "flat all_reduce by hand", "DistributedDataParallel"]
    return title, header, rows


NAMES = {"cnn": "CNN", "rnn": "RNN", "transformer": "Transformer"}


def pipeline_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per (model, schedule, m): speedup over one process, the share of the bound (its
    range over the repeats), and, where recorded, where the step went."""
    rows, harness = [], False
    for model in ("cnn", "rnn", "transformer"):
        for schedule in ("1f1b", "gpipe", "zbv", "dualpipev"):
            for r in (r for r in d["rows"] if r["model"] == model and r["schedule"] == schedule):
                share = f"{r['fraction_of_bound']:.0%}"
                if "fraction_of_bound_min" in r:
                    share += f" ({r['fraction_of_bound_min']:.0%}–{r['fraction_of_bound_max']:.0%})"
                busy = idle = work = gloo = ""
                if "stage_work_over_one_process" in r:
                    work = f"{r['stage_work_over_one_process']:.2f}"
                    busy = "/".join(f"{t:.0f}" for t in r["stage_busy_ms"])
                    idle = f"{r['measured_bubble']:.0%} ({r['formula_bubble']:.0%})"
                if "gloo_in_flight_ms" in r:
                    gloo = "/".join(f"{t:.0f}" for t in r["gloo_in_flight_ms"])
                speedup = _x(r["speedup"])
                if "timed" not in r:  # measured before the benchmark timed the command line
                    speedup, harness = speedup + " †", True
                rows.append(
                    [NAMES[model], schedule, r["batch_size"], r["microbatches"], speedup, share]
                    + [work, busy, idle, gloo]
                )
    title = (
        "Pipelines on 2 workers over 1 process, as the command line runs them "
        "(`bench_pipeline.py`): share of the bound m·p/(m+p−1) (for zbv and dualpipev, 2 stages "
        "per worker in a V: 1F1B's bound); from the traces, the stages' work over one process's, "
        "each stage's busy ms per step, the idle share (the formula's), and the ms per step some "
        "gloo message was in flight on each rank"
    )
    if harness:
        title += " († an earlier run, timed by the benchmark's own harness, pinned workers)"
    header = ["model", "schedule", "batch", "m", "speedup", "of the bound", "work", "busy ms"]
    return title, header + ["idle (formula)", "gloo ms"], rows


def tp_table(d: dict) -> tuple[str, list[str], list[list]]:
    rows = [
        [
            r["dim"],
            r["batch_size"],
            r["engine"],
            _x(r["speedup"]),
            _range(r["speedup_min"], r["speedup_max"]),
            f"{r['comm_share']:.0%}" if r["comm_share"] is not None else "",
        ]
        for r in d["rows"]
    ]
    title = (
        "Transformer, tensor parallel on 2 ranks × 1 thread vs 1 process × 1 thread, each pinned "
        f"to a core (`bench_tp.py`, median of {d['repeats']})"
    )
    return title, ["width", "batch", "engine", "speedup", "min–max", "all-reduce share"], rows


def sharding_table(d: dict) -> tuple[str, list[str], list[list]]:
    ddp = {r["batch_size"]: r for r in d["rows"] if r["variant"] == "ddp"}
    rows = []
    for r in d["rows"]:
        held = {
            key: r[key]["total"] / ddp[r["batch_size"]][key]["total"]
            for key in ("peak_state_bytes", "state_bytes")
        }
        rows.append(
            [r["batch_size"], r["variant"], _x(r["throughput_vs_ddp"]), _range(r["min"], r["max"])]
            + [f"{held['peak_state_bytes']:.2f}", f"{held['state_bytes']:.2f}"]
        )
    title = (
        "Transformer + AdamW, FSDP against DDP on 2 workers × 1 thread as the command line runs "
        f"them (`bench_sharding.py`, median of {d['repeats']}): throughput, and the state per rank "
        "(parameters, gradients, optimizer state) at the fullest moment of a step and between steps"
    )
    header = ["batch", "variant", "throughput vs DDP", "min–max", "state at the peak / DDP's"]
    return title, header + ["between steps / DDP's"], rows


def collectives_table(d: dict) -> tuple[str, list[str], list[list]]:
    fit = d["fits"]["all_reduce"]
    rows = [
        [
            f"{r['bytes']:,}",
            f"{r['all_reduce_min_s'] * 1e3:.3f}",
            f"{r['ring_min_s'] * 1e3:.3f}",
            f"{r['ratio_ring_over_all_reduce']:.2f}",
            f"{r['model_rel_error_all_reduce']:+.0%}",
        ]
        for r in d["rows"]
    ]
    title = (
        f"All-reduce on {d['nproc']} gloo workers (`bench_collectives.py`): the ring written with "
        f"send/recv against `dist.all_reduce`, and the alpha-beta model fitted to it (alpha "
        f"{fit['alpha_s'] * 1e6:.0f} µs per message, beta {fit['beta_bytes_per_s'] / 1e9:.2f} GB/s)"
    )
    header = ["bytes", "all_reduce ms", "ring ms", "ring / all_reduce", "model error"]
    return title, header, rows


def context_parallel_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per sequence length: cp 2 (zigzag) over one process, the contiguous split, the
    share of the K/V transfer hidden, each rank's ring arithmetic, and the attention's bytes."""
    memory = {m["tokens"]: m for m in d.get("memory", [])}
    rows = []
    for r in d["rows"]:
        t, m = r["traces"], memory.get(r["tokens"])
        bytes_ = ""
        if m:
            fused = max(m["fused_cp2_bytes"]) / m["fused_cp1_bytes"][0]
            written = max(m["written_out_cp2_bytes"]) / m["written_out_cp1_bytes"][0]
            bytes_ = f"{fused:.2f} / {written:.2f}"
        rows.append(
            [
                r["tokens"] if r["tokens"] == 196 else f"{r['tokens']} (harness)",
                r["batch_size"],
                _x(r["zigzag_vs_one"]),
                _range(r["zigzag_vs_one_min"], r["zigzag_vs_one_max"]),
                _x(r["zigzag_vs_one_x_2_threads"]),
                _x(r["contiguous_vs_one"]),
                "/".join(f"{s['hidden']:.0%}" for s in t["cp zigzag"]),
                "/".join(f"{s['posting_ms']:.0f}+{s['waited_ms']:.0f}" for s in t["cp zigzag"]),
                "/".join(f"{s['blocks_ms']:.0f}" for s in t["cp zigzag"]),
                "/".join(f"{s['blocks_ms']:.0f}" for s in t["cp contiguous"]),
                bytes_,
            ]
        )
    title = (
        "Context parallel, causal pixel model on 2 ranks × 1 thread (`bench_context_parallel.py`, "
        f"median of {d['repeats']} paired rounds; 196 tokens: `--model pixels --cp 2` as the "
        "command line runs it; 784: the same model at patch 1 in the command line's worker): "
        "speedup, the share of the ring's K/V transfer hidden behind attention (rank 0/1, from the "
        "traces), ms per step posting and waiting for messages, the ring's arithmetic per rank for "
        "the zigzag and the contiguous split, and one attention's peak bytes per rank at cp 2 over "
        "one process's (PyTorch's flash kernel / both written out)"
    )
    header = ["tokens", "batch", "zigzag vs 1 process", "min–max", "vs 1 process × 2 threads"]
    header += ["contiguous vs 1 process", "K/V hidden", "post+wait ms", "zigzag ring ms"]
    return title, header + ["contiguous ring ms", "peak bytes cp2/cp1"], rows


def experts_table(d: dict) -> tuple[str, list[str], list[list]]:
    rows = [
        [
            r["batch_size"],
            _x(r["ep_vs_one"]),
            _range(r["ep_vs_one_min"], r["ep_vs_one_max"]),
            _x(r["ep_vs_one_x_2_threads"]),
            _x(r["ep_vs_ddp"]),
            "/".join(f"{s['all_to_all_share']:.0%}" for s in r["traces"]["ep"]),
            "/".join(f"{s['step_ms']:.0f}" for s in r["traces"]["ep"]),
            f"{r['traces']['one'][0]['step_ms']:.0f}",
        ]
        for r in d["rows"]
    ]
    title = (
        "Mixture of experts (`--model moe`, 4 experts, top-1), expert parallel on 2 ranks × 1 "
        f"thread as the command line runs it (`bench_experts.py`, median of {d['repeats']} paired "
        "rounds): throughput against one process holding every expert and against DDP on 2 ranks, "
        "and from the traces the all-to-alls' share of a step (forward and backward, rank 0/1)"
    )
    header = ["batch", "vs 1 process × 1 thread", "min–max", "vs 1 process × 2 threads"]
    header += ["vs DDP × 2", "all-to-all share", "ep step ms", "1 process step ms"]
    return title, header, rows


def cluster_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per link of the cluster's DDP runs (and one process on half the batch): the step
    against the alpha-beta model and against the model with the link's token bucket, the
    all-reduce traced and modelled, and the bytes on the link per step."""
    if d.get("skipped"):
        return (
            "A cluster on one machine (`bench_cluster.py`): not measured",
            ["why"],
            [[d["skipped"]]],
        )
    rows = []
    for r in d["rows"]:
        row = [r["link"], f"{r['step_ms']:.1f}", f"{r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}"]
        if "model_ms" in r:
            for key in ("model", "bucket_model"):
                gap = f"{r[f'of_{key}'] - 1:+.0%} ({r[f'of_{key}_min'] - 1:+.0%} to "
                row += [f"{r[f'{key}_ms']:.1f}", gap + f"{r[f'of_{key}_max'] - 1:+.0%})"]
        else:
            row += ["", "", "", ""]
        comm = ""
        if "trace" in r:
            comm = f"{r['trace']['transfer_ms']:.1f}"
            if "model_comm_ms" in r:
                comm += f" / {r['model_comm_ms']:.1f} / {r['bucket_model_comm_ms']:.1f}"
        sent = ""
        if "sent_per_step" in r:
            sent = "/".join(f"{b / r['ring_bytes_sent']:.3f}" for b in r["sent_per_step"])
        rows.append(row + [comm, sent])
    up, link = d["bring_up"], d["link"]
    burst = next((r["burst_bytes"] for r in d["rows"] if "burst_bytes" in r), 0)
    title = (
        f"DDP across a cluster on one machine, 2 nodes × 1 worker (network namespaces), CNN, "
        f"batch {d['batch_size']}, torchrun running the command line on each node "
        f"(`bench_cluster.py`, median of {d['repeats']} rounds, the links in turns): the step "
        "against the alpha-beta model at the link's rate (its compute: the same round's step on "
        f"the unlimited link; alpha {link['alpha_s'] * 1e6:.0f} µs, fitted across the nodes) and "
        f"against the model with the link's token bucket ({burst / 1024:.0f} KiB leave at once); "
        "the gradient's all-reduce in ms, traced on the rank that reached it last / by the model "
        "/ with the bucket; the bytes each node sent per step over the ring's "
        f"{d['rows'][-1].get('ring_bytes_sent', 0):,.0f}. Bring-up of 2 nodes "
        f"{up['api_up_s']['median']:.2f} s through the API, {up['cli_up_s']['median']:.2f} s "
        "by `python -m course_utils.cluster up` (Python's start and its imports included); "
        f"tear-down {up['api_down_s']['median']:.2f} s and {up['cli_down_s']['median']:.2f} s; "
        f"other programs kept {d['machine']['others_busy_cores']:.1f} of the "
        f"{d['machine']['cores']} cores busy meanwhile"
    )
    header = ["link", "step ms", "min–max", "model ms", "gap (min to max)", "bucket model ms"]
    header += ["gap (min to max)", "all-reduce ms: traced / model / bucket", "sent / ring bytes"]
    return title, header, rows


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:,.0f}"


def _skipped(title: str, d: dict) -> tuple[str, list[str], list[list]]:
    return f"{title}: not measured", ["why"], [[d["skipped"]]]


def _busy(d: dict) -> str:
    machine = d["machine"]
    return (
        f"other programs kept {machine['others_busy_cores']:.1f} of the {machine['cores']} "
        "cores busy meanwhile"
    )


def _median_range(r: dict, key: str, scale: float = 1.0, digits: int = 0) -> list[str]:
    """``r[key]`` and its min–max over the repeats, two cells; empty where the run lacks them."""
    if key not in r:
        return ["", ""]
    spread = ""
    if f"{key}_min" in r:
        spread = f"{r[f'{key}_min'] * scale:.{digits}f}–{r[f'{key}_max'] * scale:.{digits}f}"
    return [f"{r[key] * scale:.{digits}f}", spread]


def hierarchy_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per message size: each all-reduce's ms beside the two-link model's, and flat over
    hierarchical (min–max over the repeats) beside the model's ratio and the ceiling."""
    per_node = d.get("per_node", 2)
    head = (
        f"Hierarchical all-reduce against flat across the slow link, 2 nodes × {per_node} workers"
    )
    script = "`bench_hierarchy.py" + (f" --per-node {per_node}`" if per_node != 2 else "`")
    if d.get("skipped"):
        return _skipped(f"{head} ({script})", d)
    by = {(r["op"], r["bytes"]): r for r in d["rows"]}
    measured = {op for op, _ in by}
    ops = [op for op in ("gloo", "ring", "hierarchical", "mesh", "inside") if op in measured]
    rows = []
    for e in d["ratios"]:
        row = [_size(e["bytes"])]
        for op in ops:
            r = by[op, e["bytes"]]
            row.append(f"{_ms(r['seconds'])} ({_ms(r['model_seconds'])})")
        row += [
            f"{_x(e[op])} ({_range(e[op + '_min'], e[op + '_max'])})" for op in ("gloo", "ring")
        ]
        rows.append(row + [_x(e["model"])])
    fit, link = d["fit"], d["link_bytes"]
    largest = _size(max(e["bytes"] for e in d["ratios"]))
    sent = {op: sum(c["sent"]) / len(c["sent"]) / 1e6 for op, c in link.items()}
    title = (
        f"{head} on the one-machine cluster ({script}, link {d['rate']}, median of {d['repeats']} interleaved repeats, each the slowest "
        f"rank's{', a quick run' if d.get('quick') else ''}; {_busy(d)}): each all-reduce's ms "
        "(the two-link model's, both links fitted on the cluster: inside a node alpha "
        f"{fit['intra']['alpha_s'] * 1e6:.0f} µs, beta {fit['intra']['beta_bytes_per_s'] / 1e6:.0f}"
        f" MB/s; across alpha {fit['inter']['alpha_s'] * 1e6:.0f} µs, beta "
        f"{fit['inter']['beta_bytes_per_s'] / 1e6:.1f} MB/s). Flat: gloo's all-reduce and lesson "
        "04's ring; mesh: the all-reduce of a (dp, tp) mesh with tp inside the node; inside: the "
        "hierarchical's two intra-node phases alone. Flat / hierarchical (min–max) against the "
        f"model's; the most it can be for large messages is {_x(d['ratio_bound'])} (the bytes "
        f"each puts on the link). At {largest} each node's link sent {sent['gloo']:.2f} MB for "
        f"gloo's all-reduce and {sent['hierarchical']:.2f} MB for the hierarchical (payload "
        f"{link['gloo']['model'] / 1e6:.2f} and {link['hierarchical']['model'] / 1e6:.2f} MB)"
    )
    header = ["size", *(f"{op} ms (model)" for op in ops), "gloo / hierarchical"]
    return title, header + ["ring / hierarchical", "model"], rows


def compression_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per (model, link, hook): the step, its speedup over plain DDP in the same setting,
    the accuracy after the fixed steps, and the bytes on the link per step."""
    what = "Gradient compression across the slow link (`bench_compression.py`)"
    if d.get("skipped"):
        return _skipped(what, d)
    rows = []
    for r in d["rows"]:
        plain = r["of_plain"]
        speedup = f"{_x(plain['speedup'])} ({_range(plain['speedup_min'], plain['speedup_max'])})"
        accuracy = r.get("test_accuracy")
        sent = ""
        if "sent_per_step" in r:
            mean = sum(r["sent_per_step"]) / len(r["sent_per_step"])
            sent = f"{mean / 1e3:,.1f} ({r['payload_bytes'] / 1e3:,.1f})"
        rows.append(
            [NAMES.get(r["model"], r["model"]), r["link"], r["compress"]]
            + _median_range(r, "step_ms")
            + [speedup, "" if accuracy is None else f"{accuracy:.3f}", sent]
        )
    workers = d.get("workers_per_node", 1)
    title = (
        f"Gradient compression across the slow link: DDP with each `--compress` hook against "
        f"plain DDP, 2 nodes × {workers} worker{'s' * (workers > 1)}, 1 thread each, "
        f"{d['steps']} steps of batch {d['batch_size']} (`bench_compression.py`, median of "
        f"{d['repeats']} interleaved rounds{', a quick run' if d.get('quick') else ''}; "
        f"{_busy(d)}): the step, its speedup over plain DDP on the same link, the test accuracy "
        "after the steps, and the kB each node's link sent per step (the hook's payload)"
    )
    header = ["model", "link", "--compress", "step ms", "min–max", "vs plain DDP (min–max)"]
    return title, header + ["test accuracy", "kB sent per step (payload)"], rows


def precision_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per ``--precision``: the bytes on the link per step against what FSDP2's
    collectives are handed, what a rank holds, the accuracy and the step."""
    what = "Precision on the slow link (`bench_precision.py`)"
    if d.get("skipped"):
        return _skipped(what, d)
    rows = []
    for r in d["rows"]:
        sent = sum(r["sent_per_step"]) / len(r["sent_per_step"])
        rows.append(
            [r["precision"], f"{sent / 1e3:,.0f}", f"{r['model_bytes'] / 1e3:,.0f}"]
            + [f"{r['held'] / 1e3:,.0f}", f"{r['peak'] / 1e3:,.0f}", f"{r['test_accuracy']:.3f}"]
            + _median_range(r, "step_ms")
        )
    units = d.get("bf16_units") or "none"
    title = (
        f"Precision on the slow link: the transformer under `--parallel fsdp --precision P`, 2 "
        f"nodes × 1 worker, link {d['rate']}, {d['steps']} steps of batch {d['batch_size']} "
        f"(`bench_precision.py`, median of {d['repeats']} interleaved rounds"
        f"{', a quick run' if d.get('quick') else ''}; {_busy(d)}): the kB each node's link sent "
        "per step against what FSDP2's collectives were handed (all-gathers in the policy's "
        "dtype, the reduce-scatter in float32), what rank 0 held between steps and at the peak, "
        f"the test accuracy, and the step (bfloat16 units on this CPU: {units}: a step, not a "
        "ratio to read)"
    )
    header = ["--precision", "kB sent per step", "handed kB", "held kB", "peak kB"]
    return title, header + ["test accuracy", "step ms", "min–max"], rows


def placement_table(d: dict) -> tuple[str, list[str], list[list]]:
    """One row per layout: its step at the slow rate and unlimited, the bytes on the link per step
    and the model's; the fields read are those of bench_placement's results (the module's
    docstring names them), every one but ``layout`` and ``step_ms`` optional."""
    what = "Placement across the slow link (`bench_placement.py`)"
    if d.get("skipped"):
        return _skipped(what, d)
    rows = []
    for r in d["rows"]:
        sent = r.get("sent_per_step")
        gap = ""
        if "of_model" in r:
            gap = f"{r['of_model'] - 1:+.0%}"
            if "of_model_min" in r:
                gap += f" ({r['of_model_min'] - 1:+.0%} to {r['of_model_max'] - 1:+.0%})"
        rows.append(
            [r["layout"], f"`{' '.join(r['args'])}`" if r.get("args") else ""]
            + _median_range(r, "step_ms")
            + _median_range(r, "unlimited_step_ms")[:1]
            + [f"{sum(sent) / len(sent) / 1e3:,.0f}" if sent else ""]
            + [f"{r['model_bytes'] / 1e3:,.0f}" if "model_bytes" in r else ""]
            + _median_range(r, "model_step_ms")[:1]
            + [gap]
        )
    settings = [f"global batch {d['batch_size']}"] if "batch_size" in d else []
    settings += [f"{d.get('nodes', 2)} nodes × {d.get('per_node', 2)} workers"]
    settings += [f"link {d['rate']}"] if "rate" in d else []
    settings += [f"{d['steps']} steps"] if "steps" in d else []
    title = (
        f"Placement across the slow link: the transformer, {', '.join(settings)} "
        f"(`bench_placement.py`, median of {d['repeats']} rounds"
        f"{', a quick run' if d.get('quick') else ''}; {_busy(d)}): each layout's step at the "
        "link's rate and with no limit, the kB each node's link sent per step against the "
        "model's (from the layout's collectives), and the model's step: the unlimited step plus "
        "the link's bytes at the fitted rate"
    )
    if "beta_inter_bytes_per_s" in d:
        title += f" ({d['beta_inter_bytes_per_s'] / 1e6:.1f} MB/s)"
    margin = d.get("hsdp_over_fsdp")
    if margin:
        title += (
            f". HSDP over FSDP across all ranks: {_x(margin['measured'])} "
            f"({_range(margin['measured_min'], margin['measured_max'])}), the model's margin "
            f"{_x(margin['model'])}"
        )
    ranking = d.get("ranking", {})
    if "measured" in ranking and "model" in ranking:
        title += (
            f". Fastest first, measured: {', '.join(ranking['measured'])}; by the model: "
            f"{', '.join(ranking['model'])}"
        )
    header = ["layout", "arguments", "step ms", "min–max", "unlimited step ms", "kB sent per step"]
    return title, header + ["model kB", "model step ms", "gap (min to max)"], rows


def widget_table(d: dict) -> tuple[str, list[str], list[list]]:
    rows = [
        [
            r["panel"],
            f"{r['status_s']['median'] * 1e3:.0f}",
            f"{r['first_point_s']['median']:.2f}",
            f"{r['done_s']['median']:.2f}",
        ]
        for r in d["rows"]
    ]
    title = f"Lesson panels, time from a click (`bench_widgets.py`, median of {d['repeats']})"
    return title, ["panel", "status ms", "first point s", "all rounds s"], rows


def headline(results: dict[str, dict]) -> list[str]:
    """At most five lines for the README: the figure of each technique a newcomer asks about."""
    out = []
    if "ddp" in results:
        said = ", ".join(
            f"{_x(r['speedup_vs_one'])} at batch {r['batch_size']} ({r['of_the_limit']:.2f} of "
            "two independent half-batch processes)"
            for r in results["ddp"]["rows"]
        )
        out.append(f"- **Data parallel** (CNN, 2 workers vs 1, one core each): {said}.")
    if "pipeline" in results:
        rows = [r for r in results["pipeline"]["rows"] if r["schedule"] == "1f1b"]
        rows = [r for r in rows if r["model"] in ("cnn", "transformer") and r["microbatches"] == 8]
        said = ", ".join(
            f"{NAMES[r['model']]} {_x(r['speedup'])} ({r['fraction_of_bound']:.0%} of the bound)"
            for r in rows
        )
        out.append(f"- **Pipeline** (2 stages, 1F1B, 8 microbatches, over 1 process): {said}.")
    if "tp" in results:
        rows = [r for r in results["tp"]["rows"] if r["engine"] == "hand"]
        said = ", ".join(f"{_x(r['speedup'])} at width {r['dim']}" for r in rows)
        out.append(f"- **Tensor parallel** (transformer, 2 ranks vs 1, by hand): {said}.")
    if "sharding" in results:
        rows = results["sharding"]["rows"]
        ddp = next(r for r in rows if r["variant"] == "ddp")
        cli = [r for r in rows if "--parallel fsdp" in r["variant"]]
        peak = cli[0]["peak_state_bytes"]["total"] / ddp["peak_state_bytes"]["total"]
        said = ", ".join(f"{_x(r['throughput_vs_ddp'])} at batch {r['batch_size']}" for r in cli)
        out.append(
            f"- **FSDP** (2 workers, `--parallel fsdp`): {peak:.2f} of DDP's state per rank at the "
            f"fullest moment of a step; throughput vs DDP {said}."
        )
    if "collectives" in results:
        errors = sorted(
            abs(r["model_rel_error_all_reduce"]) for r in results["collectives"]["rows"]
        )
        out.append(
            "- **All-reduce**: the alpha-beta model within "
            f"{errors[len(errors) // 2]:.0%} of gloo's (median over message sizes)."
        )
    return out


def _speedup_figure(xs, series: dict, reference, reference_label: str, xlabel: str, title: str):
    """Speedup lines against a log-scaled size, each measured size labelled, and a dashed ideal."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (label, ys), marker in zip(series.items(), ("o-", "s-", "^-")):
        ax.plot(xs, ys, marker, label=label)
    ax.plot(xs, reference, "k--", alpha=0.6, label=reference_label)
    ax.set(xscale="log", xlabel=xlabel, ylabel="speedup", title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def figure_ddp(d: dict) -> str:
    rows = d["rows"]
    batches = [r["batch_size"] for r in rows]
    series = {
        "DDP vs 1 process × 1 thread": [r["speedup_vs_one"] for r in rows],
        "DDP vs 1 process × 2 threads": [r["speedup_vs_one_x_2_threads"] for r in rows],
        "the limit: 2 independent half-batch processes": [
            2 * r["limit_vs_twice_one"] for r in rows
        ],
    }
    ideal = [2.0] * len(batches)
    fig = _speedup_figure(
        batches, series, ideal, "ideal (2 workers)", "global batch", "CNN, DDP on 2 workers"
    )
    return _save(fig, "bench_ddp.png")


def figure_pipeline(d: dict) -> str:
    ms = sorted({r["microbatches"] for r in d["rows"]})
    series = {}
    for schedule in ("1f1b", "gpipe"):
        by_m = {
            r["microbatches"]: r["speedup"]
            for r in d["rows"]
            if r["model"] == "cnn" and r["schedule"] == schedule
        }
        series[schedule] = [by_m.get(m, float("nan")) for m in ms]  # 1F1B needs m >= p
    bound = [schedules.speedup_bound(d["num_stages"], m) for m in ms]
    batch = next(r.get("batch_size") for r in d["rows"] if r["model"] == "cnn")
    title = f"CNN pipeline, {d['num_stages']} stages, batch {batch}, over 1 process"
    fig = _speedup_figure(ms, series, bound, "bound m·p/(m+p−1)", "microbatches m", title)
    return _save(fig, "bench_pipeline.png")


def figure_collectives(d: dict) -> str:
    rows = d["rows"]
    fit = d["fits"]["all_reduce"]
    model = collectives.AlphaBeta(fit["alpha_s"], fit["beta_bytes_per_s"], d["nproc"])
    sizes = [r["bytes"] for r in rows]
    seconds = {
        "dist.all_reduce (gloo)": [r["all_reduce_min_s"] for r in rows],
        "ring, send/recv": [r["ring_min_s"] for r in rows],
    }
    fig = plots.bandwidth(sizes, seconds, model=model, title="All-reduce on 2 workers")
    return _save(fig, "bench_collectives.png")


def _save(fig, name: str) -> str:
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f"docs/img/{name}"


def _markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _fill(path: Path, start: str, end: str, block: list[str]) -> None:
    """Replace what lies between the markers ``start`` and ``end`` in ``path``."""
    text = path.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path.name} has no {start} ... {end} block to fill")
    path.write_text(pattern.sub(lambda _: "\n".join([start, *block, end]), text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--print", action="store_true", dest="only_print",
        help="print the tables and the README's lines instead of writing them (no figures)",
    )  # fmt: skip
    args = p.parse_args()
    sources = {
        "loop_overhead": (loop_table, None),
        "ddp": (ddp_table, figure_ddp),
        "lockstep": (lockstep_table, None),
        "pipeline": (pipeline_table, figure_pipeline),
        "collectives": (collectives_table, figure_collectives),
        "tp": (tp_table, None),
        "sharding": (sharding_table, None),
        "context_parallel": (context_parallel_table, None),
        "experts": (experts_table, None),
        "cluster": (cluster_table, None),
        "hierarchy": (hierarchy_table, None),
        "hierarchy_4": (hierarchy_table, None),
        "placement": (placement_table, None),
        "compression": (compression_table, None),
        "precision": (precision_table, None),
        "widgets": (widget_table, None),
    }
    machine = (
        f"{platform.machine()}, {hardware.num_cores()} cores, Python {platform.python_version()}"
    )
    results, block, images = {}, [], []
    block += [
        f"Measured by `make bench` on the course's development machine ({machine}, CPU only,",
        "gloo). Each figure is a ratio within one run; on a busy machine they drop.",
    ]
    for name, (table, figure) in sources.items():
        d = _load(name)
        if d is None:
            continue
        try:
            title, header, rows = table(d)
        except KeyError as missing:  # written by an earlier version of its benchmark
            print(f"{name}.json lacks {missing}: rerun its benchmark; its table is left out")
            continue
        results[name] = d
        block += ["", f"**{title}**", "", *_markdown_table(header, rows)]
        if figure is not None and not args.only_print:
            images.append(figure(d))
    lines = headline(results)
    if args.only_print:
        print("\n".join([*block, "", *lines]))
        return
    block += ["", " ".join(f"![{Path(p).stem}]({Path(p).relative_to('docs')})" for p in images)]
    _fill(BENCHMARKS, START, END, block)
    _fill(README, HEAD_START, HEAD_END, lines)
    print(
        f"docs/benchmarks.md: {len(results)} benchmarks, {len(images)} figures; README: {len(lines)} lines"
    )


if __name__ == "__main__":
    main()
