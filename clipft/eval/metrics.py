"""Retrieval and zero-shot classification metrics for CLIP-style models.

Everything here is a pure function of feature tensors, so it can be unit-tested on toy
inputs and reused by any evaluation loop (Lightning callbacks, scripts, notebooks)
without importing a model library.

Conventions shared by all functions:

* Features are expected to be **L2-normalised already** (as produced by the model's
  encoders followed by normalisation). Nothing here re-normalises them, so the dot
  product *is* the cosine similarity; passing unnormalised features silently gives
  dot-product rankings instead.
* Metric values are returned as plain Python ``float`` in ``[0, 1]`` so they can be
  logged or serialised directly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "ImageTextRetrieval",
    "ZeroShotAccuracy",
    "build_zero_shot_classifier",
    "relevance_from_pairs",
    "retrieval_recall",
    "topk_accuracy",
    "zero_shot_logits",
]

_ENSEMBLE_MODES = ("mean", "max")


def _validate_ks(ks: Sequence[int]) -> list[int]:
    """Check that ``ks`` is a non-empty sequence of positive ints and return it as a list.

    Done up front so that a typo such as ``ks=(0, 5)`` fails loudly instead of yielding a
    meaningless ``r0`` key.
    """
    ks_list = list(ks)
    if not ks_list:
        raise ValueError("ks must contain at least one K")
    for k in ks_list:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every K in ks must be a positive int, got {k!r}")
    return ks_list


# --------------------------------------------------------------------------- retrieval


def relevance_from_pairs(
    image_ids: Sequence[Hashable], captions: Sequence[str]
) -> tuple[Tensor, list[int], list[int]]:
    """Turn (image, caption) rows into a deduplicated image x text relevance matrix.

    Retrieval datasets usually come as one row per pair: several captions per image
    (COCO, Flickr) and sometimes one caption string shared by several images (templated
    or class-like captions). Scoring the raw rows would count the same image (or text)
    several times in the gallery, and a duplicate of the correct answer would compete
    with it for the top ranks. So images are deduplicated by id and texts by their
    **exact** caption string: identical caption texts are one gallery item, relevant to
    every image they were paired with, which keeps R@K well defined when several images
    share a caption.

    Args:
        image_ids: One hashable id per row (e.g. a file path or dataset index).
        captions: One caption string per row, aligned with ``image_ids``.

    Returns:
        ``(relevance, image_rows, text_rows)`` where ``relevance`` is a bool tensor of
        shape ``[n_images, n_texts]`` (``True`` where the pair occurs in the input),
        ``image_rows[i]`` is the first input row of unique image ``i`` and
        ``text_rows[j]`` the first input row of unique text ``j``, both in
        first-occurrence order. Use the index lists to pick one feature vector per unique
        image / text from per-row features, e.g. ``image_feats[image_rows]``.

    Raises:
        ValueError: If the sequences differ in length or are empty.
    """
    if len(image_ids) != len(captions):
        raise ValueError(
            "image_ids and captions must have the same length, "
            f"got {len(image_ids)} and {len(captions)}"
        )
    if len(image_ids) == 0:
        raise ValueError("relevance_from_pairs needs at least one (image, caption) pair")

    image_index: dict[Hashable, int] = {}
    text_index: dict[str, int] = {}
    image_rows: list[int] = []
    text_rows: list[int] = []
    pairs: list[tuple[int, int]] = []
    for row, (image_id, caption) in enumerate(zip(image_ids, captions)):
        if image_id not in image_index:
            image_index[image_id] = len(image_rows)
            image_rows.append(row)
        if caption not in text_index:
            text_index[caption] = len(text_rows)
            text_rows.append(row)
        pairs.append((image_index[image_id], text_index[caption]))

    relevance = torch.zeros(len(image_rows), len(text_rows), dtype=torch.bool)
    pair_index = torch.tensor(pairs, dtype=torch.long)
    relevance[pair_index[:, 0], pair_index[:, 1]] = True
    return relevance, image_rows, text_rows


def _hits_per_query(
    queries: Tensor, gallery: Tensor, relevance: Tensor, chunk_size: int
) -> Tensor:
    """Return, per query row, how many non-relevant gallery items score >= its best relevant one.

    Only ``chunk_size`` rows of the similarity matrix exist at a time, so memory is
    ``O(chunk_size * len(gallery))`` rather than ``O(len(queries) * len(gallery))``.
    ``relevance`` is ``[n_queries, n_gallery]``.
    """
    counts = []
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start : start + chunk_size] @ gallery.T
        rel = relevance[start : start + chunk_size]
        best_relevant = sims.masked_fill(~rel, float("-inf")).amax(dim=1, keepdim=True)
        # Ties with the best relevant item count against the query (pessimistic).
        counts.append(((sims >= best_relevant) & ~rel).sum(dim=1))
    return torch.cat(counts)


def retrieval_recall(
    image_features: Tensor,
    text_features: Tensor,
    relevance: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image Recall@K, as reported in CLIP retrieval benchmarks.

    Recall@K here is the *fraction of queries with at least one relevant item in the top K*
    (the COCO/Flickr convention): torchmetrics' ``RetrievalHitRate`` on the flattened scores,
    not its ``RetrievalRecall`` (the fraction of a query's relevant items retrieved). It is
    computed here for the tie rule below and the chunked scoring (``RetrievalHitRate`` takes
    every score at once and orders ties by position); :class:`ImageTextRetrieval` is this
    function as a torchmetrics ``Metric``.

    Features must already be L2-normalised: they are **not** re-normalised, so the dot
    product is the cosine similarity. Similarities are computed in float32 (half-precision
    scores create many spurious exact ties).

    Tie rule: a query's rank is the number of *non-relevant* gallery items scoring
    at least as high as its best relevant item, and it hits at K if that number is
    ``< K``. This makes results deterministic (independent of sort stability or chunking)
    and pessimistic on exact ties: a relevant item tied with non-relevant ones counts as
    ranked behind them, so a collapsed model (identical features) scores no better than
    its worst case instead of a perfect recall.

    K larger than the gallery is clipped to the gallery size (so it scores 1.0). The
    similarity matrix is computed ``chunk_size`` query rows at a time in each direction,
    so the full ``N x M`` matrix is never materialised.

    Args:
        image_features: ``[N, D]`` L2-normalised image embeddings.
        text_features: ``[M, D]`` L2-normalised text embeddings.
        relevance: ``[N, M]`` bool, ``True`` where text ``j`` describes image ``i`` (see
            :func:`relevance_from_pairs`).
        ks: Cut-offs to report.
        chunk_size: Number of query rows scored at a time.

    Returns:
        ``{"i2t_r{k}": ..., "t2i_r{k}": ...}`` for each ``k`` in ``ks``, plus
        ``"mean_r1"`` (mean of ``i2t_r1`` and ``t2i_r1``) when ``1`` is in ``ks``.

    Raises:
        ValueError: On mismatched shapes, empty inputs, non-finite features, invalid
            ``ks``/``chunk_size``, or an image (row) or text (column) without any
            relevant counterpart, since such a query could never hit and would silently
            lower the recall.
    """
    ks_list = _validate_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must be 2-D [n, dim], got shapes "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    n_images, dim = image_features.shape
    n_texts = text_features.shape[0]
    if text_features.shape[1] != dim:
        raise ValueError(
            f"feature dims differ: images have {dim}, texts have {text_features.shape[1]}"
        )
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"need at least one image and one text, got {n_images} and {n_texts}")
    if relevance.shape != (n_images, n_texts):
        raise ValueError(
            f"relevance must have shape [n_images, n_texts] = [{n_images}, {n_texts}], "
            f"got {list(relevance.shape)}"
        )
    if relevance.dtype != torch.bool:
        raise ValueError(f"relevance must be a bool tensor, got dtype {relevance.dtype}")
    images_without_text = (~relevance.any(dim=1)).nonzero().flatten()
    if images_without_text.numel():
        raise ValueError(
            f"{images_without_text.numel()} image(s) have no relevant text, e.g. row "
            f"{images_without_text[0].item()}"
        )
    texts_without_image = (~relevance.any(dim=0)).nonzero().flatten()
    if texts_without_image.numel():
        raise ValueError(
            f"{texts_without_image.numel()} text(s) have no relevant image, e.g. column "
            f"{texts_without_image[0].item()}"
        )

    # NaN compares False with everything, so a NaN query would count as a hit.
    if not (torch.isfinite(image_features).all() and torch.isfinite(text_features).all()):
        raise ValueError("image_features and text_features must be finite (found NaN or inf)")

    images = image_features.float()
    texts = text_features.float()
    relevance = relevance.to(images.device)

    results: dict[str, float] = {}
    with torch.no_grad():
        i2t_counts = _hits_per_query(images, texts, relevance, chunk_size).cpu()
        t2i_counts = _hits_per_query(texts, images, relevance.T, chunk_size).cpu()
    for k in ks_list:
        # float64 (on CPU, where it is always supported) so 1 hit in 3 reads back as 1/3.
        results[f"i2t_r{k}"] = (i2t_counts < min(k, n_texts)).double().mean().item()
        results[f"t2i_r{k}"] = (t2i_counts < min(k, n_images)).double().mean().item()
    if 1 in ks_list:
        results["mean_r1"] = (results["i2t_r1"] + results["t2i_r1"]) / 2
    return results


