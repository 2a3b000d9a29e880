"""Lesson 05's figures and panels (the speedup panel, the sync-cost measurement, the timelines
and the large-batch curves) and its hand-written ``average_gradients`` against the package's.

A lesson's ``test_<subject>_figures.py`` tests what the lesson draws, and the code it writes by hand
against the package's; the package itself is tested in ``test_<subject>.py`` (here ``test_ddp.py``).
"""

import matplotlib.pyplot as plt
import numpy as np
import pytest

import course_utils as cu
from course_utils import launch, train


def counting_train(calls: list):
    """The real training entry point, with a record of every configuration it was given."""

    def run(cfg):
        calls.append((cfg.model, cfg.nproc, cfg.batch_size, cfg.threads, cfg.parallel))
        return train.run(cfg, progress=False)

    return run


def plotted_points(figure) -> set[tuple[float, float]]:
    """(x, y) of every marker drawn on the speedup axes (the ideal line has no markers)."""
    ax = figure.axes[0]
    return {
        (float(x), round(float(y), 6))
        for line in ax.lines
        if line.get_marker() not in (None, "None", "")
        for x, y in zip(line.get_xdata(), line.get_ydata())
    }


def test_speedup_panel_runs_real_ddp_adds_a_plotted_point_and_caches_it():
    calls: list = []
    panel = cu.widgets.SpeedupPanel(
        batch_sizes=(32, 48), num_steps=3, train=counting_train(calls), repeats=2
    )
    drawn = []  # what the panel showed, and when, while it measured
    panel.redraw = lambda redraw=panel.redraw: (drawn.append(list(panel.results)), redraw())[1]
    panel.controls["model"].value = "rnn"
    panel.controls["nproc"].value = 2
    panel.controls["batch_size"].value = 32
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    assert panel.status.value == "measured"
    assert len(panel.results) == 1
    point = panel.results[0]
    assert (point["model"], point["nproc"], point["batch_size"]) == ("rnn", 2, 32)
    # two rounds, each a baseline run (1 worker) then the 2-worker run: real DDP, 1 thread each
    expected = [("rnn", 1, 32, 1, "ddp"), ("rnn", 2, 32, 1, "ddp")] * 2
    assert calls == expected
    assert point["samples_per_s"] > 0 and point["baseline_samples_per_s"] > 0
    assert point["speedup_min"] <= point["speedup"] <= point["speedup_max"]
    assert point["efficiency"] == pytest.approx(point["speedup"] / 2)
    assert (2.0, round(point["speedup"], 6)) in plotted_points(panel.figure)
    # the first round's point was drawn before the second round ran, then replaced
    assert (
        [len(d) for d in drawn] == [1, 1]
        and drawn[0][0].get("partial")
        and not point.get("partial")
    )

    panel.run_button.click()  # the same setting again: from the cache, no new run
    assert panel.status.value == "cached" and len(panel.results) == 1 and len(calls) == 4

    panel.controls["nproc"].value = 1  # 1 worker: one run per round, its own baseline
    panel.run_button.click()
    assert len(panel.results) == 2 and len(calls) == 6
    assert panel.results[1]["speedup"] == pytest.approx(1.0)
    assert (1.0, 1.0) in plotted_points(panel.figure)
    plt.close("all")


def test_speedup_panel_shows_a_bad_setting_as_an_error_without_starting_workers():
    calls: list = []
    panel = cu.widgets.SpeedupPanel(batch_sizes=(32, 48), num_steps=3, train=counting_train(calls))
    panel.controls["nproc"].value = 3
    panel.controls["batch_size"].value = 32  # 32 does not divide among 3 workers
    panel.run_button.click()
    assert "can't run" in panel.status.value and "does not divide" in panel.status.value
    assert "does not divide" in panel.last_error and "\n" not in panel.last_error  # one line
    assert panel.results == [] and calls == []
    assert not panel.run_button.disabled  # the panel is usable again
    plt.close("all")


