"""Lessons 12 and 13's figures (course_utils.plots.challenges), drawn from given numbers: the cost
model against measurements, ranks' step times, attribution maps and an autoencoder's code."""

import numpy as np


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