# ------------------------------------------------------------------------- zero-shot


def zero_shot_logits(
    image_features: Tensor, class_text_features: Tensor, ensemble: str = "mean"
) -> Tensor:
    """Cosine scores of images against classes described by several prompt templates.

    ``"mean"`` is OpenAI CLIP's prompt ensembling: average the ``T`` template embeddings
    of a class, re-normalise, and take the cosine with the image. ``"max"`` instead takes,
    per class, the maximum cosine over the templates. Both are offered because they
    fail differently: when text embeddings are dominated by a nuisance attribute that the
    templates vary (e.g. style or colour words), the mean averages that attribute out
    together with much of the class signal, whereas the max lets the template that matches
    the image's nuisance attribute carry the decision.

    Args:
        image_features: ``[N, D]`` L2-normalised image embeddings.
        class_text_features: ``[C, T, D]`` L2-normalised text embeddings of ``C`` classes
            x ``T`` templates (see :func:`build_zero_shot_classifier`).
        ensemble: ``"mean"`` or ``"max"``.

    Returns:
        ``[N, C]`` cosine similarities (unscaled; multiply by the model's logit scale if a
        softmax temperature matters, argmax/top-K do not depend on it).

    Raises:
        ValueError: On an unknown ``ensemble`` or mismatched shapes.
    """
    if ensemble not in _ENSEMBLE_MODES:
        raise ValueError(f"ensemble must be one of {_ENSEMBLE_MODES}, got {ensemble!r}")
    if image_features.ndim != 2:
        raise ValueError(f"image_features must be [N, D], got shape {tuple(image_features.shape)}")
    if class_text_features.ndim != 3:
        raise ValueError(
            f"class_text_features must be [C, T, D], got shape {tuple(class_text_features.shape)}"
        )
    if class_text_features.shape[-1] != image_features.shape[-1]:
        raise ValueError(
            f"feature dims differ: images have {image_features.shape[-1]}, "
            f"class texts have {class_text_features.shape[-1]}"
        )
    if class_text_features.shape[0] == 0 or class_text_features.shape[1] == 0:
        raise ValueError(
            f"class_text_features needs at least one class and one template, "
            f"got shape {tuple(class_text_features.shape)}"
        )

    class_text_features = class_text_features.to(image_features.dtype)
    if ensemble == "mean":
        class_embeddings = F.normalize(class_text_features.mean(dim=1), dim=-1)
        return image_features @ class_embeddings.T
    return torch.einsum("nd,ctd->nct", image_features, class_text_features).amax(dim=-1)


