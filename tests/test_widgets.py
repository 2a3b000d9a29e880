"""The lesson panels, driven without a browser: set the controls, click, read the results."""

import pytest
import torch

import course_utils as cu


class TinyModel(torch.nn.Module):
    """A model that trains in microseconds: the panel's wiring is under test, not the CNN."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def data():
    return cu.data.mnist("train", limit=256)


def counting(measure):
    """Wrap a measure function so the test can see how often the panel really measured."""

    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        return measure(*args, **kwargs)

    wrapped.calls = 0
    return wrapped


def test_measure_button_records_a_point_and_caches_it(data):
    X, y = data
    measure = counting(cu.measure.throughput)
    panel = cu.widgets.ThroughputPanel(
        TinyModel(), X, y, batch_sizes=[8, 32], num_steps=2, measure=measure, repeats=3
    )
    assert panel.controls["threads"].max == cu.hardware.num_cores()

    panel.controls["batch_size"].value = 32
    panel.controls["threads"].value = 1
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    assert len(panel.results) == 1 and measure.calls == 3  # three repeats: a median, a bar
    point = panel.results[0]
    assert point["batch_size"] == 32 and point["threads"] == 1
    assert point["samples_per_s_min"] <= point["samples_per_s"] <= point["samples_per_s_max"]
    assert panel.figure is not None and panel.figure.axes[0].lines  # the point was drawn

    panel.run_button.click()  # same setting: answered from the cache
    assert measure.calls == 3 and len(panel.results) == 1
    assert panel.status.value == "cached"

    panel.controls["batch_size"].value = 8
    panel.run_button.click()  # a new setting: measured and appended
    assert measure.calls == 6 and len(panel.results) == 2
    assert panel.results[-1]["batch_size"] == 8 and panel.results[-1]["samples_per_s"] > 0


def test_a_failing_measurement_is_shown_not_raised(data):
    X, y = data

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (pretend)")

    panel = cu.widgets.ThroughputPanel(TinyModel(), X, y, batch_sizes=[8], measure=broken)
    panel.run_button.click()  # must not raise: a callback error would be lost in the kernel log
    assert "out of memory (pretend)" in panel.last_error
    assert "error" in panel.status.value
    assert panel.results == [] and not panel.run_button.disabled


def test_measurements_plot_draws_one_sorted_line_per_group_and_nothing_for_no_points():
    points = [
        {"batch_size": 64, "threads": 2, "samples_per_s": 300.0},
        {"batch_size": 16, "threads": 2, "samples_per_s": 100.0},
        {"batch_size": 16, "threads": 1, "samples_per_s": 80.0},
    ]
    fig = cu.plots.measurements(points, x="batch_size", y="samples_per_s", by="threads")
    lines = fig.axes[0].lines
    assert len(lines) == 2  # one per thread count
    assert list(lines[1].get_xdata()) == [16, 64]  # sorted along x
    assert [line.get_label() for line in lines] == ["threads = 1", "threads = 2"]
    noisy = {
        "batch_size": 32,
        "threads": 1,
        **cu.measure.spread([80, 100, 130]).as_dict("samples_per_s"),
    }
    fig = cu.plots.measurements([*points, noisy], x="batch_size", y="samples_per_s", by="threads")
    bars = fig.axes[0].collections  # the error bar of the repeated point
    assert len(bars) == 1 and "noisy" in [t.get_text() for t in fig.axes[0].get_legend().texts][-1]
    assert list(lines[1].get_ydata()) == [100.0, 300.0]
    empty = cu.plots.measurements([], x="batch_size", y="samples_per_s", by="threads")
    assert len(empty.axes[0].lines) == 0 and empty.axes[0].get_legend() is None  # before any Run
