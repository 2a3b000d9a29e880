"""Lesson 07's numbers: ZeRO/FSDP memory (against the paper and against PyTorch's own FSDP), the
compute-to-communication ratio, and the decision guide."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_utils import collectives, data, faq, launch, models

GB = 1e9
FP32_ADAM = dict(param_bytes=4, grad_bytes=4, optimizer_bytes=8)  # weights, grads, Adam's m and v


def test_zero_memory_matches_the_papers_example():
    # ZeRO paper, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)
    expected_gb = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected_gb.items():
        assert faq.zero_memory_per_gpu(7.5e9, 64, stage) / GB == pytest.approx(gb, rel=0.02)


def test_zero_memory_shrinks_with_each_stage_and_broadcasts():
    world_sizes = [1, 2, 8, 64]
    per_stage = [faq.zero_memory_per_gpu(1e9, world_sizes, stage) for stage in range(4)]
    for a, b in zip(per_stage, per_stage[1:]):
        assert (b <= a).all()
    assert per_stage[3] == pytest.approx(per_stage[0] / np.array(world_sizes))  # all of it sharded
    assert (per_stage[0] == per_stage[0][0]).all()  # plain DDP: world size does not help
    with pytest.raises(ValueError):
        faq.zero_memory_per_gpu(1e9, 8, stage=4)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of weights, gradients and optimizer state (local shards only)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 (FSDP's DTensor)
    tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
    tensors += [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def one_adam_step(shard: bool) -> tuple[int, int]:
    """Build the CNN (sharded with FSDP2 when ``shard``), take one Adam step; return the
    parameter count and this rank's bytes of state."""
    model = models.build("cnn", seed=0)
    num_params = models.count_parameters(model)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.conv1, model.conv2, model.fc):
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
    X, y = data.mnist("train", limit=32)
    X, y = X[rank::world_size], y[rank::world_size]
    F.cross_entropy(model(X), y).backward()
    optimizer.step()
    return num_params, state_bytes(model, optimizer)


def test_zero_memory_equals_what_pytorch_holds_unsharded_and_with_fsdp():
    num_params, held = one_adam_step(shard=False)
    assert held == faq.zero_memory_per_gpu(num_params, 1, stage=0, **FP32_ADAM)
    per_rank = launch.run(one_adam_step, 2, True, timeout=120)  # FSDP2 full sharding = ZeRO-3
    for num_params, held in per_rank:
        expected = faq.zero_memory_per_gpu(num_params, 2, stage=3, **FP32_ADAM)
        assert held == pytest.approx(expected, rel=1e-3)  # a shard may carry a little padding


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


# Lesson 07's figures ----------------------------------------------------------------------------


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
    import numpy as np

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
