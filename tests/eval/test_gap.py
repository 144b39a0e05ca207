"""Gap metrics against known answers on constructed embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipft.eval.gap import (
    alignment,
    centroid_distance,
    centroid_mse,
    linear_separability,
    mean_pair_distance,
    modality_gap_metrics,
    relative_alignment,
    uniformity,
)


def two_clusters(n: int, offset: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and texts: the same noise, shifted apart along the first axis by ``offset``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 8, generator=g, dtype=torch.float64) * 0.05
    base = torch.zeros(n, 8, dtype=torch.float64)
    base[:, 1] = 1.0
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = offset / 2
    return F.normalize(base + noise + shift, dim=1), F.normalize(base + noise - shift, dim=1)


def test_known_gap_two_points() -> None:
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert centroid_distance(image, text) == pytest.approx(math.sqrt(2))
    assert centroid_mse(image, text) == pytest.approx(2 / 2)
    assert mean_pair_distance(image, text) == pytest.approx(math.sqrt(2))
    assert alignment(image, text) == pytest.approx(2.0)
    # each text equally far from both images: relative alignment 0
    assert relative_alignment(image, text) == pytest.approx(0.0)


def test_identical_modalities() -> None:
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(200, 16, generator=g, dtype=torch.float64), dim=1)
    assert centroid_distance(x, x) == 0.0 and mean_pair_distance(x, x) == 0.0 and alignment(x, x) == 0.0
    assert linear_separability(x, x, seed=0) == pytest.approx(0.5, abs=0.05)
    assert relative_alignment(x, x) < 0  # each text sits on its own image


def test_separated_clusters_are_separable() -> None:
    image, text = two_clusters(100, offset=0.5)
    assert centroid_distance(image, text) > 0.4
    assert linear_separability(image, text, seed=0) == 1.0
    far = centroid_distance(*two_clusters(100, offset=1.0))
    assert far > centroid_distance(image, text)


def test_uniformity_known_values() -> None:
    # two antipodal points: ‖x−y‖² = 4 → log exp(−8) = −8
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # identical points: log exp(0) = 0 (worst uniformity)
    assert uniformity(torch.ones(5, 3) / math.sqrt(3)) == pytest.approx(0.0)
    # 4 orthonormal points: every pair ‖x−y‖² = 2 → −4
    assert uniformity(torch.eye(4)) == pytest.approx(-4.0)


def test_relative_alignment_known_value() -> None:
    image = torch.eye(3, dtype=torch.float64)
    text = torch.eye(3, dtype=torch.float64)
    # own distance 0, nearest other image at squared distance 2
    assert relative_alignment(image, text) == pytest.approx(-2.0)


def test_all_metrics_and_errors() -> None:
    image, text = two_clusters(50, offset=0.3)
    metrics = modality_gap_metrics(image, text)
    assert set(metrics) == {
        "centroid_distance", "centroid_mse", "mean_pair_distance", "linear_separability", "alignment",
        "uniformity_image", "uniformity_text", "uniformity_union", "relative_alignment",
    }
    assert metrics["centroid_mse"] == pytest.approx(metrics["centroid_distance"] ** 2 / 8)
    with pytest.raises(ValueError, match="equal shape"):
        centroid_distance(image, text[:3])


def test_chunked_uniformity_and_relative_alignment_equal_direct() -> None:
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(57, 6, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(57, 6, generator=g, dtype=torch.float64), dim=1)
    direct = torch.log(torch.exp(-2 * torch.pdist(x).square()).mean()).item()
    assert uniformity(x, chunk_size=5) == pytest.approx(direct, rel=1e-10)
    assert uniformity(x, chunk_size=1000) == pytest.approx(direct, rel=1e-10)
    assert relative_alignment(x, y, chunk_size=4) == pytest.approx(relative_alignment(x, y), rel=1e-12)


def test_several_captions_per_image() -> None:
    """5 captions per image (COCO protocol): the other captions of one's own image are not
    'other images', and each image counts once in its uniformity."""
    g = torch.Generator().manual_seed(4)
    images = F.normalize(torch.randn(30, 16, generator=g, dtype=torch.float64), dim=1)
    image = images.repeat_interleave(5, dim=0)
    text = F.normalize(image + 0.05 * torch.randn(150, 16, generator=g, dtype=torch.float64), dim=1)
    groups = torch.arange(30).repeat_interleave(5)
    assert relative_alignment(image, text, groups) < -0.5  # every text nearest its own image
    assert relative_alignment(image, text) >= 0  # without groups, a duplicate counts as "other"
    metrics = modality_gap_metrics(image, text, groups=groups)
    assert metrics["uniformity_image"] == pytest.approx(uniformity(images))



def test_separability_is_scored_on_pairs_the_probe_did_not_see() -> None:
    """Few random pairs in many dimensions: any 32 points can be split by a hyperplane in 64-D,
    so a probe scored on its own training pairs reads ~1.0; on held-out pairs it is chance."""
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(16, 64, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(16, 64, generator=g, dtype=torch.float64), dim=1)
    assert linear_separability(image, text, seed=0) < 0.75
