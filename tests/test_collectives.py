"""The ring all-reduce against dist.all_reduce; the ring's schedule; the alpha-beta fit; the probe."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import notebook_functions

from course_utils import collectives, launch

SHAPES = [(1,), (7,), (1001,), (5, 13)]  # none divisible by 2, 3 or 4 ranks except by chance


def ring_vs_builtin(shapes, seed):
    """On each rank: random tensors, summed by the ring and by dist.all_reduce."""
    rank = dist.get_rank()
    out = []
    for i, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(seed + 1000 * rank + i)  # different data on each rank
        x = torch.randn(shape, generator=g)
        ring, builtin = x.clone(), x.clone()
        returned = collectives.ring_all_reduce(ring)
        dist.all_reduce(builtin)
        out.append((x, ring, builtin, returned is ring))
    # a non-contiguous tensor (a transposed view) is summed in place too
    base = torch.arange(12.0).reshape(3, 4) * (rank + 1)
    view = base.T
    collectives.ring_all_reduce(view)
    out.append(base)
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_all_reduce_equals_dist_all_reduce(world_size):
    results = launch.run(ring_vs_builtin, world_size, SHAPES, 7, timeout=60, threads=1)
    inputs = [[case[0] for case in r[:-1]] for r in results]
    for r in results:
        for i, (x, ring, builtin, in_place) in enumerate(r[:-1]):
            assert ring.shape == x.shape and in_place
            torch.testing.assert_close(ring, builtin)
            expected = sum(inputs[k][i] for k in range(world_size))  # not just "agrees with gloo"
            torch.testing.assert_close(ring, expected)
        factor = world_size * (world_size + 1) / 2  # sum over ranks of (rank + 1)
        torch.testing.assert_close(r[-1], torch.arange(12.0).reshape(3, 4) * factor)


def test_ring_all_reduce_is_a_no_op_on_one_rank():
    def one():
        x = torch.arange(5.0)
        return collectives.ring_all_reduce(x.clone()), x

    [(ring, x)] = launch.run(one, 1, timeout=30)
    torch.testing.assert_close(ring, x)


@pytest.mark.parametrize("world_size", [2, 3, 4, 5])
def test_ring_schedule_ends_with_every_rank_holding_the_full_sum(world_size):
    steps = collectives.ring_schedule(world_size)
    assert len(steps) == 1 + 2 * (world_size - 1)
    everyone = tuple(range(world_size))
    after_rs = steps[world_size - 1]["state"]
    for rank in range(world_size):  # reduce-scatter leaves chunk (rank + 1) % N complete on rank
        complete = [c for c in range(world_size) if after_rs[rank][c] == everyone]
        assert complete == [(rank + 1) % world_size]
    assert all(chunk == everyone for row in steps[-1]["state"] for chunk in row)
    for step in steps[1:]:  # each step, every rank sends exactly one chunk to its right
        assert sorted((src, dst) for src, dst, _ in step["sends"]) == [
            (r, (r + 1) % world_size) for r in range(world_size)
        ]


def test_ring_sends_two_n_minus_one_over_n_of_the_data():
    assert collectives.ring_bytes_sent(1000, 2) == 1000
    assert collectives.ring_bytes_sent(1000, 4) == 1500
    steps = collectives.ring_schedule(4)
    sends_per_rank = sum(1 for s in steps for src, _, _ in s["sends"] if src == 0)
    assert sends_per_rank * 1000 / 4 == collectives.ring_bytes_sent(1000, 4)  # chunks of size/N


def test_alpha_beta_fit_recovers_known_parameters():
    alpha, beta, world_size = 30e-6, 2e9, 3
    sizes = 1024 * 4 ** np.arange(9)  # 1 KB .. 64 MB
    exact = collectives.ring_cost(sizes, world_size, alpha, beta)
    fit = collectives.fit_alpha_beta(sizes, exact, world_size)
    assert fit.world_size == world_size
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert fit.beta_bytes_per_s == pytest.approx(beta, rel=1e-6)
    np.testing.assert_allclose(fit.predict(sizes), exact, rtol=1e-6)

    noisy = exact * np.random.default_rng(0).uniform(0.9, 1.1, size=len(sizes))  # ±10% noise
    fit = collectives.fit_alpha_beta(sizes, noisy, world_size)
    assert fit.alpha_s == pytest.approx(alpha, rel=0.2)
    assert fit.beta_bytes_per_s == pytest.approx(beta, rel=0.2)
    with pytest.raises(ValueError):
        collectives.fit_alpha_beta(sizes, exact, 1)


def test_ring_cost_formula():
    # 4 ranks: 6 messages of latency, and 1.5 x the bytes through the link
    assert collectives.ring_cost(4e6, 4, alpha=1e-5, beta=1e9) == pytest.approx(6e-5 + 6e-3)


def probe(sizes):
    return collectives.bandwidth_probe(sizes, repeats=2, op=("all_reduce", "ring"))


def test_bandwidth_probe_returns_the_same_rows_on_every_rank():
    sizes = [1024, 4096, 1 << 20]
    results = launch.run(probe, 2, sizes, timeout=60, threads=1)
    assert results[0] == results[1]  # the slowest rank's times, shared
    rows = results[0]
    assert [(r["op"], r["bytes"]) for r in rows] == [
        (op, b) for op in ("all_reduce", "ring") for b in sizes
    ]
    for row in rows:
        assert len(row["samples"]) == 2 and row["seconds"] == pytest.approx(
            np.median(row["samples"])
        )
        assert 0 < row["seconds"] < 10
    with pytest.raises(launch.WorkerError, match="unknown op"):
        launch.run(collectives.bandwidth_probe, 2, sizes, 1, "broadcast", timeout=30)


# --- lesson 04's figures: the spread of the repeats is drawn, nothing is hidden ------------------


def _errorbar_spans(ax):
    """(low, high) of every vertical error bar drawn on ``ax``."""
    spans = []
    for collection in ax.collections:
        for segment in getattr(collection, "get_segments", lambda: [])():
            (x0, y0), (x1, y1) = segment[0], segment[-1]
            if x0 == x1:
                spans.append((min(y0, y1), max(y0, y1)))
    return spans


def test_bandwidth_draws_each_sizes_spread_and_marks_noisy_points():
    import matplotlib.pyplot as plt

    from course_utils import measure, plots

    sizes = [1024, 4096, 16384]
    quiet = [measure.spread([1e-4, 1.05e-4, 1.1e-4])] * 3
    noisy = [measure.spread([1e-4, 2e-4, 5e-3])] * 3  # a repeat delayed by a time slice
    model = collectives.fit_alpha_beta(sizes, [1e-4, 1.1e-4, 1.3e-4], 2)
    fig = plots.bandwidth(sizes, {"gloo": quiet, "ring": noisy}, model=model)
    ax = fig.axes[0]
    spans = _errorbar_spans(ax)
    assert (pytest.approx(0.1), pytest.approx(5.0)) in spans  # ms: fastest to slowest repeat
    labels = ax.get_legend().get_texts()
    assert any("noisy" in t.get_text() for t in labels)
    assert any("alpha-beta model" in t.get_text() for t in labels)
    # the two series are side by side at each size, not on top of each other
    series = {line.get_label(): line.get_xdata()[0] for line in ax.lines}
    x_gloo, x_ring = series["gloo"], series["ring"]
    assert x_gloo < 1024 < x_ring
    # rates: the fastest repeat is the highest rate
    fig = plots.bandwidth(sizes, {"ring": noisy}, rate=True)
    spans = _errorbar_spans(fig.axes[0])
    assert (pytest.approx(1024 / 5e-3 / 1e9), pytest.approx(1024 / 1e-4 / 1e9)) in spans
    # plain numbers (one measurement per size) still work, without bars or a noisy entry
    fig = plots.bandwidth(sizes, [1e-4, 1.1e-4, 1.3e-4])
    assert _errorbar_spans(fig.axes[0]) == []
    assert not any("noisy" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    plt.close("all")


def test_step_costs_keeps_small_bars_visible_and_hatches_noisy_ones():
    import matplotlib.pyplot as plt

    from course_utils import measure, plots

    fig = plots.step_costs(
        ["CNN", "RNN"],
        {
            "compute": [
                measure.spread([0.030, 0.031, 0.032]),
                measure.spread([0.002, 0.003, 0.006]),
            ],
            "bucket": [2e-4, [1.5e-4, 1.6e-4, 1.7e-4]],
        },
        model={"bucket": [2.1e-4, 1.4e-4]},
    )
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # a 0.2 ms bar next to a 30 ms one
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert sorted(round(b.get_height(), 3) for b in bars) == [0.16, 0.2, 0.003 * 1e3, 31.0]
    hatched = [round(b.get_height(), 3) for b in bars if b.get_hatch()]
    assert hatched == [3.0]  # the RNN's compute: repeats 3x apart
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"compute", "bucket", "alpha-beta model's prediction"} <= set(texts)
    assert "noisy: repeats > 20% apart" in texts
    fig.canvas.draw()  # the legend sits outside the axes: it must still fit in the figure
    legend = ax.get_legend().get_window_extent()
    assert legend.x1 <= fig.bbox.x1 + 1
    plt.close("all")


def test_ring_scaling_splits_the_model_and_marks_the_crossing():
    import matplotlib.pyplot as plt

    from course_utils import plots

    model = collectives.AlphaBeta(alpha_s=1e-5, beta_bytes_per_s=1e9, world_size=2)
    nbytes = 1.6e5  # latency = bandwidth at N = bytes / (alpha beta) = 16
    fig = plots.ring_scaling([2, 4, 8, 16, 32, 64], nbytes, model)
    ax = fig.axes[0]
    total, latency, transfer = (line.get_ydata() for line in ax.lines[:3])
    np.testing.assert_allclose(total, latency + transfer)
    np.testing.assert_allclose(latency[0], 1e3 * 2 * 1e-5)  # ms, 2 ranks: 2 messages
    crossing = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(crossing) == 1 and crossing[0].get_xdata()[0] == pytest.approx(16)
    plt.close("all")


# Lesson 04 writes the ring all-reduce and the byte count by hand: same names, same signatures and
# the same results as the package's (the notebook's code is the package's code).
LESSON = Path(__file__).resolve().parents[1] / "notebooks" / "04_communication.ipynb"


def lesson_functions() -> dict:
    """The lesson's ``ring_all_reduce`` and ``ring_bytes_sent``, from its cells, executed alone."""
    wanted = ("ring_all_reduce", "ring_bytes_sent")
    return notebook_functions(LESSON, wanted, {"torch": torch, "dist": dist})


