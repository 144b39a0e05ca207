"""Modality-gap, alignment and uniformity metrics on N paired image/text embeddings.

All functions take L2-normalised features ``image [N, D]`` and ``text [N, D]`` where row i of
each is a pair, and return plain floats. Formulas (the papers named below; docs/evaluation.md):

- centroid distance ‖Δ‖, Δ = mean_i v̂_i − mean_i t̂_i ("Mind the Gap", Liang et al. 2022);
- centroid MSE ‖Δ‖²/D (the CLIP-Refine code's number; a different quantity, named apart);
- mean pair distance mean_i ‖v̂_i − t̂_i‖ (CLIP-Refine's "feature gap");
- linear separability: accuracy of a logistic regression telling image from text embeddings,
  trained on 80 % of the pairs and scored on the other 20 % (0.5 inseparable, 1.0 separable),
  averaged over 5 such splits;
- alignment E‖f(x) − f(y)‖^α over pairs, α = 2, and uniformity
  log E exp(−t‖f(x) − f(y)‖²) over distinct pairs i < j, t = 2 (Wang & Isola, ICML 2020);
- relative alignment mean_i(‖t̂_i − v̂_i‖² − min_{j≠i} ‖t̂_i − v̂_j‖²) (m²-mix, Oh et al. 2023).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from clipft.eval.metrics import check_rows


def _check_pairs(image: Tensor, text: Tensor) -> None:
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"expected paired features of equal shape [N, D], got {tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[0] < 2:
        raise ValueError("need at least 2 pairs")


def centroid_distance(image: Tensor, text: Tensor) -> float:
    """‖mean(v̂) − mean(t̂)‖₂ (range [0, 2])."""
    _check_pairs(image, text)
    return (image.double().mean(0) - text.double().mean(0)).norm().item()


def centroid_mse(image: Tensor, text: Tensor) -> float:
    """‖mean(v̂) − mean(t̂)‖² / D, as CLIP-Refine's code reports the gap."""
    _check_pairs(image, text)
    delta = image.double().mean(0) - text.double().mean(0)
    return (delta.square().sum() / image.shape[1]).item()


def mean_pair_distance(image: Tensor, text: Tensor) -> float:
    """mean_i ‖v̂_i − t̂_i‖₂."""
    _check_pairs(image, text)
    return (image.double() - text.double()).norm(dim=1).mean().item()


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment: mean_i ‖x_i − y_i‖^α (lower is better aligned)."""
    _check_pairs(x, y)
    return (x.double() - y.double()).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: Tensor, t: float = 2.0, chunk_size: int = 2048) -> float:
    """Wang & Isola's uniformity: log mean_{i<j} exp(−t‖x_i − x_j‖²) (lower is more uniform).
    Computed in row blocks with a running log-sum-exp, so memory stays O(chunk_size · N)."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows [N, D], got {tuple(x.shape)}")
    x = x.double()
    n = x.shape[0]
    partial = []
    for start in range(0, n - 1, chunk_size):
        rows = x[start : start + chunk_size]
        sq = torch.cdist(rows, x[start + 1 :]).square()  # row i against columns > i
        i = torch.arange(rows.shape[0]).unsqueeze(1)
        j = torch.arange(sq.shape[1]).unsqueeze(0)
        upper = j >= i  # column start+1+j > row start+i
        partial.append(torch.logsumexp((-t * sq).masked_fill(~upper, float("-inf")).flatten(), dim=0))
    return (torch.logsumexp(torch.stack(partial), dim=0) - math.log(n * (n - 1) / 2)).item()


