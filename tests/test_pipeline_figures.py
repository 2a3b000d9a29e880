"""Pipeline parallelism (lesson 06): its figures (Gantt charts, the bubble, speedups against
the bound) and its panel (course_utils.widgets.PipelinePanel), simulated and run.

Workers are launched with threads=1: this process runs torch ops itself, and a forked worker
that then used several OpenMP threads could hang (GNU OpenMP is not fork-safe)."""

import pytest
from test_pipeline_schedules import check_timeline

import course_utils as cu
from course_utils.pipeline import schedules


def test_gantt_draws_one_bar_per_event():
    events = schedules.simulate("1f1b", 3, 4)
    fig = cu.plots.gantt(events, unit="slot")
    assert len(fig.axes[0].patches) == len(events)
    fig = cu.plots.bubble(
        [1, 2, 4], {"p = 2": [0.5, 0.33, 0.2]}, measured={"p = 2": [0.6, None, 0.3]}
    )
    assert len(fig.axes[0].lines) == 2


def test_gantt_rows_can_be_ranks():
    # Interleaved 1F1B records the rank in `stage`: its rows are ranks holding several stages.
    events = schedules.simulate("1f1b", 2, 4)

    def labels(fig):
        return [t.get_text() for t in fig.axes[0].get_yticklabels()]

    assert labels(cu.plots.gantt(events, unit="slot")) == ["stage 0", "stage 1"]
    assert labels(cu.plots.gantt(events, unit="slot", row_label="rank")) == ["rank 0", "rank 1"]


def test_bubble_draws_repeats_as_error_bars_and_marks_noisy_points():
    spread = cu.measure.spread
    measured = {"p = 2": [spread([0.5, 0.52]), spread([0.3, 0.45]), None]}  # the second is noisy
    fig = cu.plots.bubble([1, 2, 4], {"p = 2": [0.5, 0.33, 0.2]}, measured=measured)
    ax = fig.axes[0]
    assert len(ax.containers) == 1  # one error bar container, for the two measured points
    labels = ax.get_legend_handles_labels()[1]
    assert "p = 2: measured" in labels and any("noisy" in label for label in labels)


def test_pipeline_speedups_shows_the_bound_and_every_bar():
    # The bound m·p/(m+p-1) and the highest bar stay inside the axes (they were clipped once).
    points = [
        {"schedule": "1f1b", "microbatches": m, **cu.measure.spread(v).as_dict("speedup")}
        for m, v in [(2, [1.2, 1.3]), (8, [1.1, 1.9]), (16, [1.0, 1.1])]
    ]
    fig = cu.plots.pipeline_speedups(points, 2, title="CNN, 2 stages")
    ax = fig.axes[0]
    assert ax.get_ylim()[1] >= max(schedules.speedup_bound(2, 16), 1.9)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "bound m·p/(m+p-1)" in labels and any("noisy" in label for label in labels)
    assert not cu.plots.pipeline_speedups([], 2).axes[0].axison  # nothing measured yet


def test_pipeline_speedups_draws_one_line_per_baseline():
    # Lesson 06's transformer: the same pipeline over two baselines, one line each.
    points = [
        {"baseline": b, "microbatches": m, **cu.measure.spread([v, v * 1.1]).as_dict("speedup")}
        for b, v in [("whole batch", 1.5), ("same m microbatches", 1.3)]
        for m in (2, 4)
    ]
    fig = cu.plots.pipeline_speedups(points, 2, by="baseline")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"baseline = whole batch", "baseline = same m microbatches"} <= set(labels)
    assert "bound m·p/(m+p-1)" in labels


def test_pipeline_panel_simulates_on_change_and_runs_on_click():
    calls = []

    def fake_launch(stages, microbatches, schedule, engine):
        calls.append((stages, microbatches, schedule, engine))
        events = schedules.simulate(schedule, stages, microbatches, 1e-3, 2e-3)
        return {"samples_per_s": 100.0 * stages, "events": events}

    panel = cu.widgets.PipelinePanel(
        "cnn", batch_size=16, baseline=100.0, launch=fake_launch, repeats=1
    )
    assert "p=2" in panel.figure.axes[0].get_title() and not calls  # simulated, nothing run
    panel.controls["microbatches"].value = 8
    assert "m=8" in panel.figure.axes[0].get_title() and not calls  # redrawn at once
    panel.controls["schedule"].value = "1f1b"
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    assert calls == [(2, 8, "1f1b", "torch")]
    assert panel.results[-1]["speedup"] == pytest.approx(2.0)
    assert panel.results[-1]["bound"] == pytest.approx(16 / 9)
    assert "measured" in panel.figure.axes[1].get_title()
    panel.run_button.click()  # cached
    assert len(calls) == 1 and panel.status.value == "cached"
    panel.controls["stages"].value = 4
    panel.controls["microbatches"].value = 2
    panel.run_button.click()  # 1F1B needs m >= p with torch: shown in the panel, not run
    assert "1f1b needs" in panel.last_error and len(calls) == 1
    assert "\n" not in panel.last_error and "Traceback" not in panel.last_error  # one line
    assert "1f1b needs" in panel.status.value
    assert not any("Traceback" in str(out) for out in panel.output.outputs)


def test_pipeline_panel_runs_cpu_workers_like_its_baseline(monkeypatch):
    # Its baseline and simulated costs are measured in this process, on the CPU: its workers
    # must be CPU processes too, even where the launcher would pick GPUs.
    seen = []

    def fake_run(fn, nproc, *args, device="auto", **kwargs):
        seen.append(device)
        return [{"samples_per_s": 100.0, "events": schedules.simulate("gpipe", nproc, 2, 1, 2)}]

    monkeypatch.setattr(cu.hardware, "num_gpus", lambda: 8)
    monkeypatch.setattr(cu.launch, "run", fake_run)
    panel = cu.widgets.PipelinePanel("rnn", batch_size=16, baseline=100.0, repeats=1)
    panel.controls["microbatches"].value = 2
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    assert seen == ["cpu"]


def test_pipeline_panel_real_run():
    panel = cu.widgets.PipelinePanel("rnn", batch_size=32, num_steps=2)
    panel.controls["microbatches"].value = 2
    panel.controls["engine"].value = "hand"
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    result = panel.results[-1]
    assert result["samples_per_s"] > 0 and result["speedup"] > 0
    check_timeline(result["events"], 2, 2)
