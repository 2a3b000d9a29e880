"""Lesson 08's figures: the model state per rank against the world size, the bytes a step sends
against the formula, and the bytes each rank holds, stacked, against the formula."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

import course_utils as cu
from course_utils import sharding


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_the_memory_curves_draw_one_line_per_stage_on_log_axes_with_the_capacity():
    world_sizes = [1, 2, 4, 8]
    per_stage = {
        name: sharding.memory_per_rank(1e9, world_sizes, stage) / 1e9
        for stage, name in sharding.ZERO_STAGES.items()
    }
    fig = cu.plots.zero_memory(world_sizes, per_stage, capacity=(80, "one 80 GB GPU"), title="t")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    for name, values in per_stage.items():
        np.testing.assert_allclose(lines[name].get_ydata(), values)
        np.testing.assert_allclose(lines[name].get_xdata(), world_sizes)
    assert list(lines["one 80 GB GPU"].get_ydata()) == [80, 80]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert legend_texts(ax.get_legend()) == list(per_stage) + ["one 80 GB GPU"]
    assert ax.get_title() == "t"
    plt.close(fig)


def test_the_traffic_bars_draw_what_was_counted_the_formula_and_the_ratios():
    fig = cu.plots.traffic_bars(
        ["DDP", "ZeRO-1", "ZeRO-3"],
        [None, 2048, 3000],
        [2048, 2048, 3072],
        reference=(2048, "DDP (formula)"),
        unit=1024,
        title="sent",
    )
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == pytest.approx([0.0, 2.0, 3000 / 1024])  # no bar where nothing was counted
    (marks,) = [line for line in ax.lines if line.get_label() == "formula"]
    assert list(marks.get_ydata()) == pytest.approx([2.0, 2.0, 3.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DDP", "ZeRO-1", "ZeRO-3"]
    assert sorted(t.get_text() for t in ax.texts) == ["1.00x", "1.46x"]  # one per counted bar
    assert set(legend_texts(ax.get_legend())) == {"counted", "formula", "DDP (formula)"}
    assert ax.get_ylim()[1] > 3.0  # the tallest bar and mark inside the axes
    plt.close(fig)


def test_the_memory_bars_stack_each_part_per_strategy_with_the_formula_on_top():
    held = {
        "1 rank": {"DDP": {"parameters": 4.0, "gradients": 4.0, "optimizer": 8.0}},
        "2 ranks": {
            "DDP": {"parameters": 4.0, "gradients": 4.0, "optimizer": 8.0, "activations": 3.0},
            "ZeRO-3": {"parameters": 2.0, "gradients": 2.0, "optimizer": 4.0, "activations": 3.0},
        },
    }
    formula = {"1 rank": {"DDP": 16.0}, "2 ranks": {"DDP": 16.0, "ZeRO-3": 8.0}}
    fig = cu.plots.memory_bars(held, formula, unit=1.0, ylabel="bytes", title="held")
    one, two = fig.axes
    assert [one.get_title(), two.get_title()] == ["1 rank", "2 ranks"]
    assert [t.get_text() for t in two.get_xticklabels()] == ["DDP", "ZeRO-3"]
    # bars in the order of the parts, each strategy's stacked on the one before
    tops = {(round(p.get_x() + p.get_width() / 2), p.get_y() + p.get_height()) for p in two.patches}
    assert tops == {
        (0, 4.0),
        (0, 8.0),
        (0, 16.0),
        (0, 19.0),
        (1, 2.0),
        (1, 4.0),
        (1, 8.0),
        (1, 11.0),
    }
    hatched = [p for p in two.patches if p.get_hatch()]
    assert [p.get_height() for p in hatched] == [3.0, 3.0]  # the activations, and only they
    (marks,) = [line for line in two.lines if line.get_label() == "formula (model state)"]
    assert list(marks.get_ydata()) == [16.0, 8.0]
    assert one.get_ylabel() == "bytes" and two.get_ylim()[1] >= 19.0
    names = legend_texts(fig.legends[0])  # every part of every panel, once, in stacking order
    assert names == ["parameters", "gradients", "optimizer", "activations", "formula (model state)"]
    assert fig._suptitle.get_text() == "held"
    plt.close(fig)
