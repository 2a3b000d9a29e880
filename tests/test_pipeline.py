"""Pipeline parallelism (lesson 06): schedules on paper, stages of the models, and real pipelines
(hand-written and torch.distributed.pipelining) against one process.

Workers are launched with threads=1: this process runs torch ops itself, and a forked worker
that then used several OpenMP threads could hang (GNU OpenMP is not fork-safe)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils.config import RunConfig
from course_utils.pipeline import schedules, stages, worker

SETTINGS = [(s, p, m) for s in schedules.SCHEDULES for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)]


# --- schedules on paper -----------------------------------------------------------------------


def check_timeline(events, num_stages, num_microbatches):
    """Every (stage, microbatch) has one F and one B, in dependency order, without overlaps."""
    ev = {(e.kind, e.stage, e.microbatch): e for e in events}
    assert len(ev) == len(events) == 2 * num_stages * num_microbatches  # each exactly once
    for s in range(num_stages):
        for i in range(num_microbatches):
            assert ev["F", s, i].end <= ev["B", s, i].start  # forward before its backward
            if s > 0:  # activations flow down, gradients flow up
                assert ev["F", s - 1, i].end <= ev["F", s, i].start
            if s < num_stages - 1:
                assert ev["B", s + 1, i].end <= ev["B", s, i].start
        mine = sorted((e for e in events if e.stage == s), key=lambda e: e.start)
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))  # one op at a time


@pytest.mark.parametrize("schedule,p,m", SETTINGS)
def test_schedule_is_valid_and_its_bubble_is_the_formula(schedule, p, m):
    for forward, backward in ((1, 1), (1, 2)):
        events = schedules.simulate(schedule, p, m, forward, backward)
        check_timeline(events, p, m)
        assert schedules.makespan(events) == pytest.approx((m + p - 1) * (forward + backward))
        assert schedules.bubble_fraction(events, p) == pytest.approx(schedules.bubble_formula(p, m))
    grid = schedules.table(schedule, p, m)
    assert len(grid) == p and all(len(row) == 2 * (m + p - 1) for row in grid)
    for s, row in enumerate(grid):
        assert sorted(c for c in row if c) == sorted(f"{k}{i}" for k in "FB" for i in range(m))
        assert row.index("F0") == s  # microbatch 0 reaches stage s after s slots
    expected = [m] * p if schedule == "gpipe" else [min(p - s, m) for s in range(p)]
    assert schedules.peak_in_flight(schedule, p, m) == expected


def test_unequal_stages_and_communication():
    # p = 2, m = 1: F on stage 0, send, F on 1, B on 1, send, B on 0, all in a row.
    events = schedules.simulate("gpipe", 2, 1, forward=[1, 2], backward=[3, 4], comm=0.5)
    assert schedules.makespan(events) == pytest.approx(1 + 0.5 + 2 + 4 + 0.5 + 3)
    check_timeline(events, 2, 1)
    # With m microbatches the slowest stage sets the pace: makespan >= m * its time.
    events = schedules.simulate("1f1b", 2, 8, forward=[1, 3], backward=[1, 3])
    assert schedules.makespan(events) >= 8 * 6
    check_timeline(events, 2, 8)


# --- stages of the models ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "rnn", "transformer"])
def test_units_compose_to_the_model(name):
    model = cu.models.build(name, seed=0)
    X = cu.models.prepare_input(name, cu.data.mnist("train", limit=8)[0])
    pieces = stages.units(name, model)
    assert len(pieces) == stages.max_stages(name) == len(stages.UNIT_NAMES[name])
    for sizes in ([len(pieces)], stages.even_sizes(name, len(pieces))):
        h = X
        for stage in stages.split(name, model, sizes):
            h = stage(h)
        torch.testing.assert_close(h, model(X), rtol=1e-5, atol=1e-5)
    two = stages.split(name, model, stages.even_sizes(name, 2))
    state = cu.checkpoint.assemble([p for s in two for p in stages.full_pieces(s)])
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v)
    shapes = stages.boundary_shapes(two, X)
    assert shapes[-1] == (10,)


@pytest.mark.parametrize("cut", [16, 32, 48])
def test_conv2_slices_do_the_layers_arithmetic_forward_and_backward(cut):
    # Each slice pools its own channels and the boundary carries conv2's input plus the pooled
    # channels so far: same logits and same gradients (every parameter) as the whole CNN.
    X, y = cu.data.mnist("train", limit=16)
    reference = cu.models.build("cnn", seed=0)
    torch.nn.functional.cross_entropy(reference(X), y).backward()
    model = cu.models.build("cnn", seed=0)
    pieces = [
        stages.CNNBlock1(model),
        stages.Conv2Slice(model, 0, cut),
        stages.Conv2Slice(model, cut, 64),
        stages.Head(model),
    ]
    h0 = pieces[1](pieces[0](X))
    assert h0.shape == (16, 32 * 14 * 14 + cut * 7 * 7)  # input + pooled channels, per sample
    torch.nn.functional.cross_entropy(pieces[3](pieces[2](h0)), y).backward()
    grads = cu.checkpoint.assemble(
        [(full, row, p.grad) for full, row, p in stages.param_origins(torch.nn.Sequential(*pieces))]
    )
    expected = {name: p.grad for name, p in reference.named_parameters()}
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_plan_balances_the_measured_costs_of_the_units():
    # conv1 block costly (as on a CPU), conv2's slices, fc a sliver
    costs = [(10.0, 10.0), (8.5, 8.5), (13.5, 13.5), (0.5, 0.5)]
    assert stages.plan(costs, 2) == [2, 2]  # 37 vs 28
    assert stages.plan([(8.0, 8.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)], 2) == [1, 3]
    assert stages.plan(costs, 4) == [1, 1, 1, 1]
    assert stages.unit_names("cnn")[1:3] == ["conv2 ch 0-15 + pool", "conv2 ch 16-63 + pool"]
    sim = stages.simulate_plan(costs, "gpipe", 2, 4)
    busy = {s: sum(e.end - e.start for e in sim if e.stage == s) for s in (0, 1)}
    assert busy == pytest.approx({0: 4 * 37.0, 1: 4 * 28.0})  # each stage's units, m times


def test_balance_minimises_the_slowest_stage():
    assert stages.balance([1, 5, 5, 1], 2) == [2, 2]
    assert stages.balance([8, 1, 1, 1], 2) == [1, 3]
    assert stages.balance([1, 1, 1, 1], 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        stages.balance([1, 1], 3)
    costs = stages.unit_costs(
        stages.units("cnn", cu.models.build("cnn", seed=0)), *cu.data.mnist("train", limit=16)
    )
    assert len(costs) == 4 and all(f > 0 and b > 0 for f, b in costs)


def test_the_microbatched_baseline_does_the_pipelines_arithmetic():
    # Lesson 06's second baseline: one process running the m microbatches in turn takes the
    # same step as on the whole batch (the pipeline's arithmetic, on one device).
    X, y = next(cu.data.batches(*cu.data.mnist("train"), 32, 1, seed=0))
    models = [cu.models.build("transformer", seed=0) for _ in range(2)]
    for model, step in zip(models, (cu.loop.train_step, cu.loop._accumulating(4))):
        step(model, torch.optim.SGD(model.parameters(), lr=0.1), X, y)
    whole, pieces = (dict(m.named_parameters()) for m in models)
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-4, atol=1e-6)
    rate = worker.one_process_throughput("transformer", 32, num_steps=1, microbatches=4)
    assert rate > 0


def test_saved_bytes_counts_activations_not_weights():
    model = cu.models.build("cnn", seed=0)
    head = stages.units("cnn", model)[-1]  # flatten + fc: autograd keeps fc's input
    x = torch.randn(16, 64, 7, 7)
    assert stages.saved_bytes(head, x) == x.numel() * 4


def test_config_errors():
    ok = dict(model="cnn", nproc=2, batch_size=64, microbatches=4, schedule="1f1b")
    assert worker.config_error(**ok) is None
    assert "at most 4 pipeline stages" in worker.config_error(**{**ok, "nproc": 5})
    assert "at most 2" in worker.config_error(**{**ok, "model": "rnn", "nproc": 3})
    assert "does not divide" in worker.config_error(**{**ok, "microbatches": 5})
    assert "at least 1" in worker.config_error(**{**ok, "microbatches": 0})
    assert "1f1b needs" in worker.config_error(**{**ok, "nproc": 4, "microbatches": 2})
    assert worker.config_error(**{**ok, "nproc": 4, "microbatches": 2, "schedule": "gpipe"}) is None
    assert "--schedule" in worker.config_error(**{**ok, "schedule": "zb"})


# --- real pipelines against one process ---------------------------------------------------------


def one_step(name, sizes, m, schedule, engine, batch_size):
    """Worker: one batch forward and backward through the pipeline; loss (last stage), the full
    model's gradients (rank 0) and this rank's timeline."""
    pipe = worker.Pipeline(name, sizes, m, schedule, engine, seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(cu.models.prepare_input(name, X), y, batch_size, 1, seed=0))
    pipe.events = []
    loss, _ = pipe.step_fn(None, torch.optim.SGD(pipe.stage.parameters(), lr=0.0), X, y)
    return float(loss), pipe.full_grads(), pipe.events


@pytest.mark.filterwarnings("ignore:4 workers on")  # 4 stages on fewer cores: still exact
@pytest.mark.parametrize("engine", worker.ENGINES)
@pytest.mark.parametrize("schedule", schedules.SCHEDULES)
@pytest.mark.parametrize("name,sizes", [("cnn", [2, 2]), ("rnn", [1, 1]), ("cnn", [1, 1, 1, 1])])
def test_pipeline_equals_one_process(name, sizes, schedule, engine):
    if len(sizes) == 4 and engine == "hand":
        pytest.skip("4 stages: one engine is enough")
    batch_size, m = 32, 4
    model = cu.models.build(name, seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(cu.models.prepare_input(name, X), y, batch_size, 1, seed=0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    results = cu.launch.run(
        one_step, len(sizes), name, sizes, m, schedule, engine, batch_size, threads=1
    )
    assert results[-1][0] == pytest.approx(loss.item(), rel=1e-5)
    grads = results[0][1]
    assert grads.keys() == dict(model.named_parameters()).keys()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)
    for rank, (_, _, events) in enumerate(results):  # the order run is the schedule's order
        ran = [(e.kind, e.microbatch) for e in sorted(events, key=lambda e: e.start)]
        assert ran == schedules.stage_order(schedule, len(sizes), m, rank)


@pytest.mark.parametrize("name,schedule", [("cnn", "gpipe"), ("rnn", "1f1b")])
def test_train_worker_matches_parallel_none(name, schedule):
    none = cu.train.run(RunConfig(model=name, steps=4, batch_size=32, eval=True), progress=False)
    cfg = RunConfig(
        model=name,
        parallel="pipeline",
        nproc=2,
        steps=4,
        batch_size=32,
        microbatches=4,
        schedule=schedule,
        eval=True,
    )
    result, other = cu.launch.run(cu.train.train_worker, 2, cfg, threads=1)
    assert other is None
    np.testing.assert_allclose(result["losses"], none["losses"], rtol=1e-4)
    np.testing.assert_allclose(result["accuracies"], none["accuracies"])
    assert result["test_accuracy"] == pytest.approx(none["test_accuracy"], abs=2e-3)
    assert result["samples_per_s"] > 0 and sum(result["stage_sizes"]) == stages.max_stages(name)


def test_profile_records_every_rank_and_trains_like_one_process():
    run = worker.Profile("cnn", microbatches=4, schedule="1f1b", engine="torch", batch_size=32)
    run.num_steps = 3
    result, other = cu.launch.run(worker.profile, 2, run, threads=1)
    assert other is None
    check_timeline(result["events"], 2, 4)  # the last step: every F and B of both stages
    assert result["samples_per_s"] > 0 and sum(result["sizes"]) == stages.max_stages("cnn")
    none = cu.train.run(RunConfig(steps=3, batch_size=32), progress=False)
    np.testing.assert_allclose(result["losses"], none["losses"], rtol=1e-4)


# --- plots and the widget ---------------------------------------------------------------------


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


def test_interleaved_1f1b_equals_one_process():
    # 4 stages on 2 ranks: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    batch_size, m = 32, 4
    model = cu.models.build("cnn", seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(X, y, batch_size, 1, seed=0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    results = cu.launch.run(
        one_step, 2, "cnn", [1, 1, 1, 1], m, "interleaved1f1b", "torch", 32, threads=1
    )
    assert results[-1][0] == pytest.approx(loss.item(), rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(results[0][1][k], p.grad, rtol=1e-4, atol=1e-6)
    assert sorted((e.kind, e.microbatch) for e in results[0][2]) == sorted(
        (k, i)
        for k in "FB"
        for i in range(m)
        for _ in range(2)  # each microbatch on 2 stages
    )
    assert "2 stages per worker" in worker.config_error("rnn", 2, 32, 4, "interleaved1f1b")
    assert worker.config_error("cnn", 2, 32, 4, "interleaved1f1b") is None


@pytest.mark.parametrize("schedule", worker.V_SCHEDULES)
def test_zero_bubble_v_schedules_equal_one_process(schedule):
    # 4 stages on 2 ranks in a V: rank 0 holds stages 0 and 3 (the loss), rank 1 stages 1 and 2
    batch_size, m = 32, 4
    model = cu.models.build("transformer", seed=0)
    X, y = cu.data.mnist("train")
    X, y = next(cu.data.batches(cu.models.prepare_input("transformer", X), y, batch_size, 1, 0))
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    results = cu.launch.run(
        one_step, 2, "transformer", [2, 1, 1, 2], m, schedule, "torch", 32, threads=1
    )
    assert results[0][0] == pytest.approx(loss.item(), rel=1e-5)  # rank 0 holds the last stage
    for k, p in model.named_parameters():
        torch.testing.assert_close(results[0][1][k], p.grad, rtol=1e-4, atol=1e-6)
    for rank, (_, _, events) in enumerate(results):
        kinds = [(e.kind, e.microbatch) for e in events]
        for i in range(m):  # each microbatch forward and backward on both of this rank's stages
            assert kinds.count(("F", i)) == 2 and kinds.count(("B", i)) == 2
        assert all(e.stage == rank for e in events)
    weights = [e for _, _, events in results for e in events if e.kind == "W"]
    if schedule == "zbv":  # its backward is split: the weights' gradients run as steps of their own
        assert len(weights) == 2 * 2 * m
    assert "2 stages per worker" in worker.config_error("cnn", 3, 36, 6, schedule)
    assert "--microbatches >= 2 x --nproc" in worker.config_error("transformer", 2, 32, 2, schedule)


@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
def test_the_cli_runs_the_v_schedules_like_one_process(schedule):
    from course_utils.config import RunConfig

    common = dict(model="transformer", steps=3, batch_size=32)
    one = cu.train.run(RunConfig(**common), progress=False)
    cfg = RunConfig(**common, parallel="pipeline", nproc=2, schedule=schedule, microbatches=4)
    piped = cu.train.run(cfg, progress=False)
    assert piped["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert len(piped["stages"]) == 4