@pytest.mark.parametrize(
    "gpus, device", [(0, "cpu"), (1, "cpu"), (3, "cpu"), (4, "cuda")], ids=lambda v: str(v)
)
def test_speedup_panel_puts_every_point_on_one_kind_of_worker(monkeypatch, gpus, device):
    # On a box with fewer GPUs than the largest world size, the launcher's own default would put
    # 1 worker on a GPU and 2 on the CPU: the panel must choose once, for all its points.
    seen = []

    def fake_run(cfg, progress=True, timeout=0):
        seen.append((cfg.nproc, cfg.device))
        return {"samples_per_s": 100.0 * cfg.nproc}

    monkeypatch.setattr(cu.hardware, "num_gpus", lambda: gpus)
    monkeypatch.setattr(train, "run", fake_run)
    panel = cu.widgets.SpeedupPanel(
        world_sizes=(1, 2, 4), batch_sizes=(32,), num_steps=2, repeats=1
    )
    for nproc in (2, 4):
        panel.controls["nproc"].value = nproc
        panel.run_button.click()
        assert panel.last_error is None, panel.last_error
    assert seen == [(1, device), (2, device), (1, device), (4, device)]  # a baseline each round
    assert ("GPU" in panel.title) == (device == "cuda")
    plt.close("all")


def test_time_sync_measures_both_kinds_of_step_and_agrees_across_ranks():
    per_rank = launch.run(cu.ddp.time_sync, 2, "rnn", 32, 3, threads=1, timeout=120)
    assert per_rank[0] == per_rank[1]  # the slowest rank's figures, on every rank
    assert set(per_rank[0]) == {"synced_s", "no_sync_s", "data_s"}
    assert all(v > 0 for v in per_rank[0].values())


def test_speedup_plot_has_the_ideal_lines_and_shades_oversubscribed_workers():
    points = [
        {"label": "CNN", "nproc": 1, "speedup": 1.0},
        {"label": "CNN", "nproc": 2, "speedup": 1.6},
        {"label": "CNN", "nproc": 4, "speedup": 1.2},
    ]
    fig = cu.plots.speedup(points, cores=2)
    speed_ax, eff_ax = fig.axes[:2]
    ideal = speed_ax.lines[0]
    np.testing.assert_allclose(ideal.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(ideal.get_ydata(), [1, 2, 3, 4])
    np.testing.assert_allclose(eff_ax.lines[0].get_ydata(), [100] * 4)
    np.testing.assert_allclose(eff_ax.lines[1].get_ydata(), [100, 80, 30])  # speedup / N, in %
    assert any(p.get_label() == "oversubscribed" for p in speed_ax.patches)
    plt.close(fig)


def test_sample_orders_and_ddp_timeline_draw_what_they_are_given():
    orders = np.arange(12).reshape(3, 4)
    fig = cu.plots.sample_orders({"a": orders, "b": orders[::-1]})
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), orders)
    plt.close(fig)
    events = [
        {"kind": "grad", "name": "fc.weight", "start": 0.001, "end": 0.001},
        {"kind": "allreduce", "name": "bucket of fc", "start": 0.001, "end": 0.004},
        {"kind": "allreduce", "name": "bucket of conv", "start": 0.005, "end": 0.006},
    ]
    fig = cu.plots.ddp_timeline(events, backward_s=0.005)
    bars = [p for p in fig.axes[0].patches if p.get_height() == pytest.approx(0.6)]
    assert [round(b.get_x(), 6) for b in bars] == [1.0, 5.0]  # in ms, one bar per bucket
    plt.close(fig)


