"""The torchmetrics Metric classes of clipft.eval: against torchmetrics' built-ins where the
conventions agree (and where they do not), against the functions on random data, in several
updates and in any order, and on 2 processes (gloo) equal to 1 process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.retrieval import RetrievalHitRate

from clipft.eval import CompositionalAccuracy, ImageTextRetrieval, ModalityGap, ZeroShotAccuracy
from clipft.eval.compositional import pair_accuracy
from clipft.eval.gap import modality_gap_metrics
from clipft.eval.metrics import relevance_from_pairs, retrieval_recall

WORKER = Path(__file__).with_name("metrics_worker.py")


def _tie_free_logits(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.arange(classes), torch.randint(0, classes, (n - classes,), generator=g)])
    return logits, labels  # continuous scores: no ties; every class has a sample


def test_zero_shot_accuracy_equals_multiclass_accuracy_micro_and_macro() -> None:
    logits, labels = _tie_free_logits(200, 10, seed=0)
    metric = ZeroShotAccuracy(10, ks=(1, 3, 5))
    for rows in (slice(0, 70), slice(70, None)):  # two updates
        metric.update(logits[rows], labels[rows])
    got = metric.compute()
    for k in (1, 3, 5):
        micro = MulticlassAccuracy(10, top_k=k, average="micro")(logits, labels)
        assert got[f"top{k}"].item() == pytest.approx(micro.item(), abs=1e-7)
    macro = MulticlassAccuracy(10, average="macro")(logits, labels)
    assert got["mean_per_class_recall"].item() == pytest.approx(macro.item(), abs=1e-7)
    # a naive count, so the numbers are not only torchmetrics'
    top1 = (logits.argmax(1) == labels).double().mean().item()
    assert got["top1"].item() == pytest.approx(top1, abs=1e-12)
    assert 0.05 < top1 < 0.2 and got["top5"] > got["top3"] > got["top1"]  # random scores, 10 classes


def test_where_the_conventions_differ_from_multiclass_accuracy() -> None:
    """A class that is predicted but has no sample: clipft's balanced accuracy leaves it out,
    MulticlassAccuracy(average='macro') counts its recall as 0 (torchmetrics 1.9)."""
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])  # class 2 absent, predicted once
    metric = ZeroShotAccuracy(3, ks=(1,))
    metric.update(logits, labels)
    assert metric.compute()["mean_per_class_recall"].item() == pytest.approx((1.0 + 0.5) / 2)
    assert MulticlassAccuracy(3, average="macro")(logits, labels).item() == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def _retrieval_data(seed: int, n_images: int = 12, captions: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, 8, generator=g, dtype=torch.float64), dim=1)
    image_ids = torch.arange(n_images).repeat_interleave(captions)
    text = F.normalize(images[image_ids] + 1.0 * torch.randn(len(image_ids), 8, generator=g, dtype=torch.float64), dim=1)
    return {"image": images[image_ids], "text": text, "image_ids": image_ids, "text_ids": torch.arange(len(image_ids))}


def test_retrieval_equals_retrieval_hit_rate_on_tie_free_data() -> None:
    """RetrievalHitRate takes flattened query x gallery scores with the query index of each; on
    tie-free scores it equals clipft's R@K in both directions, several captions per image."""
    d = _retrieval_data(seed=1)
    metric = ImageTextRetrieval(ks=(1, 2, 5), chunk_size=5)
    order = torch.randperm(len(d["image"]), generator=torch.Generator().manual_seed(2))
    for rows in order.chunk(3):  # any order, several updates
        metric.update(*(d[k][rows] for k in ("image", "text", "image_ids", "text_ids")))
    got = metric.compute()
    relevance, image_rows, text_rows = relevance_from_pairs(d["image_ids"].tolist(), d["text_ids"].tolist())
    scores = d["image"][image_rows] @ d["text"][text_rows].T  # [12, 36]
    assert got["n_images"] == 12 and got["n_texts"] == 36
    for k in (1, 2, 5):
        for direction, s, rel in (("i2t", scores, relevance), ("t2i", scores.T, relevance.T)):
            indexes = torch.arange(s.shape[0]).repeat_interleave(s.shape[1])
            expected = RetrievalHitRate(top_k=k)(s.flatten(), rel.flatten(), indexes=indexes)
            assert got[f"{direction}_r{k}"].item() == pytest.approx(expected.item(), abs=1e-7), (direction, k)
    assert 0.2 < got["i2t_r1"] < got["i2t_r5"] < 1  # a case where K matters


