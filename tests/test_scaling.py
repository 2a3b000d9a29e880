"""Lesson 03: Amdahl's and Gustafson's laws, the Karp-Flatt metric, their panel and figures."""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import notebook_functions

import course_utils as cu
from course_utils import scaling


def test_amdahl_known_values():
    assert scaling.amdahl(0.5, 2) == pytest.approx(4 / 3)  # 1 / (0.5 + 0.25)
    assert scaling.amdahl(0.9, 10) == pytest.approx(1 / 0.19)  # 5.263...
    assert scaling.amdahl(0.95, 20) == pytest.approx(1 / (0.05 + 0.0475))
    assert scaling.amdahl(1.0, 8) == pytest.approx(8.0)  # all parallel: ideal
    assert scaling.amdahl(0.0, 8) == pytest.approx(1.0)  # all serial: no gain


def test_gustafson_known_values():
    assert scaling.gustafson(0.5, 2) == pytest.approx(1.5)
    assert scaling.gustafson(0.9, 10) == pytest.approx(9.1)
    assert scaling.gustafson(1.0, 8) == pytest.approx(8.0)
    assert scaling.gustafson(0.0, 8) == pytest.approx(1.0)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.99, 1.0])
def test_one_worker_is_no_speedup(p):
    assert scaling.amdahl(p, 1) == pytest.approx(1.0)
    assert scaling.gustafson(p, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 0.95])
def test_amdahl_tends_to_its_ceiling(p):
    ceiling = 1 / (1 - p)
    assert scaling.max_speedup(p) == pytest.approx(ceiling)
    assert scaling.amdahl(p, math.inf) == pytest.approx(ceiling)
    assert scaling.amdahl(p, 1e9) == pytest.approx(ceiling, rel=1e-6)
    workers = np.arange(1, 200)
    speedups = scaling.amdahl(p, workers)
    assert np.all(np.diff(speedups) >= 0) and np.all(speedups <= ceiling + 1e-12)
    assert scaling.max_speedup(1.0) == math.inf


def test_gustafson_is_never_below_amdahl():
    # Same p, same N: growing the problem can only help (equal at N = 1 and at p in {0, 1}).
    p, n = np.meshgrid(np.linspace(0, 1, 11), np.arange(1, 65))
    assert np.all(scaling.gustafson(p, n) >= scaling.amdahl(p, n) - 1e-12)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_karp_flatt_inverts_amdahl(p, n):
    assert scaling.serial_fraction_from_speedup(scaling.amdahl(p, n), n) == pytest.approx(1 - p)


def test_karp_flatt_known_values():
    assert scaling.serial_fraction_from_speedup(2.0, 2) == pytest.approx(0.0)  # perfect
    assert scaling.serial_fraction_from_speedup(1.0, 2) == pytest.approx(1.0)  # no gain at all
    assert scaling.serial_fraction_from_speedup(1.6, 2) == pytest.approx(0.25)  # 1/1.6 = 0.625
    # Slower than one worker: the overhead exceeds the work, e > 1.
    assert scaling.serial_fraction_from_speedup(0.8, 2) > 1


def test_arrays_and_bad_input():
    np.testing.assert_allclose(scaling.amdahl(0.9, np.array([1, 2, 4])), [1.0, 1 / 0.55, 1 / 0.325])
    np.testing.assert_allclose(scaling.efficiency([2.0, 3.0], [2, 4]), [1.0, 0.75])
    with pytest.raises(ValueError, match="parallel fraction"):
        scaling.amdahl(1.5, 2)
    with pytest.raises(ValueError, match="at least 1"):
        scaling.gustafson(0.5, 0)
    with pytest.raises(ValueError, match="n > 1"):
        scaling.serial_fraction_from_speedup(1.0, 1)
    with pytest.raises(ValueError, match="positive"):
        scaling.serial_fraction_from_speedup(0.0, 2)


def test_laws_table():
    laws = scaling.laws(0.9, 16)
    assert list(laws["workers"]) == list(range(1, 17))
    np.testing.assert_allclose(laws["amdahl"], [scaling.amdahl(0.9, n) for n in range(1, 17)])
    np.testing.assert_allclose(laws["gustafson"], [0.1 + 0.9 * n for n in range(1, 17)])
    assert laws["limit"] == pytest.approx(10.0)


def _line(fig, prefix):
    return next(line for line in fig.axes[0].lines if line.get_label().startswith(prefix))


