"""How fast the lesson panels answer a click: the status line, then the first measured point.

    python benchmarks/bench_widgets.py [--repeats 5]

A panel's Run is a click in the browser and a callback in the kernel. The learner should see at
once that something happens (the status line: "running..."), and a first point soon after (the
panels draw the first of their rounds before measuring the others). For each panel, in a kernel
that has already launched workers once (as a lesson has, by the time it shows a panel), this
times, from the click: the first change of the status line, and the first redraw that holds a
point. A fresh panel each repeat (its cache would answer at once); the medians, with min-max.
Targets: status within 0.3 s; the speedup panel's first point within 1.5 s for a small run
(CNN, 2 workers, global batch 48, 10 steps) on an idle 2-core machine.
Writes benchmarks/results/widgets.json.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")

from _results import save  # noqa: E402

import course_utils as cu  # noqa: E402


def time_click(panel) -> dict:
    """Seconds from the click to the first status change and to the first point drawn."""
    marks: dict[str, float] = {}
    start = time.perf_counter()
    panel.status.observe(
        lambda _change: marks.setdefault("status_s", time.perf_counter() - start), names="value"
    )
    redraw = panel.redraw

    def timed_redraw():
        redraw()
        if panel.results:
            marks.setdefault("first_point_s", time.perf_counter() - start)

    panel.redraw = timed_redraw
    start = time.perf_counter()
    panel.run_button.click()
    marks["done_s"] = time.perf_counter() - start
    assert panel.last_error is None, panel.last_error
    return marks


def panels() -> dict:
    """The panels as the lessons build them, with small settings (what a first click runs)."""
    X, y = cu.data.mnist("train")
    return {
        "speedup (05): cnn, 2 workers, batch 48, 10 steps": lambda: _speedup(),
        "pipeline (06): cnn, 2 stages, m=4, 1F1B, 4 steps": lambda: _pipeline(),
        "throughput (01): cnn, batch 64, 2 threads, 10 steps": lambda: _throughput(X, y),
    }


def _speedup():
    panel = cu.widgets.SpeedupPanel(batch_sizes=(48, 96), num_steps=10, device="cpu")
    panel.controls["model"].value, panel.controls["nproc"].value = "cnn", 2
    panel.controls["batch_size"].value = 48
    return panel


def _pipeline():
    panel = cu.widgets.PipelinePanel("cnn", batch_size=64, num_steps=4)
    panel.controls["microbatches"].value, panel.controls["schedule"].value = 4, "1f1b"
    return panel


def _throughput(X, y):
    panel = cu.widgets.ThroughputPanel(cu.models.build("cnn", seed=0), X, y, batch_sizes=(64,))
    panel.controls["threads"].value = min(2, cu.hardware.num_cores())
    return panel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    warm = cu.train.RunConfig(parallel="ddp", nproc=2, steps=2, batch_size=32, device="cpu")
    cu.train.run(warm, progress=False)  # a lesson has launched workers before its panel
    rows = []
    with cu.measure.Watch() as watch:
        for name, make in panels().items():
            marks = [time_click(make()) for _ in range(args.repeats)]
            row = {"panel": name}
            for key in ("status_s", "first_point_s", "done_s"):
                spread = cu.measure.spread(m[key] for m in marks)
                row[key] = {"median": spread.median, "min": spread.low, "max": spread.high}
            rows.append(row)
            print(
                f"{name}: status {row['status_s']['median'] * 1e3:.0f} ms, first point "
                f"{row['first_point_s']['median']:.2f} s, done {row['done_s']['median']:.2f} s"
            )
    print(watch.note())
    save("widgets", rows, args.repeats, watch)


if __name__ == "__main__":
    main()
