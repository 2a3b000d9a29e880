"""Lessons 11 and 12's numbers: the compute-to-communication ratio and the decision guide
(ZeRO/FSDP memory: tests/test_sharding.py)."""

import math

import numpy as np
import pytest

from course_utils import collectives, faq

GB = 1e9


def test_compute_to_communication_ratio_grows_with_the_batch_per_worker():
    args = dict(flops_per_sample=1e7, device_flops=1e11, num_params=1e6, alpha=1e-4, beta=1e9)
    times = faq.data_parallel_times(batch_per_worker=[8, 16, 32], world_size=4, **args)
    assert times["comm_s"] == pytest.approx(collectives.ring_cost(4e6, 4, 1e-4, 1e9))
    assert times["compute_s"] == pytest.approx([3 * 1e7 * b / 1e11 for b in (8, 16, 32)])
    assert times["ratio"][1] == pytest.approx(2 * times["ratio"][0])  # linear in the batch
    one = faq.data_parallel_times(batch_per_worker=8, world_size=1, **args)
    assert one["comm_s"] == 0 and math.isinf(one["ratio"])  # nothing to communicate alone


def job(**changes) -> dict:
    """A job for the decision guide: 100M parameters on 8 devices of 16 GB and 100 TFLOP/s."""
    base = dict(
        num_params=100e6,
        flops_per_sample=2 * 100e6 * 512,  # a transformer: 2 FLOPs per parameter per token
        activation_bytes_per_sample=50e6,
        boundary_bytes_per_sample=512 * 1024 * 2,  # (tokens, hidden) in fp16 between stages
        batch_size=256,
        device_memory=16 * GB,
        device_flops=100e12,
        alpha=5e-6,
        beta=100e9,  # NVLink-class
        num_microbatches=8,
    )
    return {**base, **changes}


def test_the_decision_guide_picks_data_parallel_when_the_model_fits_and_links_are_fast():
    choice = faq.choose_parallelism(8, **job())
    assert (choice.strategy, choice.stages, choice.replicas) == ("data", 1, 8)
    dp = faq.data_parallel_times(
        job()["flops_per_sample"], 256 / 8, 100e12, 100e6, 8, alpha=5e-6, beta=100e9
    )
    exposed = max(dp["comm_s"] - 2 / 3 * dp["compute_s"], 0)  # what backward can't hide
    assert choice.step_s == pytest.approx(dp["compute_s"] + exposed)  # the same cost model
    no_overlap = faq.plan(1, 8, **job(), overlap=False)
    assert no_overlap.step_s == pytest.approx(dp["compute_s"] + dp["comm_s"])


def test_the_decision_guide_splits_the_model_when_it_does_not_fit():
    big = job(num_params=3e9, flops_per_sample=2 * 3e9 * 512)  # 48 GB of fp32 Adam state
    assert faq.plan(1, 8, **big).step_s == math.inf  # data parallel alone can't hold it
    choice = faq.choose_parallelism(8, **big)
    assert choice.strategy == "both" and choice.stages * choice.replicas == 8
    assert choice.memory_per_device <= 16 * GB
    assert faq.choose_parallelism(4, **big).strategy == "pipeline"  # all 4 devices are needed
    huge = job(num_params=30e9)
    assert faq.choose_parallelism(8, **huge).strategy == "does not fit"


def test_the_decision_guide_prefers_a_pipeline_on_a_slow_network():
    # small activations between stages, a large gradient to all-reduce, 1 Gbit/s Ethernet
    slow = job(beta=125e6, alpha=50e-6, boundary_bytes_per_sample=4096)
    choice = faq.choose_parallelism(8, **slow)
    assert choice.stages > 1
    assert choice.step_s < faq.plan(1, 8, **slow).step_s


# Lesson 11's figures ----------------------------------------------------------------------------


