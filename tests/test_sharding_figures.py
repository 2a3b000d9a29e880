"""Lesson 08: its figures (the model state per rank against the world size, the bytes a step sends
and each rank holds, against the formula), its hand-written ZeRO-1 against the package's, and
``sharding.probes``, which measures what the lesson reads against the formulas."""

import math
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import notebook_functions

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


# --- the lesson's hand-written ZeRO-1 is the package's ---------------------------------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "08_sharding.ipynb"


def lesson_functions(*names: str) -> dict:
    """The notebook's definitions of ``names``, executed: their functions, by name."""
    return notebook_functions(NOTEBOOK, names, {"math": math, "torch": torch, "dist": dist, "F": F})


def test_the_lessons_shard_and_padding_are_the_packages():
    mine = lesson_functions("shard_of", "padded")
    param = torch.arange(15.0).view(5, 3)
    for world_size in (1, 2, 4, 16):
        for rank in range(world_size):
            a = mine["shard_of"](param, rank, world_size)
            b = sharding.shard_of(param, rank, world_size)
            assert torch.equal(a, b) and a.data_ptr() == b.data_ptr() or a.numel() == b.numel() == 0
    assert torch.equal(mine["padded"](torch.ones(3), 5), sharding.padded(torch.ones(3), 5))
    assert sharding.padded(torch.ones(3), 5).tolist() == [1, 1, 1, 0, 0]


def test_the_lessons_zero1_step_trains_exactly_like_the_packages_and_the_zero_class():
    step_by_hand = lesson_functions("shard_of", "padded", "zero1_step")["zero1_step"]

    def worker():
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        X, y = torch.randn(8, 7), torch.randint(0, 3, (8,))
        out = {}
        for how in ("lesson", "package", "class"):
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
            )
            shards = [sharding.shard_of(p, rank, world) for p in model.parameters()]
            optimizer = torch.optim.AdamW(shards, lr=0.1)
            zero = sharding.ZeRO1(model, partial(torch.optim.AdamW, lr=0.1))
            losses = []
            for _ in range(3):
                Xr, yr = X[rank::world], y[rank::world]
                if how == "class":
                    loss, _ = zero.train_step(model, zero.optimizer, Xr, yr)
                else:
                    fn = step_by_hand if how == "lesson" else sharding.zero1_step
                    loss, _ = fn(model, optimizer, Xr, yr, shards)
                losses.append(loss.item())
            out[how] = (losses, [p.detach().clone() for p in model.parameters()])
        return out

    for out in cu.launch.run(worker, 2, device="cpu"):
        for how in ("package", "class"):
            assert out[how][0] == out["lesson"][0]
            for a, b in zip(out[how][1], out["lesson"][1]):
                assert torch.equal(a, b)  # the same arithmetic, bit for bit


# --- sharding.probes ------------------------------------------------------------------------------


def test_saved_parameters_finds_the_weights_backward_needs_and_not_the_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    X = torch.randn(5, 4)  # with a gradient: the first weight is needed for the gradient of X
    saved = sharding.probes.saved_parameters(model, X.requires_grad_())
    assert "0.bias" not in saved and "2.bias" not in saved
    assert "2.weight" in saved  # the gradient of the first layer's output needs it
    assert "0.weight" in saved  # the gradient of X needs it


def test_zero3_traffic_prediction_is_what_zero3_sends():
    def worker():
        model = cu.models.build("cnn", seed=0)
        X = torch.randn(4, 1, 28, 28)
        predicted = sharding.probes.zero3_sent_per_step(cu.models.build("cnn", seed=0), X, 2)
        zero = sharding.ZeRO3(model, partial(torch.optim.SGD, lr=0.1))
        zero.train_step(model, zero.optimizer, X, torch.zeros(4, dtype=torch.long))
        return predicted, zero.traffic.bytes_sent

    for predicted, sent in cu.launch.run(worker, 2, device="cpu"):
        assert predicted == pytest.approx(sent, rel=1e-9)
        num_params = cu.models.count_parameters(cu.models.build("cnn"))
        assert sent < sharding.comm_per_rank(num_params, 2, 3) * 1.01


def test_fsdp_bytes_on_rank_counts_shard0_rows_as_fsdp_keeps_them():
    def worker():
        from torch.distributed.device_mesh import init_device_mesh

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        expected = sharding.probes.fsdp_bytes_on_rank(model, 2, dist.get_rank())
        sharding.fully_sharded(model, init_device_mesh("cpu", (2,)), units=[model[0]])
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(4, 6)).sum().backward()
        optimizer.step()
        return expected, sharding.state_bytes(model.parameters(), optimizer)["total"]

    held = cu.launch.run(worker, 2, device="cpu")
    for expected, got in held:
        assert got == expected
    assert held[0][0] > held[1][0]  # 5 and 3 rows: rank 0 takes 3 and 2, rank 1 2 and 1


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_pieces_reads_where_each_piece_of_a_tensor_is_saved(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(12.0).view(4, 3)}, checkpoint_id=str(tmp_path), no_dist=True)
    ((rows, shape, file),) = sharding.probes.dcp_pieces(tmp_path, "w")
    assert rows == "0..3" and shape == (4, 3) and (tmp_path / file).is_file()


def test_watch_zero3_sees_no_weight_once_a_layer_has_run():
    seen = cu.launch.run(sharding.probes.watch_zero3, 2, 4, device="cpu")[0]
    assert seen["conv1_while_fc_runs"] is None and seen["whole_left"] == 0
    assert seen["conv1_running"] == tuple(cu.models.build("cnn").conv1.weight.shape)
    assert seen["forward"]["all_gather"] == len(seen["shards"])  # one per tensor
    assert seen["backward"]["reduce_scatter"] == len(seen["shards"])
    assert seen["backward"]["all_gather"] < len(seen["shards"])  # only the saved weights again


def test_held_by_strategy_matches_the_formula_on_two_ranks():
    ranks = cu.launch.run(sharding.probes.held_by_strategy, 2, 8, device="cpu")
    model = cu.models.build("transformer", seed=0)
    num_params, tensors = cu.models.count_parameters(model), len(list(model.parameters()))
    for rank, held in enumerate(ranks):
        assert set(held) == set(sharding.probes.STRATEGIES)
        for name, stage in sharding.probes.STRATEGIES.items():
            formula = sharding.memory_per_rank(num_params, 2, stage, 4, 4, 8)
            if name == "FSDP":
                assert held[name]["total"] == sharding.probes.fsdp_bytes_on_rank(model, 2, rank)
            else:  # step counters, and less than one value of padding per tensor
                assert abs(held[name]["total"] - formula) <= 20 * tensors
        assert len({h["activations"] for h in held.values()}) == 1  # the same under every one


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_step_collectives_counts_one_gather_per_unit_and_pass(reshard):
    def worker():
        from torch.distributed.device_mesh import init_device_mesh

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
        whole = 4 * sum(p.numel() for p in model.parameters())
        sharding.fully_sharded(model, init_device_mesh("cpu", (2,)), reshard, units=[model[0]])
        X, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
        return sharding.probes.fsdp_step_collectives(model, X, y), whole

    for seen, whole in cu.launch.run(worker, 2, device="cpu"):
        assert seen["forward"] == {"all-gathers": 2, "reduce-scatters": 0}  # the unit, the root
        assert seen["backward"]["reduce-scatters"] == 2
        assert seen["backward"]["all-gathers"] == (2 if reshard else 0)
        assert seen["whole_between"] == (0 if reshard else whole)
