"""The cost models of course_utils.cost_model (lessons 12 and 13's numbers): the
compute-to-communication ratio and the decision guide (ZeRO/FSDP memory: tests/test_sharding.py;
the figures: tests/test_challenges_figures.py)."""

import math

import pytest

from course_utils import collectives, cost_model

GB = 1e9


def test_compute_to_communication_ratio_grows_with_the_batch_per_worker():
    args = dict(flops_per_sample=1e7, device_flops=1e11, num_params=1e6, alpha=1e-4, beta=1e9)
    times = cost_model.data_parallel_times(batch_per_worker=[8, 16, 32], world_size=4, **args)
    assert times["comm_s"] == pytest.approx(collectives.ring_cost(4e6, 4, 1e-4, 1e9))
    assert times["compute_s"] == pytest.approx([3 * 1e7 * b / 1e11 for b in (8, 16, 32)])
    assert times["ratio"][1] == pytest.approx(2 * times["ratio"][0])  # linear in the batch
    one = cost_model.data_parallel_times(batch_per_worker=8, world_size=1, **args)
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
    choice = cost_model.choose_parallelism(8, **job())
    assert (choice.strategy, choice.stages, choice.replicas) == ("data", 1, 8)
    dp = cost_model.data_parallel_times(
        job()["flops_per_sample"], 256 / 8, 100e12, 100e6, 8, alpha=5e-6, beta=100e9
    )
    exposed = max(dp["comm_s"] - 2 / 3 * dp["compute_s"], 0)  # what backward can't hide
    assert choice.step_s == pytest.approx(dp["compute_s"] + exposed)  # the same cost model
    no_overlap = cost_model.plan(1, 8, **job(), overlap=False)
    assert no_overlap.step_s == pytest.approx(dp["compute_s"] + dp["comm_s"])


def test_the_decision_guide_splits_the_model_when_it_does_not_fit():
    big = job(num_params=3e9, flops_per_sample=2 * 3e9 * 512)  # 48 GB of fp32 Adam state
    assert cost_model.plan(1, 8, **big).step_s == math.inf  # data parallel alone can't hold it
    choice = cost_model.choose_parallelism(8, **big)
    assert choice.strategy == "both" and choice.stages * choice.replicas == 8
    assert choice.memory_per_device <= 16 * GB
    assert (
        cost_model.choose_parallelism(4, **big).strategy == "pipeline"
    )  # all 4 devices are needed
    huge = job(num_params=30e9)
    assert cost_model.choose_parallelism(8, **huge).strategy == "does not fit"


def test_the_decision_guide_prefers_a_pipeline_on_a_slow_network():
    # small activations between stages, a large gradient to all-reduce, 1 Gbit/s Ethernet
    slow = job(beta=125e6, alpha=50e-6, boundary_bytes_per_sample=4096)
    choice = cost_model.choose_parallelism(8, **slow)
    assert choice.stages > 1
    assert choice.step_s < cost_model.plan(1, 8, **slow).step_s
