"""Turn benchmarks/results/*.json into the README's results table and figures.

    python benchmarks/report.py        (make bench runs it after the benchmarks)

Writes docs/img/bench_*.png and rewrites the part of README.md between the markers
``<!-- bench:start -->`` and ``<!-- bench:end -->``. Every figure is a ratio measured within one run
(the benchmarks alternate what they compare), so a busy machine lowers them but does not bias them.
"""

from __future__ import annotations

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
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _x(value: float) -> str:
    return f"{value:.2f}x"


def loop_rows(d: dict) -> list[str]:
    cells = ", ".join(f"{r['model'].upper()} {r['ratio_course_over_bare']:.3f}" for r in d["rows"])
    return [f"| course training loop vs a bare PyTorch loop, throughput ratio | {cells} |"]


def ddp_rows(d: dict) -> list[str]:
    rows = d["results"]
    best = max(rows, key=lambda r: r["speedup_vs_1x1"])

    def spread(r: dict) -> str:  # the paired ratios' range over the repeats, when recorded
        if "speedup_vs_1x1_min" not in r:
            return ""
        return f" ({r['speedup_vs_1x1_min']:.2f}–{r['speedup_vs_1x1_max']:.2f})"

    per_batch = ", ".join(
        f"batch {r['batch_size']}: {_x(r['speedup_vs_1x1'])}{spread(r)} / {_x(r['speedup_vs_1x2'])}"
        for r in rows
    )
    return [
        "| CNN, DDP 2 workers × 1 thread vs 1 worker × 1 thread (min–max of the paired repeats) / "
        f"vs 1 worker × 2 threads (median of {rows[0].get('repeats', '?')}, `bench_ddp.py`) | "
        f"{per_batch} (best {_x(best['speedup_vs_1x1'])} at batch {best['batch_size']}) |"
    ]


NAMES = {"cnn": "CNN", "rnn": "RNN", "transformer": "Transformer"}


def _pipeline_cell(r: dict) -> str:
    """One m of a pipeline row: speedup, share of the bound (its range over the repeats), and,
    where recorded, where the step went: the stages' work over one process's, the idle share."""
    cell = f"m={r['microbatches']}: {_x(r['speedup'])} ({r['fraction_of_bound']:.0%}"
    if "fraction_of_bound_min" in r:
        cell += f", {r['fraction_of_bound_min']:.0%}–{r['fraction_of_bound_max']:.0%}"
    if "fraction_of_bound_microbatched" in r:
        cell += f"; {r['fraction_of_bound_microbatched']:.0%} over the same microbatches"
    if "stage_work_over_one_process" in r:
        cell += (
            f"; stages' work {r['stage_work_over_one_process']:.2f}x one process's, busy "
            f"{'/'.join(f'{t:.0f}' for t in r['stage_busy_ms'])} ms, idle "
            f"{r['measured_bubble']:.0%} (formula {r['formula_bubble']:.0%})"
        )
    if "network_thread_ms_per_step" in r:
        ms = "/".join(f"{t:.0f}" for t in r["network_thread_ms_per_step"])  # 1 ms resolution
        cell += f"; gloo's network thread {ms} ms of CPU per step"
    return cell + ")"


def pipeline_rows(d: dict) -> list[str]:
    out = []
    for model in ("cnn", "rnn", "transformer"):
        for schedule in ("1f1b", "gpipe", "zbv", "dualpipev"):
            rows = [r for r in d["rows"] if r["model"] == model and r["schedule"] == schedule]
            if not rows:
                continue
            v = schedule in (
                "zbv",
                "dualpipev",
            )  # 2 stages per worker: 1F1B's bound as the yardstick
            cells = ", ".join(_pipeline_cell(r) for r in rows)
            batch = rows[0].get("batch_size", d["batch_size"])
            layout = "2 workers × 2 stages in a V" if v else "2 stages"
            bound = "1F1B's bound" if v else "the bound m·p/(m+p−1)"
            out.append(
                f"| {NAMES[model]} pipeline, {layout}, {schedule}, batch {batch}, speedup over "
                f"1 process (% of {bound}) (`bench_pipeline.py`) | {cells} |"
            )
    return out