def test_ddp_timeline_labels_never_overlap_and_stay_inside_the_axes():
    # Gradients ready close together (a weight and its bias, layers in quick succession) and a
    # bucket holding many tensors: the case whose labels used to pile up on each other.
    names = ["fc.bias", "fc.weight", "conv2.weight", "conv2.bias", "conv1.weight", "conv1.bias"]
    events = [
        {"kind": "grad", "name": n, "start": 0.001 + i * 1e-5, "end": 0}
        for i, n in enumerate(names)
    ]
    events += [
        {"kind": "grad", "name": f"layer.{i}.weight", "start": 0.002 + i * 4e-4, "end": 0}
        for i in range(8)
    ]
    events.append(
        {"kind": "allreduce", "name": ", ".join(names) + " (326 KB)", "start": 0.004, "end": 0.0055}
    )
    fig = cu.plots.ddp_timeline(events, backward_s=0.005)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two labels of the timeline overlap"
    axes_box = ax.get_window_extent(renderer)
    assert all(axes_box.x0 <= b.x0 and b.x1 <= axes_box.x1 + 1 for b in boxes)
    every_name = " ".join(t.get_text() for t in ax.texts)
    assert all(f"layer.{i}.weight" in every_name for i in range(8))  # each gradient labelled
    plt.close(fig)


def test_spread_bars_draw_medians_bars_noisy_hatches_and_missing_values():
    quiet, noisy = cu.measure.spread([1.0, 1.1, 1.05]), cu.measure.spread([1.0, 2.0, 1.5])
    fig = cu.plots.spread_bars(
        ["a", "b"], {"one": [quiet, None], "two": [noisy, 3.0]}, "y", missing="never", fmt="{:.2f}"
    )
    ax = fig.axes[0]
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert heights == [1.05, 0.0, 1.5, 3.0]  # medians; no bar for the missing value
    assert [p.get_hatch() for p in ax.patches][2] == "//"  # the noisy one
    texts = [t.get_text() for t in ax.texts]
    assert "never" in texts and {"1.05", "1.50", "3.00"} <= set(texts)
    assert len(ax.collections) == 2  # one error bar per repeated value
    plt.close(fig)


