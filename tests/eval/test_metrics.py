"""Tests for clipft.eval.metrics on toy inputs whose answers are known by hand."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from clipft.eval.metrics import (
    best_subclass_logits,
    build_zero_shot_classifier,
    relevance_from_pairs,
    retrieval_recall,
    topk_accuracy,
    zero_shot_logits,
)

# ----------------------------------------------------------------- relevance_from_pairs


def test_relevance_from_pairs_several_captions_per_image() -> None:
    relevance, image_rows, text_rows = relevance_from_pairs(
        ["a", "a", "b", "b"], ["a1", "a2", "b1", "b2"]
    )
    assert relevance.dtype == torch.bool
    assert relevance.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert image_rows == [0, 2]
    assert text_rows == [0, 1, 2, 3]


def test_relevance_from_pairs_shared_caption_is_one_text() -> None:
    relevance, image_rows, text_rows = relevance_from_pairs(
        ["img0", "img1", "img2", "img0"], ["a dog", "a dog", "a cat", "a dog"]
    )
    # "a dog" is one text relevant to img0 and img1; the repeated (img0, "a dog") row is a no-op.
    assert relevance.tolist() == [[True, False], [True, False], [False, True]]
    assert image_rows == [0, 1, 2]
    assert text_rows == [0, 2]


def test_relevance_from_pairs_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        relevance_from_pairs(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="at least one"):
        relevance_from_pairs([], [])


# --------------------------------------------------------------------- retrieval_recall


def _three_by_three() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit features whose similarity matrix (images x texts) is

        [[0.8, 0.6, 0.7],
         [0.1, 0.4, 0.5],
         [0.5, 0.3, 0.1]]

    With text i describing image i, the correct item is ranked 1st, 2nd and 3rd for
    queries 0, 1, 2 in both directions (rows for i2t, columns for t2i).
    """
    sims = torch.tensor([[0.8, 0.6, 0.7], [0.1, 0.4, 0.5], [0.5, 0.3, 0.1]], dtype=torch.float64)
    images = torch.eye(3, 4, dtype=torch.float64)  # e0, e1, e2 in 4-D
    # Text j = column j of sims, padded in the 4th dim to unit norm, so images @ texts.T == sims.
    pad = (1 - (sims**2).sum(dim=0)).sqrt()
    texts = torch.cat([sims.T, pad[:, None]], dim=1)
    assert torch.allclose(texts.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(images @ texts.T, sims)
    return images.float(), texts.float()


def test_identity_features_give_perfect_recall() -> None:
    feats = torch.eye(5)
    result = retrieval_recall(feats, feats, torch.eye(5, dtype=torch.bool), ks=(1, 5, 10))
    assert result == {
        "i2t_r1": 1.0, "t2i_r1": 1.0, "i2t_r5": 1.0, "t2i_r5": 1.0,
        "i2t_r10": 1.0, "t2i_r10": 1.0, "mean_r1": 1.0,
    }


def test_hand_computed_three_by_three() -> None:
    images, texts = _three_by_three()
    result = retrieval_recall(images, texts, torch.eye(3, dtype=torch.bool), ks=(1, 2, 3))
    assert result == {
        "i2t_r1": 1 / 3, "t2i_r1": 1 / 3,
        "i2t_r2": 2 / 3, "t2i_r2": 2 / 3,
        "i2t_r3": 1.0, "t2i_r3": 1.0,
        "mean_r1": 1 / 3,
    }


def test_no_mean_r1_without_k1() -> None:
    images, texts = _three_by_three()
    result = retrieval_recall(images, texts, torch.eye(3, dtype=torch.bool), ks=(2,))
    assert result == {"i2t_r2": 2 / 3, "t2i_r2": 2 / 3}


def test_image_hits_if_any_of_its_captions_is_top1() -> None:
    relevance, image_rows, text_rows = relevance_from_pairs(
        ["a", "a", "b", "b"], ["a1", "a2", "b1", "b2"]
    )
    images = torch.eye(2, 3)  # image a = e0, image b = e1
    texts = F.normalize(
        torch.tensor(
            [
                [0.5, 0.9, 0.0],  # a1: closer to image b than to image a
                [1.0, 0.0, 0.1],  # a2: a's closest text -> a hits at 1 via its 2nd caption
                [0.0, 0.3, 1.0],  # b1
                [0.9, 0.8, 0.0],  # b2: b's best caption, but a1 beats it for b -> rank 2
            ]
        ),
        dim=1,
    )
    result = retrieval_recall(images, texts, relevance, ks=(1, 2))
    assert result["i2t_r1"] == 0.5
    assert result["i2t_r2"] == 1.0
    # t2i: a1 -> b (0.87 vs 0.49): miss; a2 -> a: hit; b1 -> b: hit; b2 -> a (0.75 vs 0.66): miss.
    assert result["t2i_r1"] == 0.5
    assert result["t2i_r2"] == 1.0


def test_shared_caption_relevant_to_both_images() -> None:
    relevance, image_rows, text_rows = relevance_from_pairs(
        ["x", "y", "z"], ["a dog", "a dog", "a cat"]
    )
    images = torch.eye(3)
    # Text "a dog" points at image y, "a cat" at z; "a dog" is relevant to x and y.
    texts = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    result = retrieval_recall(images, texts, relevance, ks=(1,))
    # t2i: "a dog" retrieves y (relevant) and "a cat" retrieves z -> both hit.
    assert result["t2i_r1"] == 1.0
    # i2t: x scores 0 with both texts, a tie with the non-relevant "a cat": a miss (pessimistic);
    # y and z hit.
    assert result["i2t_r1"] == 2 / 3


def test_ties_are_pessimistic() -> None:
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    relevance = torch.tensor(
        [[False, True, False], [False, False, True], [True, False, False]]
    )
    result = retrieval_recall(images, texts, relevance, ks=(1,))
    # Image 0: relevant text 1 ties with non-relevant text 0 at score 1 -> a miss.
    # Image 1: relevant text 2 scores 1, the others 0 -> a hit.
    # Image 2: relevant text 0 (0.6) ties with text 1 (0.6) and text 2 scores 0.8 -> miss.
    assert result["i2t_r1"] == 1 / 3
    # A collapsed model (all features equal) must not look perfect.
    collapsed = retrieval_recall(torch.ones(3, 2), torch.ones(3, 2), torch.eye(3, dtype=torch.bool), ks=(1,))
    assert collapsed["i2t_r1"] == collapsed["t2i_r1"] == 0.0


def _reference_counts(sims: torch.Tensor, relevance: torch.Tensor) -> list[int]:
    """Rank of the best relevant item per row, from an explicit sort (relevant last on ties)."""
    counts = []
    for row_sims, row_rel in zip(sims.tolist(), relevance.tolist()):
        order = sorted(range(len(row_sims)), key=lambda j: (-row_sims[j], row_rel[j]))
        counts.append(next(rank for rank, j in enumerate(order) if row_rel[j]))
    return counts


@pytest.mark.parametrize("integer_features", [False, True])
def test_chunked_equals_unchunked_and_reference(integer_features: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n_images, n_texts, dim = 37, 53, 8
    if integer_features:
        # Small integers: dot products are exact in any summation order and tie often,
        # which checks that the tie rule does not depend on chunking.
        images = torch.randint(-2, 3, (n_images, dim), generator=gen).float()
        texts = torch.randint(-2, 3, (n_texts, dim), generator=gen).float()
    else:
        images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=1)
        texts = F.normalize(torch.randn(n_texts, dim, generator=gen), dim=1)
    relevance = torch.rand(n_images, n_texts, generator=gen) < 0.05
    relevance[torch.arange(n_images), torch.arange(n_images)] = True  # every image
    relevance[torch.arange(n_texts) % n_images, torch.arange(n_texts)] = True  # every text

    ks = (1, 5, 10)
    chunked = retrieval_recall(images, texts, relevance, ks=ks, chunk_size=1)
    odd = retrieval_recall(images, texts, relevance, ks=ks, chunk_size=7)
    whole = retrieval_recall(images, texts, relevance, ks=ks, chunk_size=1024)
    assert chunked == odd == whole

    sims = images.double() @ texts.double().T
    i2t = torch.tensor(_reference_counts(sims, relevance))
    t2i = torch.tensor(_reference_counts(sims.T, relevance.T))
    for k in ks:
        assert whole[f"i2t_r{k}"] == pytest.approx((i2t < k).double().mean().item())
        assert whole[f"t2i_r{k}"] == pytest.approx((t2i < k).double().mean().item())


def test_k_larger_than_gallery_is_clipped() -> None:
    images, texts = _three_by_three()
    result = retrieval_recall(images, texts, torch.eye(3, dtype=torch.bool), ks=(1, 5, 10))
    assert result["i2t_r1"] == 1 / 3
    assert result["i2t_r5"] == result["t2i_r5"] == 1.0
    assert result["i2t_r10"] == result["t2i_r10"] == 1.0


def test_k_is_clipped_by_each_directions_own_gallery() -> None:
    """Non-square galleries: K is clipped by the number of texts for image queries and by the
    number of images for text queries, never by the other modality's count."""
    # 2 images x 3 captions each: image a has two of b's captions above all of its own (hit at
    # K = 3 only); clipping K by the 2 images would make that a miss
    relevance, _, _ = relevance_from_pairs(["a"] * 3 + ["b"] * 3, ["a1", "a2", "a3", "b1", "b2", "b3"])
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    texts = torch.tensor([[0.5, 0, 1], [0.4, 0, 1], [0.3, 0, 1], [0.9, 1, 0], [0.8, 1, 0], [0.0, 1, 0]])
    result = retrieval_recall(images, texts, relevance, ks=(2, 3))
    assert (result["i2t_r2"], result["i2t_r3"]) == (0.5, 1.0)
    assert result["t2i_r2"] == result["t2i_r3"] == 1.0
    # 3 images, 2 captions ("dog" for x and y): "cat" has x and y above its image z, a hit
    # only at K = 3 = the number of images (clipping K by the 2 texts would make it a miss)
    relevance, _, _ = relevance_from_pairs(["x", "y", "z"], ["dog", "dog", "cat"])
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.1]])
    result = retrieval_recall(torch.eye(3), texts, relevance, ks=(2, 3))
    assert (result["t2i_r2"], result["t2i_r3"]) == (0.5, 1.0)


