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