def test_the_cost_model_plot_gives_each_model_one_colour_solid_measured_and_dashed_modelled():
    from matplotlib.colors import to_hex

    from course_utils import measure, plots

    batch = [4, 16, 64]
    measured = {
        "linear": [measure.spread([0.5, 0.6]), measure.spread([0.5, 0.9]), 0.7],
        "cnn": [measure.spread([10, 11]), measure.spread([40, 42]), measure.spread([150, 160])],
    }
    modelled = {"linear": [0.1, 0.4, 1.6], "cnn": [12, 48, 190]}
    fig = plots.cost_model(batch, measured, modelled, title="ratio")
    ax = fig.axes[0]
    lines = [line for line in ax.lines if len(line.get_xdata()) == len(batch)]
    for name in measured:  # the measured medians and the modelled ratios, in one colour
        solid = [
            line for line in lines if list(line.get_ydata()) == [float(v) for v in measured[name]]
        ]
        dashed = [line for line in lines if list(line.get_ydata()) == modelled[name]]
        assert len(solid) == 1 and len(dashed) == 1
        assert solid[0].get_linestyle() == "-" and dashed[0].get_linestyle() == "--"
        assert to_hex(solid[0].get_color()) == to_hex(dashed[0].get_color())
    colours = {to_hex(line.get_color()) for line in lines if line.get_linestyle() == "--"}
    assert len(colours) == 2  # one colour per model
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["linear", "cnn"] and "cost model" in labels
    assert "noisy: repeats > 20% apart" in labels  # 0.5-0.9 disagree by more than 20%
    assert ax.get_yscale() == "log"


def test_rank_steps_keeps_coinciding_ranks_visible():
    from course_utils import measure, plots

    same = [measure.spread([0.1, 0.11]), measure.spread([0.15, 0.16])]
    fig = plots.rank_steps(
        [0, 100], {"rank 0": same, "rank 1": same}, reference={"expected": [0.1, 0.2]}
    )
    ax = fig.axes[0]
    r0, r1 = (
        next(ln for ln in ax.lines if ln.get_label() == name) for name in ("rank 0", "rank 1")
    )
    assert list(r0.get_ydata()) == list(r1.get_ydata())  # the same values...
    assert list(r0.get_xdata()) != list(r1.get_xdata())  # ...drawn a little apart
    assert r0.get_marker() != r1.get_marker() and r0.get_linestyle() != r1.get_linestyle()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["rank 0", "rank 1", "expected"]


def test_attribution_and_code_figures_draw_what_they_are_given():

    from course_utils import plots

    rng = np.random.default_rng(0)
    images = rng.random((3, 28, 28))
    maps = {"saliency": list(rng.random((3, 28, 28))), "SHAP": list(rng.normal(size=(3, 28, 28)))}
    fig = plots.attributions(images, maps, titles=["a", "b", "c"], signed=("SHAP",))
    assert len(fig.axes) == 3 * 3  # image + 2 methods, 3 columns
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["image", "saliency", "SHAP"]
    shap = fig.axes[6].images[0]
    assert shap.get_cmap().name == "RdBu_r" and shap.norm.vmin == -shap.norm.vmax

    pairs = {("a", "b"): {"spearman": 0.5, "overlap": 0.25}}
    fig = plots.agreement_matrix(["a", "b"], pairs, k=3)
    matrix = fig.axes[0].images[0].get_array()
    assert matrix[0, 1] == matrix[1, 0] == 0.5 and matrix[0, 0] == 1.0
    assert fig.axes[1].images[0].get_array()[0, 1] == 0.25
    assert "0.50" in [t.get_text() for t in fig.axes[0].texts]

    codes, labels = rng.normal(size=(50, 2)), np.arange(50) % 10
    decoded = np.zeros((4, 5, 28, 28))
    decoded[0, 0] = 1.0  # the bottom-left code of the grid
    fig = plots.code_map(codes, labels, decoded, extent=(-2, 2, -2, 2))
    mosaic = fig.axes[1].images[0].get_array()
    assert mosaic.shape == (4 * 28, 5 * 28)
    assert mosaic[-1, 0] == 1.0 and mosaic[0, 0] == 0.0  # row 0 of the grid is drawn at the bottom