def test_retrieval_recall_errors() -> None:
    feats = torch.eye(3)
    rel = torch.eye(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="feature dims"):
        retrieval_recall(feats, torch.eye(3, 4), rel)
    with pytest.raises(ValueError, match="relevance must have shape"):
        retrieval_recall(feats, feats, torch.eye(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_recall(feats[0], feats, rel)
    with pytest.raises(ValueError, match="bool"):
        retrieval_recall(feats, feats, rel.float())
    no_text = rel.clone()
    no_text[1] = False
    with pytest.raises(ValueError, match="image\\(s\\) have no relevant text, e.g. row 1"):
        retrieval_recall(feats, feats, no_text)
    no_image = rel.clone()
    no_image[:, 2] = False
    no_image[2, 0] = True
    with pytest.raises(ValueError, match="no relevant image, e.g. column 2"):
        retrieval_recall(feats, feats, no_image)
    with pytest.raises(ValueError, match="positive int"):
        retrieval_recall(feats, feats, rel, ks=(0, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_recall(feats, feats, rel, chunk_size=0)
    nan_feats = feats.clone()
    nan_feats[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        retrieval_recall(nan_feats, feats, rel)


# ----------------------------------------------------------------------- zero-shot


def _mean_vs_max_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0's two templates point in very different directions (e.g. prompts that vary
    a nuisance attribute); class 1's two templates agree. The image matches one class-0
    template exactly (cos 1) but class 1's templates only at 0.9.

    mean: class 0 -> normalise(e0 + e1) . e0 = 1/sqrt(2) ~ 0.707 < 0.9 -> predicts class 1.
    max:  class 0 -> 1.0 > 0.9 -> predicts class 0.
    """
    u = torch.tensor([0.9, 0.0, math.sqrt(1 - 0.81)])
    class_text = torch.stack(
        [
            torch.stack([torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])]),
            torch.stack([u, u]),
        ]
    )
    image = torch.tensor([[1.0, 0.0, 0.0]])
    return image, class_text


def test_mean_and_max_ensembles_disagree() -> None:
    image, class_text = _mean_vs_max_example()
    mean_logits = zero_shot_logits(image, class_text, ensemble="mean")
    max_logits = zero_shot_logits(image, class_text, ensemble="max")
    assert mean_logits.shape == max_logits.shape == (1, 2)
    assert torch.allclose(mean_logits, torch.tensor([[1 / math.sqrt(2), 0.9]]))
    assert torch.allclose(max_logits, torch.tensor([[1.0, 0.9]]))
    assert mean_logits.argmax(dim=1).item() == 1
    assert max_logits.argmax(dim=1).item() == 0
    # Default is OpenAI's mean ensembling.
    assert torch.equal(zero_shot_logits(image, class_text), mean_logits)


def test_best_subclass_logits_is_the_max_over_each_class_subclasses() -> None:
    torch.manual_seed(0)
    scores = torch.randn(7, 5)
    parent = torch.tensor([2, 0, 2, 1, 0])
    got = best_subclass_logits(scores, parent, 3)
    for c in range(3):
        assert torch.equal(got[:, c], scores[:, parent == c].max(dim=1).values)
    # its top-1 is the class of the best subclass (CHiLS without reweighting)
    assert torch.equal(got.argmax(1), parent[scores.argmax(1)])
    with pytest.raises(ValueError, match="every one of the 4 classes needs a subclass"):
        best_subclass_logits(scores, parent, 4)
    with pytest.raises(ValueError, match=r"expected \[N, S\] scores and \[S\] parents"):
        best_subclass_logits(scores, parent[:4], 3)


def test_zero_shot_logits_errors() -> None:
    image, class_text = _mean_vs_max_example()
    with pytest.raises(ValueError, match="'mean', 'max'"):
        zero_shot_logits(image, class_text, ensemble="median")
    with pytest.raises(ValueError, match="feature dims"):
        zero_shot_logits(torch.eye(1, 4), class_text)
    with pytest.raises(ValueError, match="C, T, D"):
        zero_shot_logits(image, class_text[0])


def test_topk_accuracy_known_matrix() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # label 1: rank 1
            [0.5, 0.3, 0.2],  # label 1: rank 2
            [0.2, 0.3, 0.5],  # label 0: rank 3
            [0.9, 0.05, 0.04],  # label 0: rank 1
        ]
    )
    labels = torch.tensor([1, 1, 0, 0])
    assert topk_accuracy(logits, labels, ks=(1, 2, 5)) == {"top1": 0.5, "top2": 0.75, "top5": 1.0}
    assert topk_accuracy(logits, labels) == {"top1": 0.5, "top5": 1.0}


def test_topk_accuracy_errors() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="labels must be"):
        topk_accuracy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        topk_accuracy(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        topk_accuracy(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least one K"):
        topk_accuracy(logits, torch.tensor([0, 1]), ks=())


# ---------------------------------------------------------- build_zero_shot_classifier


class FakeTextEncoder:
    """Maps each string to a fixed random unit vector (seeded by its CRC) and records calls."""

    def __init__(self, dim: int = 6) -> None:
        self.dim = dim
        self.batches: list[list[str]] = []

    def vector(self, text: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return F.normalize(torch.randn(self.dim, generator=gen), dim=0)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.batches.append(list(texts))
        return torch.stack([self.vector(t) for t in texts])


def test_build_classifier_shape_order_and_batching() -> None:
    encoder = FakeTextEncoder()
    classes = ["cat", "dog", "bird"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    weights = build_zero_shot_classifier(encoder, classes, templates, batch_size=4)

    assert weights.shape == (3, 2, encoder.dim)
    expected_prompts = [t.format(c) for c in classes for t in templates]
    assert [len(b) for b in encoder.batches] == [4, 2]
    assert [p for b in encoder.batches for p in b] == expected_prompts
    for c, name in enumerate(classes):
        for t, template in enumerate(templates):
            assert torch.equal(weights[c, t], encoder.vector(template.format(name)))


def test_build_classifier_with_callable_templates() -> None:
    encoder = FakeTextEncoder()

    def prompts(name: str) -> list[str]:
        return [f"{name} in the wild", f"a close-up of {name}", f"{name}, drawn"]

    weights = build_zero_shot_classifier(encoder, ["owl", "fox"], prompts, batch_size=256)
    assert weights.shape == (2, 3, encoder.dim)
    assert encoder.batches == [prompts("owl") + prompts("fox")]
    assert torch.equal(weights[1, 1], encoder.vector("a close-up of fox"))


def test_build_classifier_feeds_zero_shot_logits() -> None:
    encoder = FakeTextEncoder()
    weights = build_zero_shot_classifier(encoder, ["cat", "dog"], ["a {}."])
    images = torch.stack([encoder.vector("a dog."), encoder.vector("a cat.")])
    logits = zero_shot_logits(images, weights)
    assert topk_accuracy(logits, torch.tensor([1, 0]), ks=(1,)) == {"top1": 1.0}


def test_build_classifier_errors() -> None:
    encoder = FakeTextEncoder()
    with pytest.raises(ValueError, match="class_names is empty"):
        build_zero_shot_classifier(encoder, [], ["a {}."])
    with pytest.raises(ValueError, match="templates is empty"):
        build_zero_shot_classifier(encoder, ["cat"], [])
    with pytest.raises(ValueError, match="placeholder"):
        build_zero_shot_classifier(encoder, ["cat"], ["a {}.", "a photo."])

    def uneven(name: str) -> list[str]:
        return ["a " + name] if name == "dog" else ["a " + name, "the " + name]

    with pytest.raises(ValueError, match="'dog'"):
        build_zero_shot_classifier(encoder, ["cat", "dog"], uneven)
    assert encoder.batches == []  # validation happens before any encoding


def test_mean_per_class_recall() -> None:
    from clipft.eval.metrics import mean_per_class_recall

    # 3 classes; class 0: 3 of 3 right, class 1: 0 of 1 right (predicted 2); class 2 never true
    logits = torch.tensor([[9.0, 0, 0], [9, 0, 0], [9, 0, 0], [0, 0, 9]])
    labels = torch.tensor([0, 0, 0, 1])
    assert mean_per_class_recall(logits, labels) == 0.5  # top-1 accuracy would be 0.75
