"""Lesson 12's interpretability helpers: patch masks for captum, maps brought to patches, how far two
attributions agree, and the measures that judge an autoencoder's 2-D code (PCA, nearest centroid);
and captum's KernelSHAP against Shapley values computed exactly."""

import itertools
import math

import pytest
import torch

from course_utils import interpret


def test_patch_mask_numbers_squares_row_by_row():
    mask = interpret.patch_mask(14)
    assert mask.shape == (1, 1, 28, 28)
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 27] == 1  # top-left, top-right
    assert mask[0, 0, 27, 0] == 2 and mask[0, 0, 27, 27] == 3  # bottom-left, bottom-right
    assert torch.bincount(interpret.patch_mask(7).flatten()).tolist() == [49] * 16
    with pytest.raises(ValueError):
        interpret.patch_mask(5)  # 28 is not a multiple of 5


def test_per_patch_averages_or_sums_each_patch():
    mask = interpret.patch_mask(2, size=4)  # 4 patches of 2 x 2
    image = torch.arange(16.0).reshape(4, 4)
    means = interpret.per_patch(image, mask)
    assert means.shape == (1, 4)
    assert means[0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert interpret.per_patch(image, mask, reduce="sum")[0].tolist() == [10, 18, 42, 50]
    batch = torch.stack([image, -image])
    assert interpret.per_patch(batch, mask)[1].tolist() == [-2.5, -4.5, -10.5, -12.5]
    # a map that is constant on each patch (captum's output with a feature mask) comes back exact
    values = torch.tensor([0.3, -0.1, 0.0, 0.7])
    assert torch.allclose(interpret.per_patch(values[mask[0, 0]], mask)[0], values.double())


def test_spearman_compares_orders_not_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert interpret.spearman(a, a**3) == pytest.approx(1.0)  # same order, other values
    assert interpret.spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])
    # the textbook formula without ties: 1 - 6 sum d^2 / (n (n^2 - 1)); here sum d^2 = 4
    assert interpret.spearman(a, b) == pytest.approx(1 - 6 * 4 / (5 * 24))
    ties = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert interpret.spearman(ties, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        2 / math.sqrt(5)  # tied values share the mean of their ranks
    )
    assert math.isnan(interpret.spearman(torch.ones(4), a[:4]))  # a constant map has no order


def test_top_k_overlap_counts_shared_top_patches():
    a = torch.tensor([9.0, 8.0, 7.0, 1.0, 0.0])
    assert interpret.top_k_overlap(a, a, 3) == 1.0
    assert interpret.top_k_overlap(a, -a, 2) == 0.0
    assert interpret.top_k_overlap(a, torch.tensor([9.0, 0.0, 7.0, 8.0, 1.0]), 3) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError):
        interpret.top_k_overlap(a, a, 6)


def test_agreement_averages_every_pair_over_the_images():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    pairs = interpret.agreement({"a": x, "b": x, "c": -x}, k=1)
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert pairs["a", "b"]["spearman"] == pytest.approx(1.0)
    assert pairs["a", "c"]["spearman"] == pytest.approx(-1.0)
    assert pairs["a", "b"]["overlap"] == 1.0 and pairs["a", "c"]["overlap"] == 0.0
    assert pairs["a", "c"]["spearman_min"] == pairs["a", "c"]["spearman_max"]


def test_pca_finds_the_direction_of_largest_variance():
    torch.manual_seed(0)
    z = torch.randn(500, 1)
    X = torch.cat([3 * z, 0.1 * torch.randn(500, 1)], 1) + torch.tensor([5.0, -2.0])
    mean, V = interpret.pca(X, 1)
    assert torch.allclose(mean, torch.tensor([5.0, -2.0]), atol=0.5)
    assert abs(V[0, 0].item()) == pytest.approx(1.0, abs=1e-3)  # along the first axis
    # with all components, encoding then decoding gives the data back
    mean, V = interpret.pca(X, 2)
    assert torch.allclose((X - mean) @ V @ V.T + mean, X, atol=1e-4)


def test_nearest_centroid_scores_codes_that_separate_the_classes():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0], [5.2, 5.0], [0.0, 9.0], [0.2, 9.0]])
    accuracy, confusion = interpret.nearest_centroid(codes, y, codes, y, num_classes=3)
    assert accuracy == 1.0 and confusion.diag().tolist() == [2, 2, 2]
    swapped = torch.tensor([1, 0, 0, 1, 2, 2])  # two test labels swapped
    accuracy, confusion = interpret.nearest_centroid(codes, y, codes, swapped, num_classes=3)
    assert accuracy == pytest.approx(4 / 6)
    assert confusion[0, 1] == 1 and confusion[1, 0] == 1 and confusion.sum() == 6


def test_kernel_shap_with_a_patch_mask_estimates_exact_shapley_values():
    from captum.attr import KernelShap

    # a small game on 4 quadrants with an interaction: f = q0 + 2 q1 + q2 * q3 (q = mean of a
    # quadrant); with a zero baseline its Shapley values are q0, 2 q1, q2 q3 / 2, q2 q3 / 2
    mask = interpret.patch_mask(14)

    def forward(x):
        q = interpret.per_patch(x[:, 0], mask).float()
        return (q[:, 0] + 2 * q[:, 1] + q[:, 2] * q[:, 3])[:, None]

    x = torch.zeros(1, 1, 28, 28)
    for quadrant, value in enumerate([0.5, 0.25, 1.0, 0.8]):
        x[0, 0][mask[0, 0] == quadrant] = value

    def v(coalition):  # the game: f with only the quadrants in `coalition` kept
        kept = torch.zeros_like(x)
        for q in coalition:
            kept[0, 0][mask[0, 0] == q] = x[0, 0][mask[0, 0] == q]
        return forward(kept).item()

    exact = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        exact.append(
            sum(
                math.factorial(r) * math.factorial(3 - r) / 24 * (v((*S, i)) - v(S))
                for r in range(4)
                for S in itertools.combinations(others, r)
            )
        )
    assert exact == pytest.approx([0.5, 0.5, 0.4, 0.4])
    torch.manual_seed(0)
    estimate = KernelShap(forward).attribute(
        x, baselines=0.0, target=0, feature_mask=mask, n_samples=400, perturbations_per_eval=50
    )
    estimate = interpret.per_patch(estimate[0, 0], mask)[0]
    assert estimate.sum().item() == pytest.approx(v(range(4)) - v(()), abs=1e-4)  # efficiency
    assert estimate.tolist() == pytest.approx(exact, abs=0.05)
