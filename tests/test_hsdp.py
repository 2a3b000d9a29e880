"""HSDP (``--parallel fsdp --replicate R``, issue 27): FSDP2 on a 2-D (replicate, shard) mesh
trains like one process, each rank holds a shard of dp / R ranks' size, the shard groups are
consecutive ranks (the neighbours of one node under torchrun), and bad settings are one line."""

import json

import pytest
import torch.distributed as dist

import course_utils as cu
from course_utils import sharding
from course_utils.config import RunConfig, UsageError

STEPS, BATCH = 4, 32
COMMON = dict(model="transformer", steps=STEPS, batch_size=BATCH, lr=1e-3, optimizer="adamw")


def test_hsdp_trains_like_one_process_holding_a_shard_of_dp_over_r(cli, tmp_path):
    one = cu.train.run(RunConfig(**COMMON), progress=False)
    out = tmp_path / "hsdp.json"
    proc = cli(
        "--model", "transformer", "--steps", str(STEPS), "--batch-size", str(BATCH),
        "--lr", "0.001", "--optimizer", "adamw", "--parallel", "fsdp", "--nproc", "4",
        "--replicate", "2", "--oversubscribe", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    hybrid = json.loads(out.read_text())
    assert hybrid["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert hybrid["mesh"] == {"dp": 4, "tp": 1, "cp": 1, "ep": 1, "replicate": 2}
    # a shard of 4 / 2 ranks' size: what FSDP over 2 ranks holds, byte for byte, and twice
    # what FSDP over all 4 holds (up to the padding of shards that do not divide evenly)
    cfg = dict(COMMON, steps=1, parallel="fsdp", oversubscribe=True)
    two, four = (cu.train.run(RunConfig(**cfg, nproc=n), False)["state_bytes"] for n in (2, 4))
    assert hybrid["state_bytes"] == two
    assert hybrid["state_bytes"]["total"] == pytest.approx(2 * four["total"], rel=0.02)
    assert hybrid["state_bytes"]["total"] == pytest.approx(
        one["state_bytes"]["total"] / 2, rel=0.01
    )


def hybrid_layout(replicate: int) -> dict:
    """On every rank: the ranks of its shard and replicate groups on HSDP's mesh, and the
    placements of a sharded parameter."""
    axes = cu.parallelize.Axes(dp=dist.get_world_size(), data="fsdp", replicate=replicate)
    mesh = cu.parallelize.replicas(axes.mesh("cpu"))
    hybrid = sharding.hybrid_mesh(mesh, replicate)
    model = sharding.apply(cu.models.build("cnn", seed=0), mesh, replicate=replicate)
    weight = next(model.parameters())
    return {
        "shard": dist.get_process_group_ranks(hybrid["shard"].get_group()),
        "replicate": dist.get_process_group_ranks(hybrid["replicate"].get_group()),
        "placements": [type(p).__name__ for p in weight.placements],
        "mesh_shape": list(weight.device_mesh.shape),
    }


def test_hsdp_shards_over_consecutive_ranks_and_replicates_across_them():
    found = cu.launch.run(hybrid_layout, 4, 2, threads=1, oversubscribe=True)
    for rank, layout in enumerate(found):
        node = rank // 2
        assert layout["shard"] == [2 * node, 2 * node + 1]  # inside a node under torchrun
        assert layout["replicate"] == [rank % 2, rank % 2 + 2]  # one rank on each node
        assert layout["placements"] == ["Replicate", "Shard"]
        assert layout["mesh_shape"] == [2, 2]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(parallel="fsdp", nproc=4, replicate=3), "does not divide the 4 data-parallel"),
        (dict(parallel="ddp", nproc=4, replicate=2), "--replicate is for --parallel fsdp"),
        (dict(parallel="fsdp", nproc=2, replicate=0), "--replicate must be at least 1"),
    ],
)
def test_bad_hsdp_settings_are_one_line(settings, message):
    with pytest.raises(UsageError, match=message) as refused:
        cu.train.run(RunConfig(model="cnn", batch_size=32, oversubscribe=True, **settings))
    assert "\n" not in str(refused.value)
