"""Lesson 09: its figures (Megatron's MLP split, a device mesh's groups, the measured
tensor-parallel speedups with their spreads), and its hand-written layers against the package's
(the same names and signatures, the same outputs and gradients).

A lesson's ``test_<subject>_figures.py`` tests what the lesson draws, and the code it writes by hand
against the package's; the package itself is tested in ``test_<subject>.py`` (here
``test_tensor_parallel.py``)."""

import inspect
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import course_utils as cu
from course_utils import tensor_parallel as tp


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


# --- the lesson's hand-written layers are the package's --------------------------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "09_tensor_parallel.ipynb"
DEFINED = ("class CopyToParallel", "def block_of", "class ParallelMLP")


def lesson_layers() -> dict:
    """The lesson's cells that define f, g, the two split linear layers and the two blocks, run."""
    cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"]]
    namespace = {"torch": torch, "dist": dist, "nn": nn, "F": F}
    for name in DEFINED:
        (cell,) = [c for c in cells if c.startswith(name) or f"\n{name}" in c]
        exec(compile(cell, str(NOTEBOOK), "exec"), namespace)
    return namespace


def lesson_and_package(part: str) -> list:
    """In a worker: block 0's ``part`` split by the lesson's classes and by the package's, on the
    same input and loss: (output, input gradient, parameter gradients, split dims) of each."""
    lesson = lesson_layers()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = []
    for classes in (lesson, vars(tp)):
        whole = getattr(cu.models.build("transformer", seed=0).blocks[0], part)
        cls = classes["ParallelMLP" if part == "mlp" else "ParallelAttention"]
        layer = cls(whole, rank, world_size, None)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 16, 64, generator=g).requires_grad_()
        y = layer(x)
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        splits = {n: m.split for n, m in layer.named_modules() if hasattr(m, "split")}
        out.append((y.detach(), x.grad, grads, splits))
    return out


@pytest.mark.parametrize("part", ["mlp", "attn"])
def test_the_lessons_split_layers_give_the_packages_outputs_and_gradients(part):
    for rank, (mine, package) in enumerate(cu.launch.run(lesson_and_package, 2, part, threads=1)):
        (y, x_grad, grads, splits), (y_p, x_grad_p, grads_p, splits_p) = mine, package
        torch.testing.assert_close(y, y_p, rtol=0, atol=0, msg=f"rank {rank}: output")
        torch.testing.assert_close(x_grad, x_grad_p, rtol=0, atol=0, msg=f"rank {rank}")
        assert grads.keys() == grads_p.keys() and splits == splits_p
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_p[name], rtol=0, atol=0, msg=name)


def test_the_lessons_classes_have_the_packages_names_and_signatures():
    lesson = lesson_layers()
    names = ["CopyToParallel", "ReduceFromParallel", "ColumnParallelLinear", "RowParallelLinear"]
    for name in [*names, "ParallelMLP", "ParallelAttention", "block_of"]:
        mine, package = lesson[name], getattr(tp, name)
        for method in ("forward", "backward", "__init__") if isinstance(mine, type) else (None,):
            if method and not hasattr(package, method):
                continue
            a = inspect.signature(getattr(mine, method) if method else mine)
            b = inspect.signature(getattr(package, method) if method else package)
            assert list(a.parameters) == list(b.parameters), (name, method)
    for n, world_size in [(8, 2), (12, 4), (256, 2)]:
        for rank in range(world_size):
            assert lesson["block_of"](n, rank, world_size) == tp.block_of(n, rank, world_size)
