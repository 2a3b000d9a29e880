"""Lessons 12 and 13's experiment helpers (course_utils.challenges), the bf16 flags of
course_utils.hardware, the transformer job of the decision guide, and the decoded grid of an
autoencoder's 2-D code."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import challenges, cost_model, data, hardware, interpret, launch, models


def test_the_linear_model_counts_one_multiply_add_per_pixel_and_class():
    sizes = challenges.complexity(("linear", "cnn"))
    assert sizes["linear"] == {"params": 784 * 10 + 10, "flops": 2 * 784 * 10}
    assert sizes["cnn"]["params"] == models.count_parameters(models.build("cnn"))
    # a convolution reuses its weights at every position: many more FLOPs per parameter
    per_param = {n: s["flops"] / s["params"] for n, s in sizes.items()}
    assert per_param["cnn"] > 10 * per_param["linear"]


def test_the_cnn_blocks_chained_compute_the_cnn():
    cnn = models.build("cnn", seed=0)
    X = data.mnist("train")[0][:8]
    x = X
    for block in challenges.cnn_blocks(cnn).values():
        x = block(x)
    torch.testing.assert_close(x, cnn(X))
    flops, times = challenges.block_costs(challenges.cnn_blocks(cnn), X, repeats=2)
    assert set(flops) == set(times) and all(f > 0 for f in flops.values())
    assert all(len(t.samples) == 2 for t in times.values())


def test_shift_moves_every_image_right_and_down_filling_with_background():
    X = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    moved = challenges.shift(X, 2)
    # the lesson's former construction: pad, roll by the shift, crop
    padded = F.pad(X, (2, 2, 2, 2), value=data.BACKGROUND)
    torch.testing.assert_close(
        moved, torch.roll(padded, shifts=(2, 2), dims=(2, 3))[..., 2:30, 2:30]
    )
    torch.testing.assert_close(moved[..., 2:, 2:], X[..., :-2, :-2])
    assert (moved[..., :2, :] == data.BACKGROUND).all()


def test_random_shift_moves_each_image_by_at_most_max_shift():
    X = torch.full((50, 1, 28, 28), data.BACKGROUND)
    X[:, 0, 14, 14] = 5.0  # one bright pixel in the middle
    torch.manual_seed(0)
    moved = challenges.random_shift(X, max_shift=2)
    assert moved.shape == X.shape
    where = (moved[:, 0] == 5.0).nonzero()[:, 1:]  # (row, col) of the bright pixel, per image
    assert len(where) == 50 and ((where - 14).abs() <= 2).all()
    assert len({tuple(w) for w in where.tolist()}) > 5  # the shifts vary
    torch.testing.assert_close(challenges.random_shift(X, max_shift=0), X)


def test_recall_per_class_counts_each_class_own_hits():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 0])
    model = lambda X: F.one_hot(predicted, 3).float()  # noqa: E731  (ignores X)
    assert challenges.recall_per_class(model, torch.zeros(6), y, num_classes=3) == [0.5, 1.0, 0.0]


def test_train_is_reproducible_and_class_weights_change_it():
    X, y = data.mnist("train")
    X, y = X[:128], y[:128]
    a = challenges.train(X, y, 3, seed=0)
    b = challenges.train(X, y, 3, seed=0)
    weights = torch.ones(10)
    weights[0] = 5.0
    c = challenges.train(X, y, 3, seed=0, class_weights=weights)
    assert not a.training
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def _both(names, batch_sizes):
    return challenges.compute_and_comm(names, batch_sizes, 2), challenges.copy_and_all_reduce(
        4096, 2
    )


def test_compute_and_comm_and_the_copy_run_on_two_workers():
    (timed, exchange), _ = launch.run(_both, 2, ("linear",), [2, 4], timeout=120, device="cpu")
    assert set(timed["linear"]) == {2, 4, "comm"}
    assert all(len(s.samples) == 2 and s.low > 0 for s in timed["linear"].values())
    assert {p["bytes"] for p in timed["probe"]} == {4 * 2**k for k in range(8, 21, 3)}
    assert set(exchange) == {"copy", "all-reduce"} and exchange["copy"].low > 0


def test_bf16_units_reads_the_cpu_flags():
    assert hardware.bf16_units("flags : fpu sse2 avx2 avx512f") == []
    text = "flags : fpu avx512f avx512_bf16 amx_tile amx_bf16\nflags : fpu"
    assert hardware.bf16_units(text) == ["avx512_bf16", "amx_bf16"]
    assert hardware.bf16_units() is None or isinstance(hardware.bf16_units(), list)


def test_the_transformer_job_follows_its_formulas():
    job = cost_model.transformer_job(12 * 24 * 1024**2, 1e11)  # hidden 1024
    assert job["activation_bytes_per_sample"] == pytest.approx(34 * 1024 * 1024 * 24)
    assert job["boundary_bytes_per_sample"] == pytest.approx(2 * 1024 * 1024)
    assert job["flops_per_sample"] == pytest.approx(2 * 12 * 24 * 1024**2 * 1024)
    small_fast = cost_model.choose_parallelism(8, **cost_model.transformer_job(1e8, 3e11))
    assert small_fast.strategy == "data"
    huge = cost_model.choose_parallelism(8, **cost_model.transformer_job(1e11, 3e11))
    assert huge.strategy == "does not fit" and math.isinf(huge.step_s)


def test_decode_grid_lays_codes_out_with_row_0_at_the_bottom():
    codes = torch.stack([torch.linspace(-1, 1, 101), torch.linspace(0, 10, 101)], 1)
    decoded, extent = interpret.decode_grid(
        lambda z: z[:, None, :, None], codes, grid=5, quantile=0
    )
    assert decoded.shape == (5, 5, 2, 1)
    assert extent == pytest.approx((-1, 1, 0, 10))
    assert decoded[0, 0, :, 0].tolist() == pytest.approx([-1, 0])  # bottom left
    assert decoded[0, -1, :, 0].tolist() == pytest.approx([1, 0])  # bottom right
    assert decoded[-1, 0, :, 0].tolist() == pytest.approx([-1, 10])  # top left
