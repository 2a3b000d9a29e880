"""Lesson 12's interpretability helpers: image patches as the "features" of KernelSHAP and LIME,
attribution maps brought to one patch grid, how far two maps agree (rank correlation, shared top
patches), and a 2-D code judged by how well it separates the digits (a nearest-centroid classifier,
PCA as the linear baseline). Pure tensor arithmetic: no plotting, no processes.

The attribution methods themselves (saliency, occlusion, exact Shapley values, captum's
``KernelShap`` and ``Lime``) stay in the notebook, where the learner reads them.
"""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "patch_mask",
    "per_patch",
    "spearman",
    "top_k_overlap",
    "agreement",
    "pca",
    "nearest_centroid",
    "decode_grid",
]


def patch_mask(patch: int, size: int = 28) -> torch.Tensor:
    """A feature mask for captum: ``(1, 1, size, size)`` of patch ids, squares of ``patch`` x
    ``patch`` pixels numbered row by row (``size`` must be a multiple of ``patch``)."""
    if patch < 1 or size % patch:
        raise ValueError(f"patch must divide the image size {size}, got {patch}")
    per_row = size // patch
    rows = torch.arange(size) // patch
    return (rows[:, None] * per_row + rows[None, :])[None, None]


def per_patch(maps: torch.Tensor, mask: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Pixel maps ``(N, H, W)`` (or ``(H, W)``) to one score per patch of ``mask``: ``(N, P)``,
    the ``"mean"`` or ``"sum"`` of each patch's pixels."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    maps = torch.as_tensor(maps, dtype=torch.float64)
    maps = maps[None] if maps.ndim == 2 else maps
    ids = mask.reshape(-1).long()
    num_patches = int(ids.max()) + 1
    sums = torch.zeros(len(maps), num_patches, dtype=torch.float64)
    sums.index_add_(1, ids, maps.reshape(len(maps), -1))
    if reduce == "sum":
        return sums
    return sums / torch.bincount(ids, minlength=num_patches).to(sums)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, tied values sharing the mean of their ranks."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors: 1 when they order the patches alike,
    0 when unrelated, -1 when reversed (NaN if either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    if len(ra) != len(rb):
        raise ValueError("spearman compares two scores of the same patches")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / norm if norm > 0 else float("nan")


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The fraction of the ``k`` highest-scoring patches of ``a`` that are also among the ``k``
    highest of ``b`` (1: the same top patches; k / P: what chance gives on average)."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    if not 1 <= k <= len(a):
        raise ValueError(f"k must be between 1 and {len(a)}, got {k}")
    top_a = set(torch.topk(a, k).indices.tolist())
    top_b = set(torch.topk(b, k).indices.tolist())
    return len(top_a & top_b) / k


def agreement(scores: dict[str, torch.Tensor], k: int) -> dict[tuple[str, str], dict]:
    """For every pair of methods in ``scores`` (``{name: (N, P) patch scores}``, the same N images),
    the mean over images of the Spearman correlation and of the top-``k`` overlap, and their
    lowest and highest values over the images."""
    result = {}
    for a, b in itertools.combinations(scores, 2):
        rho = [spearman(x, y) for x, y in zip(scores[a], scores[b])]
        overlap = [top_k_overlap(x, y, k) for x, y in zip(scores[a], scores[b])]
        rho = [r for r in rho if r == r] or [float("nan")]  # a constant map has no ranks
        result[a, b] = {
            "spearman": sum(rho) / len(rho),
            "spearman_min": min(rho),
            "spearman_max": max(rho),
            "overlap": sum(overlap) / len(overlap),
            "overlap_min": min(overlap),
            "overlap_max": max(overlap),
        }
    return result


def pca(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``(D,)`` and the top ``k`` principal directions ``(D, k)`` of the rows of ``X``
    (flattened to ``(N, D)``): the best *linear* ``k``-number code, the baseline of an
    autoencoder. Encode with ``(x - mean) @ V``, decode with ``z @ V.T + mean``."""
    flat = X.reshape(len(X), -1).double()
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    return mean.to(X.dtype), vh[:k].T.contiguous().to(X.dtype)


def nearest_centroid(
    codes_train: torch.Tensor,
    y_train: torch.Tensor,
    codes_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int = 10,
) -> tuple[float, torch.Tensor]:
    """How well a code separates the classes: the accuracy on the test codes of the classifier
    that predicts the class whose mean training code is nearest, and its confusion matrix
    ``(true, predicted)`` of counts. Chance is about ``1 / num_classes``."""
    centroids = torch.stack([codes_train[y_train == c].mean(0) for c in range(num_classes)])
    predicted = torch.cdist(codes_test.double(), centroids.double()).argmin(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((y_test, predicted), torch.ones_like(y_test), accumulate=True)
    return (predicted == y_test).double().mean().item(), confusion


@torch.no_grad()
def decode_grid(
    decoder: torch.nn.Module, codes: torch.Tensor, grid: int = 12, quantile: float = 0.01
) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """What a 2-number code's ``decoder`` draws on a ``grid`` x ``grid`` lattice over the square
    that holds all but the outer ``quantile`` of ``codes`` on each axis: ``(grid, grid, H, W)``
    images (row 0 at the bottom, code 1 left to right) and the square's extent
    ``(x_low, x_high, y_low, y_high)``."""
    lo = torch.quantile(codes.float(), quantile, dim=0).tolist()
    hi = torch.quantile(codes.float(), 1 - quantile, dim=0).tolist()
    u = torch.linspace(lo[0], hi[0], grid)  # code 1, left to right
    v = torch.linspace(lo[1], hi[1], grid)  # code 2, bottom to top
    lattice = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], -1).reshape(-1, 2)
    images = decoder(lattice)
    return images.reshape(grid, grid, *images.shape[-2:]), (lo[0], hi[0], lo[1], hi[1])
