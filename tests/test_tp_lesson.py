"""Lesson 09's figures: Megatron's MLP split, a device mesh's groups, and the measured
tensor-parallel speedups with their spreads."""

import matplotlib.pyplot as plt
import pytest

import course_utils as cu


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_megatron_diagram_draws_a_lane_per_rank_and_both_operators(world_size):
    fig = cu.plots.megatron_mlp(world_size)
    words = texts(fig)
    assert [w for w in words if w.startswith("rank ")] == [f"rank {r}" for r in range(world_size)]
    assert "f" in words and "g" in words
    last = world_size - 1 if world_size > 2 else ""  # "H/2", "3H/4": where the last block starts
    assert any(w.startswith(f"fc1, rows 0..H/{world_size}\n") for w in words)
    assert any(w.startswith(f"fc1, rows {last}H/{world_size}..H\n") for w in words)
    plt.close(fig)


def test_the_mesh_diagram_names_every_rank_and_group():
    fig = cu.plots.device_mesh([[0, 1], [2, 3]])
    words = texts(fig)
    assert sorted(w for w in words if w.startswith("rank")) == [f"rank {r}" for r in range(4)]
    assert sum(w.startswith("tp group") for w in words) == 2
    assert sum(w.startswith("dp group") for w in words) == 2
    assert fig.axes[0].get_title() == "A 2 x 2 mesh (dp x tp)"
    plt.close(fig)


def points():
    """Two widths x two batches, by hand (with a communication share) and with DTensor; one
    point noisy."""
    out = []
    for impl in ("by hand", "DTensor"):
        for batch in (16, 64):
            for width in (32, 64):
                base = width / 64 * (1.2 if impl == "by hand" else 1.0)
                samples = [base, base * (1.5 if (width, batch) == (64, 64) else 1.05)]
                p = {"width": width, "batch": batch, "layers": impl}
                p |= cu.measure.spread(samples).as_dict("speedup")
                if impl == "by hand":
                    p |= cu.measure.spread([60 - width / 2, 62 - width / 2]).as_dict("comm_share")
                out.append(p)
    return out


def test_the_speedup_figure_draws_each_series_with_bars_reference_lines_and_noise():
    fig = cu.plots.tp_speedups(points(), title="measured")
    left, right = fig.axes
    labels = left.get_legend().get_texts()
    names = [t.get_text() for t in labels]
    for batch in (16, 64):
        for impl in ("by hand", "DTensor"):
            assert f"batch {batch}, {impl}" in names
    assert "break-even (one process)" in names and "ideal (2 ranks)" in names
    assert "noisy: repeats > 20% apart" in names  # the (64, 64) points disagree by 50%
    # DTensor's lines dashed, the hand-written ones solid, one colour per batch
    styles = {
        line.get_label(): (line.get_linestyle(), line.get_color())
        for line in left.lines
        if line.get_label().startswith("batch")
    }
    assert styles["batch 16, by hand"][0] == "-" and styles["batch 16, DTensor"][0] == "--"
    markers = {line.get_label(): line.get_marker() for line in left.lines}
    assert markers["batch 16, by hand"] == "o" and markers["batch 16, DTensor"] == "s"
    assert styles["batch 16, by hand"][1] == styles["batch 16, DTensor"][1]
    assert styles["batch 16, by hand"][1] != styles["batch 64, by hand"][1]
    assert left.get_ylim()[1] >= 2.0  # the ideal line is inside the axes
    # the right panel: the communication share of the hand-written layers only, one per batch
    right_names = [t.get_text() for t in right.get_legend().get_texts()]
    assert right_names[:2] == ["batch 16", "batch 64"]
    assert right.get_ylabel() == "% of a step in the all-reduces"
    assert [t.get_text() for t in left.get_xticklabels()] == ["32", "64"]
    assert fig._suptitle.get_text() == "measured"
    plt.close(fig)


def test_the_speedup_figure_takes_single_measurements_and_one_implementation():
    one = [
        {"width": w, "batch": 8, "layers": "by hand", "speedup": 0.5, "comm_share": 40.0}
        for w in (16, 32)
    ]
    fig = cu.plots.tp_speedups(one)
    names = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "batch 8" in names and "noisy: repeats > 20% apart" not in names
    plt.close(fig)
