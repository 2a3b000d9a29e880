"""Lessons 01 and 02: cu.single_device's sweeps and their figures, and the lessons' own code."""

import json

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import ROOT

import course_utils as cu
from course_utils import single_device


def notebook_cell(name: str, starts_with: str) -> str:
    """The source of the first code cell of ``notebooks/name`` that starts with ``starts_with``."""
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    for c in cells:
        source = "".join(c["source"])
        if c["cell_type"] == "code" and source.startswith(starts_with):
            return source
    raise AssertionError(f"{name}: no code cell starts with {starts_with!r}")


def test_neighbour_ratios_pair_the_repeats_of_each_round():
    spreads = {
        7: cu.measure.spread([1.0, 2.0, 4.0]),
        14: cu.measure.spread([2.0, 3.0, 8.0]),
        28: cu.measure.spread([4.0, 9.0, 8.0]),
    }
    got = single_device.neighbour_ratios(spreads)
    assert list(got) == [(7, 14), (14, 28)]  # in the sweep's order, neighbours only
    assert got[7, 14].samples == (2.0, 1.5, 2.0)  # round by round, not median over median
    assert got[14, 28].samples == (2.0, 3.0, 1.0)
    assert single_device.neighbour_ratios({1: cu.measure.spread([1.0])}) == {}


def test_neighbour_ratios_refuse_spreads_of_different_lengths():
    with pytest.raises(ValueError):
        single_device.neighbour_ratios(
            {1: cu.measure.spread([1.0, 2.0]), 2: cu.measure.spread([1.0])}
        )


def test_throughput_sweep_measures_every_setting_once_per_round_in_turns():
    calls = []

    def fake_measure(model, X, y, batch_size, threads, num_steps):
        calls.append((batch_size, threads, num_steps))
        return 100.0 * batch_size + threads + len(calls) / 1000

    X, y = torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    got = single_device.throughput_sweep(
        None, X, y, [8, 32], [1, 2], num_steps=3, repeats=2, measure=fake_measure
    )
    one_round = [(8, 1, 3), (8, 2, 3), (32, 1, 3), (32, 2, 3)]
    assert calls == one_round * 2  # every setting once, then the next round
    assert list(got) == [8, 32] and list(got[8]) == [1, 2]
    assert got[32][2].samples == pytest.approx((3202.004, 3202.008))


def test_phase_sweep_returns_milliseconds_whose_sum_is_the_step(monkeypatch):
    order = []

    def fake_phases(model, optimizer, X, y, repeats):
        order.append(len(X))
        return {"forward": 0.001 * len(X), "backward": 0.002 * len(X), "optimizer": 0.0005}

    monkeypatch.setattr(single_device, "step_phases", fake_phases)
    X, y = torch.zeros(64, 1, 28, 28), torch.zeros(64, dtype=torch.long)
    phases, step = single_device.phase_sweep(torch.nn.Linear(2, 2), X, y, [8, 32], repeats=3)
    assert order == [8, 32] * 3  # in turns
    assert phases[8]["forward"].samples == pytest.approx((8.0, 8.0, 8.0))  # seconds -> ms
    assert phases[32]["optimizer"].median == pytest.approx(0.5)
    assert step[32].median == pytest.approx(32 + 64 + 0.5)


def test_phase_sweep_times_a_real_model():
    X, y = cu.data.mnist("train", limit=16)
    phases, step = single_device.phase_sweep(cu.models.CNN(), X, y, [4, 8], repeats=2)
    for b in (4, 8):
        assert set(phases[b]) == set(single_device.PHASES)
        assert all(len(s.samples) == 2 and s.low > 0 for s in phases[b].values())
        for i in range(2):  # each repeat's step is the sum of its phases
            total = sum(phases[b][n].samples[i] for n in single_device.PHASES)
            assert step[b].samples[i] == pytest.approx(total)


def _sweep(threads=(1, 2)):
    s = cu.measure.spread
    return {b: {t: s([100.0 * t * b, 110.0 * t * b]) for t in threads} for b in (16, 64)}


def test_thread_sweep_draws_paired_speedups_and_the_ideal():
    fig = cu.plots.thread_sweep([16, 64], _sweep(), cores=2)
    left, right = fig.axes[:2]
    labels = [line.get_label() for line in left.get_lines()]
    assert "1 thread(s)" in labels and "2 thread(s)" in labels
    speedup = next(line for line in right.get_lines() if line.get_label() == "2 threads")
    assert list(speedup.get_ydata()) == pytest.approx([2.0, 2.0])  # paired ratios, median
    levels = {tuple(line.get_ydata()) for line in right.get_lines()}
    assert (1, 1) in levels and (2, 2) in levels  # no gain, and the ideal
    plt.close(fig)


def test_thread_sweep_on_one_core_says_there_is_nothing_to_compare():
    fig = cu.plots.thread_sweep([16, 64], _sweep(threads=(1,)), cores=1)
    assert not fig.axes[1].axison
    assert "one core" in fig.axes[1].texts[0].get_text()
    plt.close(fig)


def test_step_phases_stacks_medians_per_step_and_per_sample():
    s = cu.measure.spread
    phases = {
        b: {"forward": s([1.0 * b]), "backward": s([2.0 * b]), "optimizer": s([3.0])}
        for b in (4, 8)
    }
    step = {b: s([3.0 * b + 3]) for b in (4, 8)}
    fig = cu.plots.step_phases(phases, step)
    per_step, per_sample = fig.axes[:2]
    tops = [p.get_y() + p.get_height() for p in per_step.patches[-2:]]  # the optimizer's bars
    assert tops == pytest.approx([15.0, 27.0])
    tops = [p.get_y() + p.get_height() for p in per_sample.patches[-2:]]
    assert tops == pytest.approx([15.0 / 4, 27.0 / 8])
    plt.close(fig)


def test_lesson_02_step_timer_times_a_pass_and_leaves_gradients():
    source = notebook_cell("02_rnn_single_device.ipynb", "def step_timer")
    namespace = {}
    exec(
        source.split("\n\n\ntorch.manual_seed")[0],
        {"time": __import__("time"), "F": torch.nn.functional},
        namespace,
    )
    model = cu.models.RNN(hidden_size=8)
    timed = namespace["step_timer"](model, torch.randn(4, 5, 28), torch.randint(0, 10, (4,)))
    seconds = timed()
    assert 0 < seconds < 60
    assert all(p.grad is not None for p in model.parameters())
