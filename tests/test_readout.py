"""The readout vocabulary: the noise rule, the spreads' formatting and the verbs, once."""

import pytest

from course_utils import measure, readout


def test_a_ratio_is_clearly_above_only_when_every_repeat_is():
    r = readout.ratio("2 workers", [1.71, 1.84, 1.93], baseline="one worker")
    assert r.verdict == "above"
    assert str(r) == "2 workers: 1.84x (1.71-1.93x), clearly faster than one worker"
    # one repeat below the reference: within the noise, however far the median is
    assert readout.ratio("x", [0.99, 1.5, 1.6]).verdict == "within"


def test_all_repeats_slower_is_clearly_slower_whatever_the_spread():
    # lesson 09's old helper called this "within the noise" (a 10% margin on a spread of three)
    r = readout.ratio("tp", [0.59, 0.87, 0.91], baseline="one process")
    assert r.verdict == "below"
    assert "clearly slower than one process" in str(r)
    assert "0.590-0.910x" in str(r)


def test_one_run_needs_the_margin_and_says_it_was_one_run():
    assert readout.verdict(1.05, 1.0) == "within"
    assert readout.verdict(1.15, 1.0) == "above"
    assert readout.verdict(0.85, 1.0) == "below"
    assert str(readout.ratio("x", 1.15)).endswith("one run")
    assert readout.ONE_SAMPLE_MARGIN == pytest.approx(0.10)


def test_words_name_what_above_and_below_mean():
    r = readout.ratio("memory", [0.4, 0.5], words=("larger", "smaller"), baseline="DDP's")
    assert str(r) == "memory: 0.450x (0.400-0.500x), clearly smaller than DDP's"


def test_paired_comparison_uses_the_ratios_of_each_round():
    a = [10.0, 20.0, 30.0]  # a busy round hits both alike
    b = [9.0, 18.0, 27.0]
    r = readout.compare("batch 64", a, b, names=("2w", "1w"), unit="/s")
    assert r.verdict == "above"  # every round: a/b = 1.11
    assert r.numbers["ratio"] == pytest.approx(10 / 9)
    assert "paired" in str(r)
    # unpaired, the same numbers overlap: within the noise
    assert readout.compare("x", a, b, paired=False).verdict == "within"
    assert readout.differ(a, b, paired=False) == "within"


def test_unpaired_spreads_differ_only_when_their_ranges_part():
    assert readout.differ([5, 6], [1, 2, 3], paired=False) == "above"
    assert readout.differ([1, 2], [3, 4, 5], paired=False) == "below"
    assert readout.differ([1, 4], [3, 5], paired=False) == "within"


def test_trend_rises_falls_flat_and_turns():
    xs = [1, 2, 4]
    assert readout.trend("s", xs, [[1.0, 1.1], [1.5, 1.6], [1.9, 2.0]]).verdict == "rises"
    assert readout.trend("s", xs, [[2.0, 2.1], [1.5, 1.6], [1.0, 1.1]]).verdict == "falls"
    assert readout.trend("s", xs, [[1.0, 1.3], [1.1, 1.2], [1.05, 1.25]]).verdict == "flat"
    peak = readout.trend("s", [1, 2, 4, 8], [[1, 1.1], [1.5, 1.6], [2.0, 2.1], [1.6, 1.7]])
    assert peak.verdict == "turns" and peak.numbers["turn"] == 4
    assert "a peak of" in str(peak)
    dip = readout.trend("t", xs, [[5, 5.5], [2, 2.2], [5, 5.3]], x_name="m")
    assert dip.verdict == "turns" and "a dip of" in str(dip) and "at m 2" in str(dip)
    with pytest.raises(ValueError):
        readout.trend("s", [1], [1.0])


def test_against_a_model_gives_the_fraction_and_its_spread():
    r = readout.against("1F1B", [1.45, 1.5, 1.55], 1.78, model_name="the bound", unit="x")
    assert r.verdict == "below"
    assert r.numbers["fraction"] == pytest.approx(1.5 / 1.78)
    assert str(r) == "1F1B: 84.3% (81.5-87.1%) of the bound = 1.78x, clearly below it"
    assert readout.against("x", [0.9, 1.1], 1.0).verdict == "within"
    with pytest.raises(ValueError):
        readout.against("x", 1.0, 0.0)


def test_value_table_and_busy_lines():
    assert str(readout.value("one", [693, 650, 720], "samples/s")) == (
        "one: 693 samples/s (650-720 samples/s)"
    )
    t = readout.table(["batch", "speedup"], [[32, measure.spread([1.5, 1.6])], [64, 1.7]])
    assert str(t).splitlines() == ["batch  speedup", "32     1.55 (1.50-1.60)", "64     1.70"]
    with pytest.raises(ValueError):
        readout.table(["a", "b"], [[1]])
    with measure.Watch() as watch:
        pass
    assert str(readout.busy(watch)) == watch.note()


def test_a_reading_prints_as_its_line():
    r = readout.ratio("x", [1.2, 1.3])
    assert repr(r) == str(r) == r.line


def test_a_reference_of_zero_is_compared_by_the_difference():
    r = readout.compare("hidden", [0.1, 0.2, 0.3], [0.0, 0.0, 0.0], names=("a", "b"), unit="%")
    assert r.verdict == "above"
    assert "difference 0.200%" in str(r) and "nan" not in str(r)


def test_units_are_spaced_as_written():
    assert str(readout.value("s", [1.1], "x")) == "s: 1.10x, one run"
    assert str(readout.value("s", [1.1], "ms")) == "s: 1.10 ms, one run"
    assert str(readout.value("alpha", 102.0, "µs", computed=True)) == "alpha: 102 µs"


def test_a_spread_below_zero_reads_with_to():
    assert readout.span([-6.0, -3.1, 1.2], "%") == "-3.10% (-6.00 to 1.20%)"


def test_a_table_without_rows_is_its_header():
    assert str(readout.table(["a", "bb"], [])) == "a  bb"


def test_a_median_within_two_percent_is_never_clearly_different():
    # all three repeats above 1, but by a hair: equal things do that a quarter of the time
    assert readout.verdict([1.005, 1.01, 1.18], 1.0) == "within"
    assert readout.verdict([0.85, 0.99, 0.995], 1.0) == "within"
    assert readout.verdict([1.03, 1.05, 1.2], 1.0) == "above"
