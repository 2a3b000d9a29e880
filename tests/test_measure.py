"""Measuring on a busy machine: spreads of repeats, turns, and a watch on the other programs."""

import subprocess
import sys
import time

import pytest

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