def test_large_batch_plot_draws_a_line_per_recipe_and_marks_divergence():
    runs = [
        {"recipe": "fixed", "batch_size": b, "lr": 0.01, "accuracy": a, "steps": 4096 // b}
        for b, a in ((32, 0.95), (128, 0.9), (512, 0.7))
    ]
    runs += [
        {"recipe": "scaled", "batch_size": 128, "lr": 0.04, "accuracy": 0.94, "steps": 32},
        {"recipe": "scaled", "batch_size": 512, "lr": 0.16, "accuracy": 0.1, "steps": 8,
         "diverged": True},
    ]  # fmt: skip
    fig = cu.plots.large_batch(runs, reference=0.95)
    acc_ax, lr_ax = fig.axes[:2]
    lines = {line.get_label(): line for line in acc_ax.lines}
    np.testing.assert_allclose(lines["fixed"].get_ydata(), [95, 90, 70])
    np.testing.assert_allclose(lines["scaled"].get_xdata(), [128, 512])
    assert "diverged" in lines and "the base batch's accuracy" in lines
    crosses = [line for line in lr_ax.lines if line.get_marker() == "x"]
    assert [float(c.get_ydata()[0]) for c in crosses] == [0.16]
    assert [t.get_text() for t in acc_ax.get_xticklabels()][0] == "32\n128 steps"
    plt.close(fig)


def test_the_lessons_average_gradients_is_the_packages():
    # Rule 5 of issue 22: the lesson writes average_gradients by hand with the package's name and
    # signature, and both give the same gradients (bit for bit: the same sums in the same order).
    import inspect

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from conftest import ROOT, notebook_functions

    namespace = {"cu": cu, "dist": dist, "torch": torch, "F": F}
    lesson = notebook_functions(
        ROOT / "notebooks" / "05_data_parallel.ipynb", ["average_gradients"], namespace
    )["average_gradients"]

    def parameters(fn):  # names, kinds and defaults (the lesson writes no type hints)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert parameters(lesson) == parameters(cu.ddp.average_gradients)

    def both():
        rank = dist.get_rank()
        X, y = cu.data.mnist("train", limit=16)
        grads = []
        for average in (lesson, cu.ddp.average_gradients):
            model = cu.models.build("cnn", seed=0)
            model.unused = torch.nn.Linear(2, 2)  # a parameter without a gradient: skipped
            F.cross_entropy(model(X[rank::2]), y[rank::2]).backward()  # each rank its own data
            average(model)
            grads.append([p.grad for p in model.parameters() if p.grad is not None])
        return grads

    per_rank = launch.run(both, 2, threads=1, device="cpu")
    for mine, package in per_rank:
        assert len(mine) == len(package) == len(list(cu.models.build("cnn").parameters()))
        for a, b in zip(mine, package):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(per_rank[0][0], per_rank[1][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # every rank holds the same average


def test_watch_backward_sees_one_bucket_after_backward_and_small_buckets_overlapping():
    default, small = (
        launch.run(cu.ddp.watch_backward, 2, cap, 32, 2, threads=1, device="cpu")[0]
        for cap in (None, 0.1)
    )
    for watched, buckets in ((default, 1), (small, 2)):
        kinds = [e["kind"] for e in watched["events"]]
        assert kinds.count("grad") == 6  # the CNN's six parameter tensors
        assert (kinds.count("allreduce") == 1) == (buckets == 1) and kinds.count("allreduce") >= 1
        assert len(watched["first_start_ms"]) == 2 and watched["backward_s"] > 0
    # one bucket: its all-reduce can only start once the last gradient is ready
    assert all(ms > 0 for ms in default["first_start_ms"])
    assert small["events"][-1]["end"] <= small["backward_s"] + 1e-3


def test_lesson_figures_same_training_sync_costs_timelines_and_race():
    fig = cu.plots.same_training([2.3, 2.0, 1.5], [2.3, 2.0, 1.5])
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), [2.3, 2.0, 1.5])
    plt.close(fig)
    s = cu.measure.spread
    comm = {"cnn": {"measured": s([3.0, 4.0]), "predicted": s([1.0, 1.2])}}
    fig = cu.plots.sync_costs(comm, 64)
    assert [round(p.get_height(), 6) for p in fig.axes[0].patches] == [3.5, 1.1]
    plt.close(fig)
    event = {"kind": "allreduce", "name": "b", "start": 0.001, "end": 0.002}
    fig = cu.plots.ddp_timelines({None: {"events": [event], "backward_s": 0.002}})
    assert "default (25 MB): 1 bucket" in fig.axes[0].get_title()
    plt.close(fig)
    raced = {
        "1 worker, batch 32": {"samples_per_s": s([100.0]), "seconds": s([4.0])},
        "2 workers, batch 32": {"samples_per_s": s([180.0]), "seconds": None},
    }
    fig = cu.plots.race(raced, [32], [1, 2], 0.9)
    assert [round(p.get_height(), 6) for p in fig.axes[1].patches] == [4.0, 0.0]
    assert "not reached" in [t.get_text() for t in fig.axes[1].texts]
    plt.close(fig)


def test_the_speedup_panel_keeps_every_rounds_speedup_for_the_readout(monkeypatch):
    rates = iter([100.0, 150.0, 100.0, 190.0])  # round 1: 1 worker, 2 workers; round 2: again
    monkeypatch.setattr(train, "run", lambda cfg, **_: {"samples_per_s": next(rates)})
    panel = cu.widgets.SpeedupPanel(world_sizes=(1, 2), batch_sizes=(32,), num_steps=2, repeats=2)
    panel.controls["nproc"].value = 2
    panel.run_button.click()
    point = panel.results[0]
    assert point["speedup_rounds"] == pytest.approx((1.5, 1.9))
    reading = cu.readout.ratio("widget speedup", point["speedup_rounds"])
    assert reading.verdict == "above" and reading.numbers["median"] == pytest.approx(1.7)
    plt.close("all")