def relative_alignment(image: Tensor, text: Tensor, groups: Optional[Tensor] = None, chunk_size: int = 2048) -> float:
    """m²-mix's relative alignment: mean_i(‖t̂_i − v̂_i‖² − min_{j: other image} ‖t̂_i − v̂_j‖²).
    Negative when every text is closer to its own image than to any other image. ``groups``
    gives each row's image id (several captions per image): rows of the same image are not
    "other images"."""
    _check_pairs(image, text)
    groups = torch.arange(image.shape[0]) if groups is None else groups
    image, text = image.double(), text.double()
    terms = []
    for start in range(0, text.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        d2 = torch.cdist(text[rows], image).square()
        own = (text[rows] - image[rows]).square().sum(1)
        same = groups[rows].unsqueeze(1) == groups.unsqueeze(0)
        terms.append(own - d2.masked_fill(same, float("inf")).min(dim=1).values)
    return torch.cat(terms).mean().item()


def linear_separability(
    image: Tensor, text: Tensor, seed: int = 0, folds: int = 5, l2: float = 1.0, max_iter: int = 100
) -> float:
    """Accuracy of a logistic regression (image = 0, text = 1) on held-out pairs: the pairs are
    split into ``folds`` seeded parts; each fit sees 80 % of the pairs (at folds=5) and is
    scored on the rest; the result is the mean over folds. L2 penalty ``l2``·½‖w‖² on the
    summed log-loss, i.e. scikit-learn's default C = 1; L-BFGS in float64. Pass one pair per
    image, so that no image is on both sides of a split."""
    _check_pairs(image, text)
    n = image.shape[0]
    folds = max(2, min(folds, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def stack(rows: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([image[rows], text[rows]]).double().cpu()
        y = torch.cat([torch.zeros(len(rows)), torch.ones(len(rows))]).double()
        return x, y

    scores = []
    # Validation runs under torch.inference_mode; the fit needs autograd on ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad():
        for part in order.chunk(folds):
            train = order[~torch.isin(order, part)]
            x_train, y_train = (t.clone() for t in stack(train))
            x_test, y_test = stack(part)
            scores.append(_fit_logistic(x_train, y_train, x_test, y_test, l2, max_iter))
    return sum(scores) / len(scores)


def _fit_logistic(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, l2: float, max_iter: int) -> float:
    w = torch.zeros(x_train.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x_train @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train, reduction="sum")
        loss = loss + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (x_test @ w + b) > 0
    return (predictions == y_test.bool()).double().mean().item()


GAP_METRICS = (
    "centroid_distance", "centroid_mse", "mean_pair_distance", "linear_separability", "alignment",
    "uniformity_image", "uniformity_text", "uniformity_union", "relative_alignment",
)


def modality_gap_metrics(image: Tensor, text: Tensor, seed: int = 0, groups: Optional[Tensor] = None) -> dict[str, float]:
    """Every metric above, with uniformity on images, texts and their union. ``groups`` gives
    each pair's image id when an image has several captions: image uniformity and the
    separability split then use each image once."""
    if groups is None:
        groups = torch.arange(image.shape[0])
    first = torch.tensor(sorted({int(g): i for i, g in reversed(list(enumerate(groups.tolist())))}.values()))
    images = image[first]  # each image once
    return {
        "centroid_distance": centroid_distance(image, text),
        "centroid_mse": centroid_mse(image, text),
        "mean_pair_distance": mean_pair_distance(image, text),
        "linear_separability": linear_separability(images, text[first], seed=seed),
        "alignment": alignment(image, text),
        "uniformity_image": uniformity(images),
        "uniformity_text": uniformity(text),
        "uniformity_union": uniformity(torch.cat([images, text])),
        "relative_alignment": relative_alignment(image, text, groups),
    }


class ModalityGap(Metric):
    """The modality-gap family of paired image and text embeddings
    (:func:`clipft.eval.gap.modality_gap_metrics`): centroid distance and MSE, mean pair
    distance, linear separability, alignment, uniformity (images, texts, union) and relative
    alignment, plus ``n_pairs`` and ``n_images``.

    ``update(image [N, D], text [N, D], image_ids=None, text_ids=None)``: L2-normalised features
    of N pairs. With integer ids (the same on every process for the same item), each distinct
    (image, text) pair counts once, an image with several captions is one image (its
    uniformity, the separability split), and the result does not depend on the order of the
    rows; without ids every row is its own image and text. ``max_images`` caps the images
    scored (a seeded sample; the metrics cost O(N²)); ``seed`` also seeds the separability
    splits. Features are list states, concatenated across processes.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, seed: int = 0, max_images: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.max_images = max_images
        for name in ("image", "text", "image_ids", "text_ids"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, image: Tensor, text: Tensor, image_ids: Optional[Tensor] = None,
               text_ids: Optional[Tensor] = None) -> None:
        if (image_ids is None) != (text_ids is None):
            raise ValueError("ModalityGap.update: pass both image_ids and text_ids, or neither")
        if image_ids is None or text_ids is None:
            image_ids = text_ids = torch.full((image.shape[0],), -1, dtype=torch.long)
        check_rows(image, text, image_ids, text_ids)
        self.image.append(image.detach().float())
        self.text.append(text.detach().float())
        self.image_ids.append(image_ids.to(image.device, torch.long))
        self.text_ids.append(text_ids.to(image.device, torch.long))

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(image, text, groups)`` on the CPU: the distinct pairs scored, sorted by (image id,
        text id), and each row's image index (0 .. n_images - 1)."""
        image, text = dim_zero_cat(self.image).cpu(), dim_zero_cat(self.text).cpu()
        image_ids, text_ids = dim_zero_cat(self.image_ids).cpu(), dim_zero_cat(self.text_ids).cpu()
        if bool((image_ids < 0).any()):
            if not bool((image_ids < 0).all()):
                raise ValueError("ModalityGap: some updates passed ids and some did not")
            image_ids = text_ids = torch.arange(len(image))
        distinct = {(i, t): n for n, (i, t) in enumerate(zip(image_ids.tolist(), text_ids.tolist()))}
        keys = sorted(distinct)
        images = sorted({i for i, _ in keys})
        if self.max_images is not None and len(images) > self.max_images:
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
            chosen = {images[k] for k in pick[: self.max_images].tolist()}
            keys = [k for k in keys if k[0] in chosen]
        group_of = {i: g for g, i in enumerate(sorted({i for i, _ in keys}))}
        rows = [distinct[k] for k in keys]
        return image[rows], text[rows], torch.tensor([group_of[i] for i, _ in keys])

    def compute(self) -> dict[str, Tensor]:
        image, text, groups = self.pairs()
        out = modality_gap_metrics(image, text, seed=self.seed, groups=groups)
        out["n_pairs"], out["n_images"] = float(len(groups)), float(int(groups.max()) + 1)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
