"""Lesson 10: its figures (attention's memory, the ring's timeline, the ranks' balance, the bytes
of ring and Ulysses, the experts' load, the balancing-loss sweep, a cluster's layout) drawn from
given numbers, and the code it writes by hand against the package's: the block and the merge,
the ring's forward, the all-to-all and the experts' dispatch (the same names and signatures, the
same results).

The experiments themselves are tested in ``test_long_context.py``; the rooms in
``test_context_parallel.py``, ``test_moe.py`` and ``test_expert_parallel.py``."""

import inspect
import math
from functools import partial

import matplotlib.colors as mcolors
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import ROOT, notebook_functions

import course_utils as cu
from course_utils import expert_parallel, moe
from course_utils.context_parallel import ring, split

NOTEBOOK = ROOT / "notebooks" / "10_long_sequences_and_experts.ipynb"
BY_HAND = ("block_forward", "merge", "ring_attention", "all_to_all", "dispatch")


def lesson() -> dict:
    """The lesson's hand-written functions, defined alone (the cells' measurements not run)."""
    namespace = {"torch": torch, "dist": dist, "F": F, "split": split, "cu": cu, "math": math}
    return notebook_functions(NOTEBOOK, BY_HAND, namespace)


# --- the figures -------------------------------------------------------------------------------


def test_the_memory_figure_draws_each_series_dashed_at_cp_2_with_both_slopes():
    lengths = [128, 256, 512]
    series = {
        "scores whole, 1 process": [4e6, 16e6, 64e6],
        "ring written out, cp 1": [2e6, 8e6, 32e6],
        "ring written out, cp 2": [0.6e6, 2.2e6, 8.4e6],
        "ring flash kernel, cp 2": [0.5e6, 1e6, 2e6],
    }
    fig = cu.plots.attention_memory(lengths, series)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(series) | {"slope of T^2", "slope of T^1"} == set(lines)
    assert lines["ring written out, cp 2"].get_linestyle() == "--"
    assert lines["ring written out, cp 1"].get_linestyle() == "-"
    same = lines["ring written out, cp 1"].get_color(), lines["ring written out, cp 2"].get_color()
    assert same[0] == same[1] != lines["scores whole, 1 process"].get_color()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    slope = lines["slope of T^2"].get_ydata()
    assert slope[-1] / slope[0] == pytest.approx(16)  # 128 -> 512: (4x)^2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["128", "256", "512"]


def test_the_timeline_draws_a_lane_per_rank_a_bar_per_span_and_skips_the_steps():
    lane = [
        {"kind": "step", "phase": "step", "start": 0.0, "stop": 10.0},
        {"kind": "post", "phase": "forward", "start": 0.0, "stop": 0.1},
        {"kind": "block", "phase": "forward", "start": 0.1, "stop": 4.0},
        {"kind": "wait", "phase": "forward", "start": 4.0, "stop": 4.5},
        {"kind": "block", "phase": "backward", "start": 4.5, "stop": 9.0},
        {"kind": "alone", "phase": "alone", "start": 11.0, "stop": 12.0},
    ]
    fig = cu.plots.ring_timeline({0: lane, 1: lane})
    (ax,) = fig.axes
    bars = ax.patches
    assert len(bars) == 2 * 4  # per rank: 2 blocks, a wait, a bare transfer; no step bar
    colors = {mcolors.to_hex(b.get_facecolor()) for b in bars}
    assert {mcolors.to_hex(c) for c in ("tab:blue", "tab:orange", "tab:red", "0.6")} == colors
    assert min(b.get_x() for b in bars) == pytest.approx(0.1)  # times from the first span
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == [
        "block, forward",
        "block, backward",
        "wait",
        "transfer alone",
        "post (send + recv)",
    ]


