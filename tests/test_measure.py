"""Measuring on a busy machine: spreads of repeats, turns, and a watch on the other programs."""

import subprocess
import sys
import time

import pytest
import torch

from course_utils import measure


def test_a_spread_is_a_median_with_its_range_and_knows_when_it_is_noisy():
    s = measure.spread([10.0, 12.0, 11.0])
    assert (s.median, s.low, s.high, s.noisy) == (11.0, 10.0, 12.0, False)
    assert measure.spread([10.0, 13.0, 11.0]).noisy  # 30% apart
    assert not measure.spread([5.0]).noisy and str(measure.spread([5.0])) == "5.00"
    assert str(measure.spread([0.9, 1.0, 1.02])) == "1.00 (0.900-1.02)"
    assert str(measure.spread([1200.0, 1900.0])) == "1,550 (1,200-1,900, noisy)"
    assert s.as_dict("speedup") == {
        "speedup": 11.0,
        "speedup_min": 10.0,
        "speedup_max": 12.0,
        "speedup_noisy": False,
    }
    with pytest.raises(ValueError):
        measure.spread([])


def test_interleaved_takes_turns_and_ratios_pair_the_rounds():
    order = []

    def recorder(name, values):
        it = iter(values)
        return lambda: order.append(name) or next(it)

    spreads = measure.interleaved(
        {"a": recorder("a", [2.0, 4.0, 6.0]), "b": recorder("b", [1.0, 2.0, 2.0])}, repeats=3
    )
    assert order == ["a", "b"] * 3  # A B, A B, A B: a burst of load hits both alike
    assert spreads["a"].samples == (2.0, 4.0, 6.0)
    assert measure.ratios(spreads["a"], spreads["b"]).samples == (2.0, 2.0, 3.0)


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_watch_counts_other_programs_and_not_this_one():
    # Another program spins, and so does this one: the watch must count the first (about one
    # core) and not this process's own core. (Robust to more load: the sum is capped by cores.)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with measure.Watch() as watch:
            spin(1.0)
    finally:
        busy.kill()
        busy.wait()
    assert watch.others > 0.3 and not watch.quiet and "busy" in watch.note()
    assert watch.own > 0.1  # it did spin...
    assert watch.others == pytest.approx(watch.total - watch.own, abs=1e-9)  # ...and is not counted
    assert watch.cores >= 1 and watch.seconds == pytest.approx(1.0, abs=0.5)


def clock(monkeypatch, ticks):
    """Make time.perf_counter return ``ticks`` one after another (the code under test's clock)."""
    ticks = iter(ticks)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))


def test_step_phases_times_each_phase_and_leaves_out_the_warm_up(monkeypatch):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = model.weight.detach().clone()
    # t0..t3 of each repeat: a slow warm-up, then forward 1 s, backward 2 s, optimizer 3 s
    clock(monkeypatch, [0, 10, 20, 30] + [100, 101, 103, 106] + [200, 201, 203, 206])
    phases = measure.step_phases(model, optimizer, X, y, repeats=2)
    assert phases == {"forward": 1.0, "backward": 2.0, "optimizer": 3.0}
    assert not torch.equal(model.weight, before)  # real steps: the model given is trained


def test_throughput_trains_a_copy_and_counts_the_steps_after_the_first(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    X, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    threads = torch.get_num_threads()
    # fit reads the clock before and after each step: 1 warm-up step of 7 s, then 3 of 0.5 s
    clock(monkeypatch, [0, 7, 10, 10.5, 20, 20.5, 30, 30.5])
    rate = measure.throughput(model, X, y, batch_size=16, threads=1, num_steps=3)
    assert rate == pytest.approx(16 * 3 / 1.5)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # the caller's model is untouched
    assert torch.get_num_threads() == threads  # and so is its thread count
