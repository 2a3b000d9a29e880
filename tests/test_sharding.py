"""Sharded data parallel (lesson 08): ZeRO-1/2/3 by hand and FSDP2 train exactly like one process,
hold the bytes the formulas say, and their checkpoints reshard."""

import math
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist

import course_utils as cu
from course_utils import sharding
from course_utils.config import RunConfig, UsageError

STEPS, BATCH = 4, 32
LR = {"sgd": 0.05, "adamw": 1e-3}


def one_process(name: str, optimizer: str) -> list[float]:
    X, y = cu.data.mnist("train")
    X = cu.models.prepare_input(name, X)
    model = cu.models.build(name, seed=0)
    opt = cu.models.make_optimizer(model, LR[optimizer], optimizer)
    batches = cu.data.batches(X, y, BATCH, STEPS, 0)
    return cu.loop.fit(model, opt, batches, STEPS, batch_size=BATCH, progress=False).losses


def zero_worker(name: str, optimizer: str, stage: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    X, y = cu.data.mnist("train")
    X = cu.models.prepare_input(name, X)
    model = cu.models.build(name, seed=0)
    make_optimizer = partial(cu.models.make_optimizer, lr=LR[optimizer], kind=optimizer)
    zero = sharding.ZERO_CLASSES[stage](model, make_optimizer)
    history = cu.loop.fit(
        model,
        zero.optimizer,
        cu.data.batches(X, y, BATCH, STEPS, 0, rank, world),
        STEPS,
        batch_size=BATCH,
        step_fn=zero.train_step,
        reduce=cu.collectives.all_reduce_sum,
        progress=False,
    )
    held, traffic = zero.state_bytes(), dict(zero.traffic.calls, sent=zero.traffic.bytes_sent)
    whole = zero.full_state_dict()  # a collective at stage 3
    return {
        "losses": history.losses,
        "held": held,
        "traffic": traffic,
        "params": {k: tuple(v.shape) for k, v in whole.items()},
        "whole_weights_left": sum(p.numel() for p in model.parameters()),
    }


@pytest.mark.parametrize("name, optimizer", [("cnn", "sgd"), ("transformer", "adamw")])
def test_zero_by_hand_trains_like_one_process_and_holds_what_the_formula_says(name, optimizer):
    expected = one_process(name, optimizer)
    num_params = cu.models.count_parameters(cu.models.build(name))
    state_per_param = {"sgd": 4, "adamw": 8}[optimizer]  # momentum; Adam's two moments (fp32)
    per_stage = {}
    for stage in (1, 2, 3):
        results = cu.launch.run(zero_worker, 2, name, optimizer, stage, timeout=120)
        for rank in results:
            assert rank["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        mine = results[0]
        formula = sharding.memory_per_rank(num_params, 2, stage, 4, 4, state_per_param)
        assert mine["held"]["total"] == pytest.approx(formula, rel=0.01)  # padding, Adam's steps
        per_stage[stage] = mine
    names = dict(cu.models.build(name).named_parameters())
    assert per_stage[3]["params"] == {k: tuple(v.shape) for k, v in names.items()}
    assert per_stage[3]["whole_weights_left"] == 0  # ZeRO-3 keeps only shards
    assert per_stage[1]["whole_weights_left"] == num_params
    # stages 1, 2: a reduce-scatter and an all-gather per parameter per step: DDP's bytes
    sent = {stage: per_stage[stage]["traffic"]["sent"] for stage in (1, 2, 3)}
    ring_all_reduce = sharding.comm_per_rank(num_params, 2, 0) * STEPS
    assert sent[1] == sent[2] == pytest.approx(ring_all_reduce, rel=0.01)
    # stage 3 gathers again in backward: up to 1.5x (less: biases are not needed by backward)
    final_gather = num_params * 4 / 2  # full_state_dict() at the end
    assert 1.25 * sent[1] < sent[3] - final_gather <= 1.5 * sent[1] * 1.01


def test_zero3_frees_the_gathered_weights_after_each_layer():
    def worker():
        model = cu.models.build("cnn", seed=0)
        zero = sharding.ZeRO3(model, partial(torch.optim.SGD, lr=0.1))
        seen = []
        model.fc.register_forward_hook(lambda m, a, o: seen.append(model.conv1.weight))
        X = torch.zeros(4, 1, 28, 28)
        zero(X).sum().backward()  # backward gathers conv1's weight again
        return seen, [s.grad is not None for s in zero.shards]

    (seen, grads), _ = cu.launch.run(worker, 2)
    assert seen == [None]  # conv1's whole weight was dropped once conv1 had run
    assert all(grads)


def test_zero3_refuses_the_rnn_in_one_sentence():
    def worker():
        sharding.ZeRO3(cu.models.build("rnn"), torch.optim.SGD)

    with pytest.raises(cu.launch.WorkerError, match="nn.RNN keeps its own list"):
        cu.launch.run(worker, 2)


def test_memory_and_communication_formulas():
    # the ZeRO paper's Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam
    gb = [sharding.memory_per_rank(7.5e9, 64, s) / 1e9 for s in (0, 1, 2, 3)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)
    assert sharding.comm_per_rank(1000, 4, 3) == 1.5 * sharding.comm_per_rank(1000, 4, 1)
    assert sharding.comm_per_rank(1000, 1, 2) == 0  # one rank: nothing to send
    with pytest.raises(ValueError, match="stage must be one of"):
        sharding.memory_per_rank(10, 2, 4)
    world_sizes = [1, 2, 8, 64]
    per_stage = [sharding.memory_per_rank(1e9, world_sizes, stage) for stage in range(4)]
    for a, b in zip(per_stage, per_stage[1:]):
        assert (b <= a).all()
    assert per_stage[3] == pytest.approx(per_stage[0] / np.array(world_sizes))  # all sharded
    assert (per_stage[0] == per_stage[0][0]).all()  # plain DDP: the world size does not help


@pytest.mark.parametrize(
    "model, optimizer, nproc, tp",
    [("cnn", "sgd", 2, 1), ("rnn", "sgd", 2, 1), ("transformer", "adamw", 2, 1)]
    + [("transformer", "adamw", 4, 2)],  # a 2-D mesh: FSDP over 2 replicas of 2 TP ranks
)
def test_fsdp_trains_like_one_process(model, optimizer, nproc, tp):
    common = dict(model=model, steps=STEPS, batch_size=BATCH, lr=LR[optimizer])
    common |= dict(optimizer=optimizer, eval=True)
    one = cu.train.run(RunConfig(**common), progress=False)
    cfg = RunConfig(**common, parallel="fsdp", nproc=nproc, tp=tp, oversubscribe=True)
    sharded = cu.train.run(cfg, progress=False)
    assert sharded["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert sharded["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.002)
    assert sharded["state_bytes_per_rank"] == sharded["state_bytes"]["total"]
    share = sharded["state_bytes_per_rank"] / one["state_bytes_per_rank"]
    assert share == pytest.approx(1 / nproc, rel=0.1)  # every part divided among the ranks


def test_every_strategy_reports_the_state_its_rank_holds():
    common = dict(model="transformer", steps=2, batch_size=32)
    held = {}
    for parallel, nproc in [("none", 1), ("ddp", 2), ("fsdp", 2), ("tp", 2), ("pipeline", 2)]:
        held[parallel] = cu.train.run(
            RunConfig(**common, parallel=parallel, nproc=nproc), progress=False
        )["state_bytes"]
    params = cu.models.count_parameters(cu.models.build("transformer")) * 4
    assert held["none"] == {"parameters": params, "gradients": params, "optimizer": params} | {
        "total": 3 * params
    }
    assert held["ddp"] == held["none"]  # every replica holds it all
    for split in ("fsdp", "tp", "pipeline"):
        assert held[split]["total"] < 0.65 * held["none"]["total"]


def test_fsdp_checkpoints_reshard_between_numbers_of_ranks(tmp_path):
    common = dict(model="transformer", batch_size=BATCH, lr=1e-3, optimizer="adamw")
    straight = cu.train.run(RunConfig(**common, steps=6, parallel="fsdp", nproc=2), False)
    for first, then in [(2, 1), (1, 2)]:
        folder = str(tmp_path / f"{first}to{then}")
        half = RunConfig(**common, steps=3, parallel="fsdp", nproc=first, checkpoint=folder)
        cu.train.run(half, progress=False)
        rest = RunConfig(**common, steps=6, parallel="fsdp", nproc=then, checkpoint=folder)
        resumed = cu.train.run(rest, progress=False)
        assert resumed["resumed_from_step"] == 3
        assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)


def test_a_corrupt_fsdp_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    common = dict(model="cnn", batch_size=BATCH, parallel="fsdp", nproc=2, checkpoint_every=2)
    folder = tmp_path / "ckpt"
    straight = cu.train.run(RunConfig(model="cnn", batch_size=BATCH, steps=6), progress=False)
    cu.train.run(RunConfig(**common, steps=4, checkpoint=str(folder)), progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.dcp", "previous.dcp"]
    shard = next((folder / "latest.dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    resumed = cu.train.run(RunConfig(**common, steps=6, checkpoint=str(folder)), progress=False)
    assert resumed["resumed_from_step"] == 2  # from previous.dcp
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
    assert (folder / "latest.dcp.corrupt").is_dir()  # set aside, not deleted
    shutil.rmtree(folder / "previous.dcp")
    shutil.rmtree(folder / "latest.dcp")
    (folder / "latest.dcp").mkdir()
    with pytest.raises(UsageError, match="not a checkpoint of this course"):
        cu.train.run(RunConfig(**common, steps=6, checkpoint=str(folder)), progress=False)


def test_bad_fsdp_settings_are_one_line():
    with pytest.raises(UsageError, match="does not divide among 3"):
        cu.train.run(RunConfig(model="cnn", parallel="fsdp", nproc=3, batch_size=32))
    with pytest.raises(UsageError, match="no tensor-parallel plan"):
        cu.train.run(RunConfig(model="cnn", parallel="fsdp", nproc=2, tp=2))


def test_zero1_gradient_shards_sit_where_the_shards_do():
    # a weight of 15 values on 2 ranks: shards of 8 and 7; rank 1's starts at value 8, not 7
    def worker():
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        zero = sharding.ZeRO1(model, partial(torch.optim.SGD, lr=0.0))
        X, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
        rank = dist.get_rank()
        zero.train_step(model, zero.optimizer, X[rank::2], y[rank::2])
        return [s.grad.clone() for s in zero.shards]

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    X = torch.randn(4, 5)
    torch.nn.functional.cross_entropy(model(X), torch.tensor([0, 1, 2, 1])).backward()
    shards = cu.launch.run(worker, 2, device="cpu")
    whole = model.weight.grad.view(-1)
    assert whole.abs().min() > 0  # every value has a gradient to misplace
    torch.testing.assert_close(shards[0][0], whole[:8])
    torch.testing.assert_close(shards[1][0], whole[8:])


def test_grouped_units_join_consecutive_blocks():
    model = cu.models.build("transformer")
    blocks = list(model.blocks)
    assert sharding.grouped_units(model, 1) == [[b] for b in blocks]
    assert sharding.grouped_units(model, 2) == [blocks[:2], blocks[2:]]
    assert sharding.grouped_units(model, 3) == [blocks[:3], blocks[3:]]  # the last one shorter
    assert sharding.grouped_units(model, 4) == [blocks]


# --- the model state at the peak of a step: sharding.PeakState ------------------------------------


def watched_steps(module, model, optimizer, rank: int = 0, world: int = 1) -> dict:
    """Three steps of ``module`` watched by a PeakState over two: its peak, the bytes at rest
    after, and how many looks it took in each step."""
    peak = sharding.PeakState(module, optimizer, steps=2)
    looks, per_step = [], []
    look = peak.look
    peak.look = lambda: looks.append(1) or look()  # count the looks its hooks take
    X, y = cu.data.mnist("train", limit=64)
    cu.loop.fit(
        module,
        optimizer,
        cu.data.batches(X, y, 16, 3, 0, rank, world),
        3,
        progress=False,
        on_step=lambda step, run: per_step.append(len(looks) - sum(per_step)),
    )
    rest = sharding.state_bytes(model.parameters(), optimizer)
    return {"peak": peak.bytes, "rest": rest, "looks": per_step}


def peak_worker() -> dict:
    """DDP, FSDP as the command line applies it (a unit per block), and every block in one unit,
    each watched on this rank."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for variant in ("ddp", "per block", "4 blocks per unit"):
        model = cu.models.build("transformer", seed=0)
        module = model
        if variant == "ddp":
            module = cu.ddp.wrap(model, torch.device("cpu"))
        elif variant == "per block":
            sharding.apply(model, init_device_mesh("cpu", (world,)))
        else:
            units = sharding.grouped_units(model, 4)
            sharding.fully_sharded(model, init_device_mesh("cpu", (world,)), None, units=units)
        optimizer = cu.models.make_optimizer(module, 1e-3, "adamw")
        out[variant] = watched_steps(module, model, optimizer, rank, world)
    return out


def gathered_bytes(params, world: int) -> int:
    """Float32 bytes of ``params`` gathered whole by FSDP: rows padded to a multiple of N."""
    return sum(
        4 * math.ceil(p.shape[0] / world) * world * (p.numel() // p.shape[0]) for p in params
    )


def test_the_peak_of_one_process_and_of_ddp_is_the_whole_state_at_rest():
    model = cu.models.build("transformer", seed=0)
    one = watched_steps(model, model, cu.models.make_optimizer(model, 1e-3, "adamw"))
    params = 4 * cu.models.count_parameters(model)
    tensors = len(list(model.parameters()))
    whole = {"parameters": params, "gradients": params, "optimizer": 2 * params + 4 * tensors}
    assert one["peak"] == one["rest"] == whole | {"total": sum(whole.values())}
    assert one["looks"][0] > 0 and one["looks"][1] > 0 and one["looks"][2] == 0  # hooks removed
    ddp = cu.launch.run(peak_worker, 2, device="cpu")[0]["ddp"]
    assert ddp["peak"] == ddp["rest"] == one["rest"]  # buckets aside: every replica holds it all


def test_fsdp_per_block_holds_one_block_whole_at_its_peak_and_grouped_holds_them_all():
    ranks = cu.launch.run(peak_worker, 2, device="cpu")
    model = cu.models.build("transformer")
    root = [p for name, p in model.named_parameters() if not name.startswith("blocks.")]
    block = list(model.blocks[0].parameters())
    whole_block = 4 * cu.models.count_parameters(model.blocks[0])
    block_shard = whole_block // 2  # every block tensor's rows divide by 2
    ddp, fsdp, grouped = (ranks[0][v] for v in ("ddp", "per block", "4 blocks per unit"))
    peak, rest = fsdp["peak"], fsdp["rest"]  # rank 0: its shards are never padded
    # at the peak, the end of a block's backward: the root and that block gathered (the next
    # block's all-gather, prefetched, lands in FSDP's own buffer: not counted), the block's whole
    # gradients beside the other blocks' gradient shards
    assert peak["parameters"] == rest["parameters"] + gathered_bytes(root + block, 2)
    assert peak["optimizer"] == rest["optimizer"]
    root_whole = 4 * sum(p.numel() for p in root)
    at_least = whole_block + 3 * block_shard
    assert at_least <= peak["gradients"] <= at_least + root_whole
    # so, of DDP's whole state, half (the shards) and about one block's parameters and gradients
    bound = rest["total"] + gathered_bytes(root + block, 2) + whole_block + root_whole
    assert peak["total"] <= bound < ddp["peak"]["total"]
    # every block in one unit: the whole model gathered during the step
    all_params = list(model.parameters())
    assert grouped["peak"]["parameters"] == rest["parameters"] + gathered_bytes(all_params, 2)
    assert grouped["rest"] == rest  # the same shards between steps