def topk_accuracy(
    logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Micro-averaged top-K accuracy: fraction of samples whose label is among the K best.

    K is clipped to the number of classes, so ``top5`` with 3 classes is 1.0 rather than
    an error; this lets one config serve datasets with few classes. Ties are broken by
    :func:`torch.topk`, as in the usual CLIP zero-shot evaluation code, so numbers stay
    comparable to published ones.

    Args:
        logits: ``[N, C]`` scores (any monotone scale).
        labels: ``[N]`` integer class indices in ``[0, C)``.
        ks: Cut-offs to report.

    Returns:
        ``{"top{k}": accuracy}`` for each ``k`` in ``ks``.

    Raises:
        ValueError: On mismatched shapes, empty input, invalid ``ks`` or out-of-range labels.
    """
    metric = ZeroShotAccuracy(logits.shape[-1] if logits.ndim == 2 else 0, ks, sync_on_compute=False)
    metric.update(logits, labels)
    return {k: v.item() for k, v in metric.compute().items() if k.startswith("top")}


def check_logits_and_labels(logits: Tensor, labels: Tensor, n_classes: Optional[int] = None) -> None:
    """``logits [N, C]`` and integer ``labels [N]`` in ``[0, C)`` (C = ``n_classes`` if given)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    n_samples = logits.shape[0]
    if n_classes is not None and logits.shape[1] != n_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes, the metric was made for {n_classes}")
    n_classes = logits.shape[1]
    if labels.ndim != 1 or labels.shape[0] != n_samples:
        raise ValueError(
            f"labels must be [N] with N = {n_samples}, got shape {tuple(labels.shape)}"
        )
    if n_samples == 0 or n_classes == 0:
        raise ValueError(
            f"need at least one sample and one class, got logits shape {(n_samples, n_classes)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}), "
            f"got range [{labels.min().item()}, {labels.max().item()}]"
        )


def best_subclass_logits(subclass_logits: Tensor, parent: Tensor, num_classes: int) -> Tensor:
    """Class scores from subclass scores: each class takes the best score of its subclasses.

    CHiLS (Novack et al., "CHiLS: Zero-Shot Image Classification with Hierarchical Label
    Sets", ICML 2023) classifies into the finer label set and reports the coarse class of the
    prediction; the top-1 of these scores is exactly that, and top-K ranks the classes by
    their best subclass.

    Args:
        subclass_logits: ``[N, S]`` scores of ``S`` subclasses (e.g. :func:`zero_shot_logits`).
        parent: ``[S]`` the class index of each subclass, in ``[0, num_classes)``.
        num_classes: ``C``; every class needs at least one subclass.

    Returns:
        ``[N, C]`` scores.
    """
    if subclass_logits.ndim != 2 or parent.shape != (subclass_logits.shape[1],):
        raise ValueError(f"expected [N, S] scores and [S] parents, got {tuple(subclass_logits.shape)} "
                         f"and {tuple(parent.shape)}")
    if parent.unique().numel() != num_classes or int(parent.min()) < 0 or int(parent.max()) >= num_classes:
        raise ValueError(f"every one of the {num_classes} classes needs a subclass")
    out = subclass_logits.new_full((subclass_logits.shape[0], num_classes), float("-inf"))
    index = parent.to(subclass_logits.device).expand_as(subclass_logits)
    return out.scatter_reduce(1, index, subclass_logits, reduce="amax", include_self=True)


def build_zero_shot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] | Callable[[str], Sequence[str]],
    batch_size: int = 256,
) -> Tensor:
    """Embed every (class, template) prompt into a ``[C, T, D]`` tensor.

    The per-template embeddings are kept (rather than averaged here) so that
    :func:`zero_shot_logits` can choose the ensembling rule afterwards without
    re-encoding.

    Args:
        encode_text: Maps a list of strings to ``[len(list), D]`` L2-normalised features.
            The caller handles tokenisation, device placement and ``no_grad``; this keeps
            the function independent of any model library.
        class_names: The ``C`` class names, in label order.
        templates: Either format strings with one ``{}`` applied to every class
            (``"a photo of a {}."``), or a callable returning the full list of prompts
            for a class name (for class-specific prompts). A callable must return the
            same number ``T`` of prompts for every class so the result is rectangular.
            A single string is treated as one template.
        batch_size: Maximum number of strings per ``encode_text`` call, to bound memory.

    Returns:
        ``[C, T, D]`` tensor; ``[c, t]`` is the embedding of template ``t`` for class ``c``.

    Raises:
        ValueError: On no classes, no templates, a template string without ``{}``, a
            callable returning a different number of prompts for some class, a
            non-positive ``batch_size`` or an ``encode_text`` output of the wrong shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(class_names) == 0:
        raise ValueError("class_names is empty: need at least one class")

    prompts: list[str] = []
    if callable(templates):
        n_templates: int | None = None
        for name in class_names:
            class_prompts = list(templates(name))
            if not class_prompts:
                raise ValueError(f"templates callable returned no prompts for class {name!r}")
            if n_templates is None:
                n_templates = len(class_prompts)
            elif len(class_prompts) != n_templates:
                raise ValueError(
                    f"templates callable returned {len(class_prompts)} prompts for class "
                    f"{name!r} but {n_templates} for class {class_names[0]!r}; every class "
                    "needs the same number of prompts"
                )
            prompts.extend(class_prompts)
        assert n_templates is not None
    else:
        template_list = [templates] if isinstance(templates, str) else list(templates)
        if not template_list:
            raise ValueError("templates is empty: need at least one template")
        for template in template_list:
            if "{}" not in template:
                raise ValueError(
                    f"template {template!r} has no '{{}}' placeholder for the class name"
                )
        n_templates = len(template_list)
        for name in class_names:
            for template in template_list:
                try:
                    prompts.append(template.format(name))
                except (IndexError, KeyError, ValueError) as err:
                    raise ValueError(f"cannot format template {template!r}: {err}") from err

    chunks: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        features = encode_text(batch)
        if features.ndim != 2 or features.shape[0] != len(batch):
            raise ValueError(
                f"encode_text returned shape {tuple(features.shape)} for {len(batch)} strings; "
                "expected [n_strings, dim]"
            )
        chunks.append(features)
    embeddings = torch.cat(chunks)
    return embeddings.reshape(len(class_names), n_templates, embeddings.shape[-1])


def mean_per_class_recall(logits: Tensor, labels: Tensor) -> float:
    """Top-1 recall of each class that has at least one sample, averaged over those classes
    (balanced accuracy). Classes that are only predicted, never true, are left out: their
    recall is undefined, and counting them as 0 would punish a task whose label set is a
    subset of the classifier's classes. (:class:`~clipft.eval.ZeroShotAccuracy` computes it.)"""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    metric = ZeroShotAccuracy(logits.shape[1], ks=(1,), sync_on_compute=False)
    metric.update(logits, labels)
    return metric.compute()["mean_per_class_recall"].item()


