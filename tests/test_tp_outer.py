"""--tp-outer (course_utils.parallelize.Axes.mesh): the tensor-parallel dimension outermost, so
that a tensor-parallel group's ranks lie apart (across the nodes under torchrun) and each
data-parallel group is consecutive ranks (inside a node). The groups are the ones meant, a run
trains like one process, and the flag is refused where it places nothing."""

import pytest
import torch
import torch.distributed as dist
from test_composed_axes import COMMON, one_process

import course_utils as cu
from course_utils.config import RunConfig, UsageError
from course_utils.parallelize import Axes, data_ranks, replicas

pytestmark = pytest.mark.filterwarnings("ignore:4 workers on")  # 4 ranks on 2 cores: still exact


def groups(axes: Axes) -> dict[str, list[int]]:
    """This rank's process groups along each axis of ``axes.mesh()``, as global ranks."""
    mesh = axes.mesh("cpu")
    ranks = lambda m: dist.get_process_group_ranks(m.get_group())  # noqa: E731
    named = {dim: ranks(mesh[dim]) for dim in ("tp", "cp", "dp") if mesh[dim].size() > 1}
    return named | {"replicas": ranks(replicas(mesh)), "data": ranks(data_ranks(mesh))}


def all_groups(axes: Axes) -> dict[str, set[tuple[int, ...]]]:
    """Every rank's groups, as sets of rank tuples by axis (4 workers)."""
    found = {}
    for mine in cu.launch.run(groups, 4, axes, timeout=120, threads=1):
        for name, ranks in mine.items():
            found.setdefault(name, set()).add(tuple(ranks))
    return found


APART, ADJACENT = {(0, 2), (1, 3)}, {(0, 1), (2, 3)}


@pytest.mark.parametrize("outer", [True, False], ids=["tp outer", "tp inner"])
def test_tp_outer_puts_tensor_parallel_ranks_apart_and_replicas_side_by_side(outer):
    tp, dp = (APART, ADJACENT) if outer else (ADJACENT, APART)
    found = all_groups(Axes(dp=2, tp=2, tp_outer=outer))
    assert found == {"tp": tp, "dp": dp, "replicas": dp, "data": dp}


def test_tp_outer_keeps_the_context_parallel_ring_inside_with_data_parallel():
    """dp 1 x cp 2 x tp 2: the ranks of one tensor-parallel index (here a ring) are consecutive;
    the replicas are the ring (context-parallel ranks average like replicas), and every rank
    reads the same images (one data rank)."""
    found = all_groups(Axes(cp=2, tp=2, tp_outer=True))
    assert found == {
        "tp": APART,
        "cp": ADJACENT,
        "replicas": ADJACENT,
        "data": {(0,), (1,), (2,), (3,)},
    }


def test_the_cli_trains_with_tp_outer_like_one_process():
    argv = ["--model", "transformer", "--parallel", "ddp", "--tp", "2", "--tp-outer"]
    argv += ["--nproc", "4", "--batch-size", str(COMMON["batch_size"]), "--steps", "3"]
    argv += ["--seed", "2", "--optimizer", "adamw", "--lr", "3e-3"]
    cfg = cu.config.parse(argv)
    assert cfg.tp_outer
    run = cu.train.run(cfg, progress=False)
    torch.testing.assert_close(
        run["losses"], one_process("transformer")["losses"], rtol=1e-4, atol=0
    )
    assert run["mesh"] == {"dp": 2, "ep": 1, "cp": 1, "tp": 2, "tp_outer": True}


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(parallel="ddp", nproc=2), "needs --parallel ddp or fsdp with --tp 2"),
        (dict(parallel="fsdp", nproc=2, tp=1), "needs --parallel ddp or fsdp with --tp 2"),
        (dict(parallel="pipeline", nproc=2), "needs --parallel ddp or fsdp with --tp 2"),
        (dict(parallel="tp", nproc=2), "every rank is on the tensor-parallel axis"),
        (dict(parallel="ddp", nproc=2, tp=2), "every rank is on the tensor-parallel axis"),
    ],
    ids=["ddp without tp", "fsdp, tp 1", "pipeline", "tp everywhere", "no replica"],
)
def test_tp_outer_is_refused_in_one_line_where_it_places_nothing(flags, message):
    with pytest.raises(UsageError, match=message) as refused:
        cu.train.run(RunConfig(model="transformer", steps=1, tp_outer=True, **flags))
    assert "\n" not in str(refused.value)