def tp_rows(d: dict) -> list[str]:
    cells = "; ".join(
        f"width {r['dim']}, batch {r['batch_size']}, {r['engine']}: {_x(r['speedup'])} "
        f"({r['speedup_min']:.2f}–{r['speedup_max']:.2f})"
        + (f", all-reduce {r['comm_share']:.0%} of a step" if r["comm_share"] is not None else "")
        for r in d["rows"]
    )
    return [
        "| transformer, tensor parallel on 2 ranks × 1 thread vs 1 process × 1 thread, each "
        f"pinned to a core (median of {d['repeats']}, `bench_tp.py`) | {cells} |"
    ]


def sharding_rows(d: dict) -> list[str]:
    sent = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in d["bytes_sent_per_step"].items())
    speed = "; ".join(
        f"batch {r['batch_size']}, {r['variant']}: {_x(r['throughput_vs_ddp'])} "
        f"({r['min']:.2f}–{r['max']:.2f})"
        for r in d["rows"]
    )
    return [
        f"| transformer + AdamW, fsdp vs ddp on 2 workers × 1 thread (median of {d['repeats']}, "
        f"`bench_sharding.py`) | state per rank {d['state_share']:.2f} of DDP's; throughput "
        f"vs DDP's: {speed}; sent per rank and step: {sent} |"
    ]


def collectives_rows(d: dict) -> list[str]:
    rows = d["rows"]
    ratios = [r["ratio_ring_over_all_reduce"] for r in rows]
    errors = [abs(r["model_rel_error_all_reduce"]) for r in rows]
    fit = d["fits"]["all_reduce"]
    return [
        "| ring all-reduce written with send/recv vs `dist.all_reduce` (gloo, 2 workers), time "
        f"ratio over 1 KB–64 MB (`bench_collectives.py`) | {min(ratios):.2f}–{max(ratios):.2f} |",
        f"| alpha-beta model of `dist.all_reduce` | alpha {fit['alpha_s'] * 1e6:.0f} µs per "
        f"message, beta {fit['beta_bytes_per_s'] / 1e9:.2f} GB/s; error against measurement "
        f"{min(errors):.0%}–{max(errors):.0%} (median {sorted(errors)[len(errors) // 2]:.0%}) |",
    ]


def widget_rows(d: dict) -> list[str]:
    cells = "; ".join(
        f"{r['panel']}: status {r['status_s']['median'] * 1e3:.0f} ms, first point "
        f"{r['first_point_s']['median']:.2f} s (all rounds {r['done_s']['median']:.2f} s)"
        for r in d["rows"]
    )
    return [
        f"| lesson panels, time from a click (median of {d['repeats']}, `bench_widgets.py`) | {cells} |"
    ]


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
    rows = d["results"]
    batches = [r["batch_size"] for r in rows]
    series = {
        "vs 1 worker × 1 thread": [r["speedup_vs_1x1"] for r in rows],
        "vs 1 worker × 2 threads": [r["speedup_vs_1x2"] for r in rows],
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


def main() -> None:
    rows, images = [], []
    sources = {
        "loop_overhead": (loop_rows, None),
        "ddp": (ddp_rows, figure_ddp),
        "pipeline": (pipeline_rows, figure_pipeline),
        "collectives": (collectives_rows, figure_collectives),
        "tp": (tp_rows, None),
        "sharding": (sharding_rows, None),
        "widgets": (widget_rows, None),
    }
    for name, (table, figure) in sources.items():
        d = _load(name)
        if d is None:
            continue
        rows += table(d)
        if figure is not None:
            images.append(figure(d))
    machine = (
        f"{platform.machine()}, {hardware.num_cores()} cores, Python {platform.python_version()}"
    )
    block = [
        START,
        f"Measured by `make bench` on the course's development machine ({machine}, CPU only,",
        "gloo). Each figure is a ratio within one run; on a busy machine they drop.",
        "",
        "| benchmark | result |",
        "| --- | --- |",
        *rows,
        "",
        " ".join(f"![{Path(p).stem}]({p})" for p in images),
        END,
    ]
    text = README.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {START} ... {END} block to fill")
    README.write_text(pattern.sub(lambda _: "\n".join(block), text))
    print(f"README.md: {len(rows)} rows, {len(images)} figures")


if __name__ == "__main__":
    main()