# ------------------------------------------------------------- as torchmetrics Metrics


class ZeroShotAccuracy(Metric):
    """Top-K accuracy and balanced accuracy of classification scores.

    ``update(logits [N, C], labels [N])``; ``compute()`` returns ``{"top{k}": ...,
    "mean_per_class_recall": ...}`` (float64 tensors). Top-K: the fraction of samples whose label
    is among the K best scores (ties broken by :func:`torch.topk`; K clipped to C, so ``top5``
    of 3 classes is 1). Balanced accuracy: the top-1 recall of each class that has samples,
    averaged over those classes (a class that is only predicted is left out). States are
    counts, summed across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(_validate_ks(ks))
        self.num_classes = num_classes
        self.add_state("hits", torch.zeros(len(self.ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_hits", torch.zeros(max(num_classes, 0), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_support", torch.zeros(max(num_classes, 0), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        check_logits_and_labels(logits, labels, self.num_classes)
        labels = labels.to(logits.device)
        n_classes = logits.shape[1]
        top = logits.topk(min(max(self.ks), n_classes), dim=1).indices
        correct = top == labels.unsqueeze(1)  # at most one True per row
        self.hits += torch.stack([correct[:, : min(k, n_classes)].any(dim=1).sum() for k in self.ks]).to(self.hits)
        self.total += labels.numel()
        right = logits.argmax(dim=1) == labels
        self.class_support += torch.bincount(labels, minlength=n_classes).to(self.class_support)
        self.class_hits += torch.bincount(labels[right], minlength=n_classes).to(self.class_hits)

    def compute(self) -> dict[str, Tensor]:
        total = self.total.double()
        out = {f"top{k}": self.hits[i].double() / total for i, k in enumerate(self.ks)}
        present = self.class_support > 0
        out["mean_per_class_recall"] = (self.class_hits[present].double() / self.class_support[present]).mean()
        return out


class ImageTextRetrieval(Metric):
    """Image→text and text→image R@K: the fraction of queries with a relevant item in the top K.

    ``update(image_features [N, D], text_features [N, D], image_ids [N], text_ids [N])`` with one
    row per (image, caption) pair, L2-normalised features, and integer ids that name the image
    and the caption of each row (the same id on every process for the same item: a dataset
    index, say). Rows of one image id are one gallery image, rows of one text id one gallery
    text, relevant to every image it was paired with; so several captions per image, a caption
    shared by several images, and the repeated samples a distributed sampler pads with are all
    counted once. ``compute()`` returns ``{"i2t_r{k}", "t2i_r{k}", "mean_r1", "n_images",
    "n_texts"}`` through :func:`clipft.eval.metrics.retrieval_recall`: its tie rule (a relevant
    item tied with non-relevant ones ranks behind them) and its chunked scoring (``chunk_size``
    query rows at a time; the full similarity matrix is never built). Features are kept as
    list states, concatenated across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(_validate_ks(ks))
        self.chunk_size = chunk_size
        for name in ("image_features", "text_features", "image_ids", "text_ids"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor) -> None:
        check_rows(image_features, text_features, image_ids, text_ids)
        self.image_features.append(image_features.detach().float())
        self.text_features.append(text_features.detach().float())
        self.image_ids.append(image_ids.to(image_features.device, torch.long))
        self.text_ids.append(text_ids.to(image_features.device, torch.long))

    def compute(self) -> dict[str, Tensor]:
        image, text = dim_zero_cat(self.image_features), dim_zero_cat(self.text_features)
        relevance, image_rows, text_rows = relevance_from_pairs(
            dim_zero_cat(self.image_ids).tolist(), dim_zero_cat(self.text_ids).tolist()
        )
        out = retrieval_recall(image[image_rows], text[text_rows], relevance, self.ks, self.chunk_size)
        out["n_images"], out["n_texts"] = relevance.shape
        return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in out.items()}


def check_rows(image: Tensor, text: Tensor, image_ids: Tensor, text_ids: Tensor) -> None:
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"expected paired features of equal shape [N, D], got {tuple(image.shape)} and {tuple(text.shape)}")
    if image_ids.shape != (image.shape[0],) or text_ids.shape != (image.shape[0],):
        raise ValueError(
            f"expected one image id and one text id per row ({image.shape[0]}), got shapes "
            f"{tuple(image_ids.shape)} and {tuple(text_ids.shape)}"
        )
    if image_ids.dtype.is_floating_point or text_ids.dtype.is_floating_point:
        raise ValueError("image_ids and text_ids must be integer tensors")