def test_the_balance_figure_shows_shares_of_work_and_measured_spreads():
    work = {"contiguous": [1, 3], "zigzag": [2, 2]}
    spread = cu.measure.spread
    compute = {"contiguous": [spread([1, 2, 3]), spread([5, 6])], "zigzag": [4.0, 4.0]}
    fig = cu.plots.rank_balance(work, compute)
    left, right = fig.axes
    assert [round(b.get_height()) for b in left.patches] == [25, 75, 50, 50]
    assert [b.get_height() for b in right.patches] == [2, 5.5, 4.0, 4.0]
    assert len(right.containers) == 4  # two bar groups, two error bars
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["contiguous", "zigzag"]


def test_the_bytes_figure_draws_the_formulas_and_the_counted_points():
    fig = cu.plots.context_bytes(
        [2, 4, 8], {"ring": [2**20, 1.5 * 2**20, 1.75 * 2**20], "Ulysses": [2**20, 0.75 * 2**20, 0.4375 * 2**20]},
        counted={"ring": (2, 2**20)},
    )  # fmt: skip
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"ring (formula)", "Ulysses (formula)", "ring, counted"}
    assert list(lines["ring, counted"].get_xydata()[0]) == [2, 1.0]  # in MiB
    assert list(lines["Ulysses (formula)"].get_ydata()) == [1.0, 0.75, 0.4375]


def test_the_expert_load_draws_routed_and_kept_per_layer_and_the_capacity():
    run = {"routed": [[5, 1, 1, 1], [2, 2, 2, 2]], "kept": [[3, 1, 1, 1], [2, 2, 2, 2]]}
    fig = cu.plots.expert_load({"one": run | {"capacity": 3}, "two": run | {"capacity": 4}})
    assert [ax.get_title() for ax in fig.axes] == ["one", "two"]
    ax = fig.axes[0]
    heights = [b.get_height() for b in ax.patches]
    assert heights == [5, 1, 1, 1, 2, 2, 2, 2, 3, 1, 1, 1, 2, 2, 2, 2]  # routed, then kept
    assert ax.patches[4].get_x() - ax.patches[3].get_x() == pytest.approx(2)  # a gap per layer
    (capacity,) = [line for line in ax.lines if line.get_label() == "capacity"]
    assert list(capacity.get_ydata()) == [3, 3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer 0", "layer 1"]


def test_the_sweep_figure_draws_a_line_per_capacity_factor_and_marks_noise():
    spread = cu.measure.spread
    points = [
        {"aux_weight": w, "capacity_factor": c, "imbalance": spread([2 - w, 2.5 - w])}
        | {"dropped": spread([0.1 / c]), "accuracy": spread([0.8, 0.81])}
        for w in (0.0, 0.01, 0.1)
        for c in (1.0, 2.0)
    ]
    fig = cu.plots.moe_sweep(points)
    assert [ax.get_title() for ax in fig.axes] == ["Imbalance (1 = even)", "Dropped", "Accuracy"]
    for ax, noisy in zip(fig.axes, (True, False, False)):  # the imbalance's repeats: 25% apart
        names = [t.get_text() for t in ax.get_legend().get_texts()]
        assert names[:2] == ["capacity factor 1", "capacity factor 2"]
        assert ("noisy: repeats > 20% apart" in names) == noisy
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.01", "0.1"]
    dropped = fig.axes[1].lines[0].get_ydata()
    assert list(dropped) == pytest.approx([10, 10, 10])  # a fraction, drawn in %


def test_the_cluster_layout_numbers_every_gpu_and_names_each_node():
    fig = cu.plots.cluster_layout({"dp": 2, "cp": 2, "tp": 4}, gpus_per_node=8)
    (ax,) = fig.axes
    words = [t.get_text() for t in ax.texts]
    assert sorted(int(w) for w in words if w.isdigit()) == list(range(16))
    assert [w for w in words if w.startswith("node")] == ["node 0: dp 0", "node 1: dp 1"]
    frames = [p for p in ax.patches if not p.get_fill()]
    assert len(frames) == 4  # one frame per tensor-parallel group of 4
    assert "tp groups framed in red, cp index by colour" in ax.get_title()


# --- the lesson's hand-written code is the package's ---------------------------------------------


def test_the_lessons_functions_have_the_packages_names_and_signatures():
    mine = lesson()
    package = {
        "block_forward": ring.block_forward,
        "merge": ring._merge,
        "ring_attention": ring.ring_attention,
        "all_to_all": expert_parallel.all_to_all,
        "dispatch": expert_parallel.dispatch,
    }
    for name, theirs in package.items():
        assert list(inspect.signature(mine[name]).parameters) == list(
            inspect.signature(theirs).parameters
        ), name


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("diagonal", [False, True])
def test_the_lessons_block_and_merge_give_the_packages(fused, diagonal, monkeypatch):
    monkeypatch.setattr(ring, "FUSED", fused)
    mine = lesson()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 4, generator=g) for _ in range(3))
    got, want = (
        mine["block_forward"](q, k, v, diagonal, 0.5),
        ring.block_forward(q, k, v, diagonal, 0.5),
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    states = [(torch.randn(2, 3, 8, 4, generator=g), torch.randn(2, 3, 8, generator=g))]
    states.append(tuple(x.clone() for x in states[0]))
    rows = slice(2, 6)
    block = (torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, generator=g))
    mine["merge"](*states[0], rows, *block)
    ring._merge(*states[1], rows, *block)
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def rings_forward(layout: str, causal: bool) -> tuple:
    """In a worker: this rank's output of the lesson's ring and of the package's."""
    mine = lesson()
    q, k, v, _, held = cu.long_context.local_inputs(48, layout, batch=2, heads=2, head_dim=8)
    q, k, v = q.detach(), k.detach(), v.detach()
    return mine["ring_attention"](q, k, v, held, None, causal), ring.ring_attention(
        q, k, v, held, None, causal
    )