def test_where_the_conventions_differ_from_retrieval_hit_rate() -> None:
    """A relevant item tied with a non-relevant one: clipft ranks it behind (a miss at K = 1);
    RetrievalHitRate breaks the tie by order (here a hit)."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # image 0's text 0 tied with image 1's text 1
    metric = ImageTextRetrieval(ks=(1,))
    metric.update(images[[0, 1, 1]], texts, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    assert metric.compute()["i2t_r1"].item() == 0.5  # image 0 misses
    scores = (images @ texts.T).flatten()
    target = torch.tensor([True, False, False, False, True, True])
    hit_rate = RetrievalHitRate(top_k=1)(scores, target, indexes=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert hit_rate.item() == 1.0


def test_classes_equal_the_functions_on_random_data() -> None:
    d = _retrieval_data(seed=3, n_images=30, captions=2)
    keys = ("image", "text", "image_ids", "text_ids")
    # retrieval: the function on the deduplicated features, the class fed with repeated rows
    relevance, image_rows, text_rows = relevance_from_pairs(d["image_ids"].tolist(), d["text_ids"].tolist())
    expected = retrieval_recall(d["image"][image_rows], d["text"][text_rows], relevance, ks=(1, 5, 10))
    retrieval = ImageTextRetrieval()
    retrieval.update(*(d[k] for k in keys))
    retrieval.update(*(d[k][:7] for k in keys))  # a sampler's padding: the same pairs again
    got = retrieval.compute()
    assert {k: got[k].item() for k in expected} == pytest.approx(expected, abs=1e-12)
    # gap: rows shuffled and repeated give the function's numbers on the pairs sorted by id
    gap = ModalityGap(seed=0)
    shuffled = torch.randperm(60, generator=torch.Generator().manual_seed(4))
    gap.update(*(d[k][shuffled] for k in keys))
    gap.update(*(d[k][:5] for k in keys))
    expected = modality_gap_metrics(d["image"].float(), d["text"].float(), seed=0, groups=d["image_ids"])
    got = {k: v.item() for k, v in gap.compute().items()}
    assert got.pop("n_pairs") == 60 and got.pop("n_images") == 30
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # without ids every row is its own pair
    plain = ModalityGap()
    plain.update(d["image"][:20], d["text"][:20])
    assert plain.compute()["centroid_distance"].item() == pytest.approx(
        modality_gap_metrics(d["image"][:20].float(), d["text"][:20].float())["centroid_distance"], rel=1e-9)
    # compositional: per subset, the function's accuracy; groups are means of the subsets present
    compositional = CompositionalAccuracy()
    g = torch.Generator().manual_seed(5)
    negatives = F.normalize(d["text"] + torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    compositional.update(d["image"][:25], d["text"][:25], negatives[:25], "swap_obj")
    compositional.update(d["image"][25:], d["text"][25:], negatives[25:], "swap_att")
    got = {k: v.item() for k, v in compositional.compute().items()}
    assert got["swap_obj"] == pair_accuracy(d["image"][:25], d["text"][:25], negatives[:25])
    assert got["swap_att"] == pair_accuracy(d["image"][25:], d["text"][25:], negatives[25:])
    assert got["SWAP"] == pytest.approx((got["swap_obj"] + got["swap_att"]) / 2) and set(got) == {"swap_obj", "swap_att", "SWAP"}
    with pytest.raises(ValueError, match="subset 'swap' is not one of"):
        compositional.update(d["image"], d["text"], negatives, "swap")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    """Each of 2 gloo processes updates with its uneven share (the id-keyed metrics also with a
    padding row); after torchmetrics' reduction every metric equals one process on all rows."""
    sys.path.insert(0, str(WORKER.parent))
    from metrics_worker import results

    out = tmp_path / "two.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out)], env={**env, "RANK": str(r)},
                              stderr=subprocess.PIPE) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    two = torch.load(out)
    one = results()
    assert set(two) == set(one) == {"zeroshot", "retrieval", "gap", "compositional"}
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-6, abs=1e-9), name
    assert one["retrieval"]["n_images"] == 23 and one["gap"]["n_pairs"] == 69


def test_the_example_in_the_docs_runs() -> None:
    """docs/evaluation.md's LightningModule, with a stand-in model, logs the metrics' numbers."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    block = text.split("In your own LightningModule", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "docs/evaluation.md", "exec"), namespace)
    d = _retrieval_data(seed=6, n_images=10, captions=2)
    identity = torch.nn.Module()
    identity.encode_image = identity.encode_text = lambda x: x  # "images" and "texts" are features
    module = namespace["MyCLIP"](identity)
    logged: dict[str, float] = {}
    module.log_dict = lambda values: logged.update({k: float(v) for k, v in values.items()})
    for rows in (slice(0, 8), slice(8, None)):
        batch = {"images": d["image"][rows], "texts": d["text"][rows], "image_ids": d["image_ids"][rows],
                 "text_ids": d["text_ids"][rows]}
        module.validation_step(batch, 0)
    module.on_validation_epoch_end()
    relevance, image_rows, text_rows = relevance_from_pairs(d["image_ids"].tolist(), d["text_ids"].tolist())
    expected = retrieval_recall(d["image"][image_rows], d["text"][text_rows], relevance, ks=(1, 5))
    assert logged["val/retrieval/i2t_r1"] == pytest.approx(expected["i2t_r1"])
    assert logged["val/gap/n_pairs"] == 20 and "val/gap/linear_separability" in logged
    assert module.retrieval.image_features == []  # reset for the next validation
