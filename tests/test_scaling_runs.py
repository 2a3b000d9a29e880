"""Lesson 05's speed measurements (course_utils.scaling_runs): the sweep's settings, paired
speedups, and the sync-cost arithmetic beside the alpha-beta model."""

import pytest

import course_utils as cu
from course_utils import collectives, scaling_runs


def test_settings_cover_strong_weak_and_the_threaded_baseline():
    runs = scaling_runs.settings(["cnn"], [1, 2, 4], strong_batch=96, weak_batch=32, cores=2)
    assert runs["cnn strong 4"] == ("cnn", 4, 96, 1)  # the global batch stays
    assert runs["cnn weak 4"] == ("cnn", 4, 128, 1)  # 32 per worker
    assert runs["cnn all cores"] == ("cnn", 1, 96, 2)
    assert len(runs) == 2 * 3 + 1


def test_sweep_runs_every_setting_in_turns_and_speedups_are_paired(monkeypatch):
    calls = []

    def fake(model, nproc, batch_size, threads, steps):
        calls.append((model, nproc))
        return 100.0 * nproc * (1 + len(calls) % 2)  # alternate rounds slower and faster

    monkeypatch.setattr(scaling_runs, "throughput", fake)
    runs = scaling_runs.settings(["cnn"], [1, 2], 64, 32, 2)
    rate = scaling_runs.sweep(runs, steps=3, repeats=2)
    assert len(calls) == 2 * len(runs) and calls[: len(runs)] == calls[len(runs) :]
    s = scaling_runs.speedup(rate, "cnn", "strong", 2)
    assert s.samples == pytest.approx([r2 / r1 for r2, r1 in zip(rate["cnn strong 2"].samples,
                                                                  rate["cnn strong 1"].samples)])  # fmt: skip


def test_sync_costs_subtract_the_no_sync_step_and_share_the_step(monkeypatch):
    timings = iter(
        [{"synced_s": 0.010, "no_sync_s": 0.008}, {"synced_s": 0.020, "no_sync_s": 0.021}]
    )
    monkeypatch.setattr(scaling_runs.launch, "run", lambda *a, **k: [next(timings)])
    fit = collectives.AlphaBeta(alpha_s=1e-4, beta_bytes_per_s=1e9, world_size=2)
    comm = scaling_runs.sync_costs(["rnn"], 64, steps=3, repeats=2, fit=fit)["rnn"]
    grad_bytes = 4 * cu.models.count_parameters(cu.models.build("rnn", seed=0))
    assert comm["bytes"] == grad_bytes
    assert comm["predicted_ms"] == pytest.approx(1e3 * (2e-4 + grad_bytes / 1e9))  # N=2 ring
    assert comm["sync_ms"].samples == pytest.approx((2.0, 0.0))  # never below 0
    assert comm["measured"].samples == pytest.approx((20.0, 0.0))  # % of the synced step
    assert comm["step_ms"].samples == pytest.approx((10.0, 20.0))
    assert comm["predicted"].samples == pytest.approx(
        (100 * comm["predicted_ms"] / 10, 100 * comm["predicted_ms"] / 20)
    )