def test_the_lessons_functions_have_the_packages_signatures():
    lesson = lesson_functions()
    for name in ("ring_all_reduce", "ring_bytes_sent"):
        mine, package = (
            inspect.signature(lesson[name]),
            inspect.signature(getattr(collectives, name)),
        )
        assert list(mine.parameters) == list(package.parameters), name


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_the_lessons_byte_count_is_the_packages(world_size):
    ring_bytes_sent = lesson_functions()["ring_bytes_sent"]
    for nbytes in (4, 1200, 4800, 10**6):
        assert ring_bytes_sent(nbytes, world_size) == collectives.ring_bytes_sent(
            nbytes, world_size
        )


def lesson_ring_vs_package(shapes):
    ring_all_reduce = lesson_functions()["ring_all_reduce"]
    torch.manual_seed(dist.get_rank())
    out = []
    for shape in shapes:
        x = torch.randn(shape)
        mine, package = x.clone(), x.clone()
        returned = ring_all_reduce(mine)
        collectives.ring_all_reduce(package)
        out.append((mine, package, returned is mine))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_lessons_ring_all_reduce_gives_the_packages_sums(world_size):
    results = launch.run(lesson_ring_vs_package, world_size, SHAPES, timeout=60, threads=1)
    for rank_results in results:
        for mine, package, in_place in rank_results:
            assert in_place
            torch.testing.assert_close(mine, package, rtol=0, atol=0)  # same algorithm, same sums