def test_panel_redraws_when_a_slider_moves():
    panel = cu.widgets.ScalingLawsPanel(p=0.9, max_workers=16, measured={"measured": (2, 1.8)})
    assert panel.last_error is None, panel.last_error
    assert panel.current()["amdahl_at_n"] == pytest.approx(scaling.amdahl(0.9, 16))
    first = panel.figure

    panel.controls["p"].value = 0.5  # no click: the slider's observer redraws
    assert panel.last_error is None, panel.last_error
    assert panel.figure is not first
    amdahl_line = _line(panel.figure, "Amdahl (")
    np.testing.assert_allclose(amdahl_line.get_ydata(), scaling.amdahl(0.5, np.arange(1, 17)))
    assert panel.current()["limit"] == pytest.approx(2.0)

    panel.controls["max_workers"].value = 64
    gustafson_line = _line(panel.figure, "Gustafson")
    assert len(gustafson_line.get_xdata()) == 64
    assert gustafson_line.get_ydata()[-1] == pytest.approx(0.5 + 0.5 * 64)
    assert "measured" in [line.get_label() for line in panel.figure.axes[0].lines]

    panel.controls["max_workers"].value = 16  # back to (0.5, 16), seen before: from the cache
    assert panel.status.value == "cached"
    assert panel.current()["amdahl_at_n"] == pytest.approx(scaling.amdahl(0.5, 16))
    assert len(_line(panel.figure, "Amdahl (").get_xdata()) == 16  # redrawn all the same

    panel.controls["p"].value = 1.0  # no finite ceiling: drawn without one, no error
    assert panel.last_error is None, panel.last_error
    assert not any("ceiling" in line.get_label() for line in panel.figure.axes[0].lines)


@pytest.mark.parametrize("kind", ["data", "task", "pipeline"])
def test_parallelism_diagrams_draw(kind):
    fig = cu.plots.parallelism(kind)
    labels = [t.get_text() for t in fig.axes[0].texts]
    expected = {"data": "x7", "task": "lr 0.1", "pipeline": "F3"}[kind]  # the last item of work
    assert expected in labels and fig.axes[0].patches
    with pytest.raises(ValueError, match="kind"):
        cu.plots.parallelism("tensor")


def test_scaling_figures():
    fig = cu.plots.scaling_laws(ps=(0.5, 0.9), max_workers=8, measured={"run": (2, 1.7)})
    amdahl_ax, gustafson_ax = fig.axes
    line = next(line for line in amdahl_ax.lines if line.get_label().split(" (")[0] == "p = 0.9")
    np.testing.assert_allclose(line.get_ydata(), scaling.amdahl(0.9, np.arange(1, 9)))
    line = next(line for line in gustafson_ax.lines if line.get_label() == "p = 0.5")
    np.testing.assert_allclose(line.get_ydata(), scaling.gustafson(0.5, np.arange(1, 9)))
    fig = cu.plots.speedup_bars(["serial", "parallel"], [2.0, 1.0])
    assert [t.get_text() for t in fig.axes[0].texts] == ["2 s\n1.00×", "1 s\n2.00×"]
    fig = cu.plots.speedup_bars(["1 thread", "2 threads"], [0.0199, 0.0102])  # below 1 s: in ms
    assert [t.get_text() for t in fig.axes[0].texts] == ["19.9 ms\n1.00×", "10.2 ms\n1.95×"]
    assert [bar.get_height() for bar in fig.axes[0].patches] == pytest.approx([19.9, 10.2])
    shared, messages = cu.plots.memory_models().axes

    def texts(ax):
        return " ".join(t.get_text() for t in ax.texts)

    assert all(f"thread {t}" in texts(shared) for t in range(3))  # one memory, three threads
    assert "process" not in texts(shared) and "all-reduce" in texts(messages)
    assert all(f"memory of\nprocess {w}" in texts(messages) for w in range(2))  # one each


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_a_ceiling_above_the_plot_is_named_not_lost():
    # The lesson's figure: p = 0.99's ceiling (100x) lies above an axis that ends near 64 workers.
    fig = cu.plots.scaling_laws(ps=(0.5, 0.75, 0.9, 0.95, 0.99), max_workers=64)
    amdahl_ax = fig.axes[0]
    top = amdahl_ax.get_ylim()[1]
    assert top < 100
    labels = [line.get_label() for line in amdahl_ax.lines]
    assert "p = 0.99 (ceiling 100×, above the plot)" in labels
    assert "p = 0.95" in labels  # its ceiling, 20x, is drawn: no note
    assert _texts(amdahl_ax) == ["↑ ceiling 100×"]
    ceilings = sorted(
        line.get_ydata()[0] for line in amdahl_ax.lines if line.get_linestyle() == "--"
    )
    assert ceilings == pytest.approx([2, 4, 10, 20, 100])
    legend = [t.get_text() for t in amdahl_ax.get_legend().get_texts()]
    assert "ceiling 1/(1-p), dashed, in p's colour" in legend