@pytest.mark.filterwarnings("ignore:3 workers on")  # 3 ranks on 2 cores: still exact
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("layout", split.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_the_lessons_ring_gives_the_packages_outputs(ranks, layout, causal):
    for mine, package in cu.launch.run(
        rings_forward, ranks, layout, causal, threads=1, device="cpu"
    ):
        torch.testing.assert_close(mine, package, rtol=1e-5, atol=1e-6)


def dispatches(images: torch.Tensor) -> dict:
    """In a worker: the lesson's all-to-all against the package's with uneven splits, and a
    mixture of experts over 2 ranks dispatched by the package, then by the lesson."""
    from torch.distributed.device_mesh import init_device_mesh

    mine, rank = lesson(), dist.get_rank()
    x = torch.arange(10.0).view(5, 2) + 100 * rank
    send, recv = ([1, 4], [1, 2]) if rank == 0 else ([2, 3], [4, 3])  # uneven both ways
    found = {
        "a2a": (
            mine["all_to_all"](x, send, recv, None),
            expert_parallel.all_to_all(x, send, recv, None),
        )
    }
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)
    model = expert_parallel.apply(moe.MoETransformer(depth=2, capacity_factor=0.8), mesh)
    half = images[cu.data.shard(torch.arange(len(images)), rank, 2)]
    with torch.no_grad():
        found["package"] = model(half)
        for layer in moe.moe_layers(model):
            layer.dispatch = partial(mine["dispatch"], layer, mesh)
        found["lesson"] = model(half)
    found["dropped"] = sum(layer.stats["dropped"] for layer in moe.moe_layers(model))
    return found


def test_the_lessons_all_to_all_and_dispatch_give_the_packages():
    images = cu.data.mnist("train", limit=16)[0]
    for rank, found in enumerate(cu.launch.run(dispatches, 2, images, threads=1, device="cpu")):
        mine, package = found["a2a"]
        torch.testing.assert_close(mine, package, rtol=0, atol=0)
        assert len(mine) == (3 if rank == 0 else 7)
        torch.testing.assert_close(found["lesson"], found["package"], rtol=0, atol=0)
        assert found["dropped"] > 0  # capacity 0.8: the check covers dropped choices