def test_gradient_sync_costs_draws_compute_and_both_all_reduces_with_the_models_predictions():
    import matplotlib.pyplot as plt

    from course_utils import measure, plots

    model = collectives.AlphaBeta(alpha_s=1e-4, beta_bytes_per_s=1e9, world_size=2)
    tensor_bytes = {"cnn": [40000, 960], "rnn": [8192]}
    sync = {
        name: {
            "compute_s": measure.spread([0.03, 0.031]),
            "per_tensor_s": measure.spread([3e-4, 4e-4]),
            "bucket_s": measure.spread([2e-4, 2.5e-4]),
        }
        for name in tensor_bytes
    }
    ax = plots.gradient_sync_costs(sync, tensor_bytes, model).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "CNN (40 KB of gradients)",
        "RNN (8 KB of gradients)",
    ]
    diamonds = [line for line in ax.lines if line.get_marker() == "D"]
    per_tensor = [1e3 * (model.predict(40000) + model.predict(960)), 1e3 * model.predict(8192)]
    bucket = [1e3 * model.predict(40960), 1e3 * model.predict(8192)]
    np.testing.assert_allclose(diamonds[0].get_ydata(), per_tensor)
    np.testing.assert_allclose(diamonds[1].get_ydata(), bucket)
    plt.close("all")


def test_the_all_to_all_costs_one_message_per_other_rank():
    assert collectives.all_to_all_cost(1e6, 2, 1e-4, 1e9) == pytest.approx(1e-4 + 1e-3)
    assert collectives.all_to_all_cost(0, 8, 1e-4, 1e9) == pytest.approx(7e-4)