def test_the_panels_ceiling_is_drawn_or_named():
    inside = cu.plots.scaling_law_curves(scaling.laws(0.9, 16))  # 10x, below 16
    assert any(
        line.get_label() == "Amdahl's ceiling 1/(1-p) = 10×" for line in inside.axes[0].lines
    )
    assert _texts(inside.axes[0]) == []
    above = cu.plots.scaling_law_curves(scaling.laws(0.95, 16))  # 20x, above the axis top
    assert above.axes[0].get_ylim()[1] < 20
    assert any("(above the plot)" in line.get_label() for line in above.axes[0].lines)
    assert _texts(above.axes[0]) == ["↑ ceiling 20×"]
    ideal = cu.plots.scaling_law_curves(scaling.laws(1.0, 16))  # three lines in one: said so
    assert any("coincide" in text for text in _texts(ideal.axes[0]))


def test_measured_spreads_get_bars_and_noisy_marks():
    quiet, noisy = cu.measure.spread([1.9, 2.0, 2.05]), cu.measure.spread([1.5, 2.2, 2.4])
    fig = cu.plots.scaling_law_curves(
        scaling.laws(0.9, 2), measured={"sweep": (2, quiet), "primes": (2, noisy)}
    )
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert "sweep" in labels and "primes (noisy: repeats > 20% apart)" in labels
    assert ax.get_ylim()[1] >= 2.4  # the highest repeat is inside the plot
    assert len(ax.collections) == 2  # one min-max bar per point
    fig = cu.plots.scaling_laws(ps=(0.9,), max_workers=8, measured={"sweep": (2, quiet)})
    assert all(len(ax.collections) == 1 for ax in fig.axes)


def test_speedup_bars_of_interleaved_repeats():
    serial = cu.measure.spread([2.0, 2.2, 2.0])
    parallel = cu.measure.spread([1.0, 1.0, 1.6])  # noisy: 60% apart
    fig = cu.plots.speedup_bars(["serial", "parallel"], [serial, parallel])
    ax = fig.axes[0]
    assert _texts(ax) == ["2 s\n1.00×", "1 s\n2.00× (1.25-2.20)"]  # paired ratios' median, range
    assert [bar.get_hatch() for bar in ax.patches[:2]] == [None, "//"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["noisy: repeats > 20% apart"]
    assert ax.get_ylim()[1] > 1.6  # the error bar's top fits


def test_memory_models_say_which_is_distributed():
    shared, messages = cu.plots.memory_models().axes
    assert "parallel, not distributed" in shared.get_title()
    assert "parallel and distributed" in messages.get_title()
    links = " ".join(t.get_text() for t in messages.texts)
    assert "TCP" in links and "shared memory" not in links  # gloo's transports: TCP, ibverbs, uv


# The lesson writes the three formulas by hand (rule: the notebook's code is the package's code):
# the functions it defines must have the package's names and give the package's numbers.
LESSON = Path(__file__).resolve().parents[1] / "notebooks" / "03_parallel_computing_basics.ipynb"
LESSON_FUNCTIONS = ("amdahl", "gustafson", "serial_fraction_from_speedup", "karp_flatt")


def lesson_functions() -> dict:
    """The lesson's own definitions of LESSON_FUNCTIONS, executed alone."""
    return notebook_functions(LESSON, LESSON_FUNCTIONS, {"math": math, "cu": cu})


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("n", [1, 2, 8, 64, 1000])
def test_the_lessons_laws_are_the_packages(p, n):
    lesson = lesson_functions()
    assert lesson["amdahl"](p, n) == pytest.approx(scaling.amdahl(p, n))
    assert lesson["gustafson"](p, n) == pytest.approx(scaling.gustafson(p, n))


@pytest.mark.parametrize("speedup", [0.5, 1.0, 1.6, 2.0, 2.3, 7.9])  # e above 1 and below 0 too
@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_lessons_karp_flatt_is_the_packages(speedup, n):
    lesson = lesson_functions()
    expected = scaling.serial_fraction_from_speedup(speedup, n)
    assert lesson["serial_fraction_from_speedup"](speedup, n) == pytest.approx(expected)


def test_the_lessons_karp_flatt_spread_keeps_every_repeat_and_negative_values():
    karp_flatt = lesson_functions()["karp_flatt"]
    speedups = cu.measure.spread([1.6, 2.0, 2.2])  # the last beats 2 workers: e < 0
    e = karp_flatt(speedups, 2)
    assert sorted(e.samples) == pytest.approx([100 * (1 / 2.2 - 0.5) / 0.5, 0.0, 25.0])
    assert e.low < 0 < e.high
    line = cu.readout.ratio("e", e, 0.0, words=("larger", "smaller"), baseline="0%", unit="%")
    assert line.verdict == "within"  # one repeat on each side of 0: no claim
