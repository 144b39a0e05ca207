"""The evaluation callbacks on toy cases with known answers (no training involved)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clipft.data.batch import Batch
from clipft.eval.callbacks import (
    GapCallback,
    RetrievalCallback,
    RunReport,
    ValidationFeatures,
    ZeroShotCallback,
    ZeroShotTask,
)


class FakeModule:
    """Just what the callbacks use: device, tokenizer, encoders and log."""

    def __init__(self, vocab: list[str]) -> None:
        self.device = torch.device("cpu")
        self._trainer = None
        self.vocab = vocab
        self.logged: dict[str, float] = {}
        self.trainer = SimpleNamespace(world_size=1, sanity_checking=False, is_global_zero=True, global_step=3)

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, len(self.vocab)).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1), dim=1)  # an "image" is already its feature

    def log(self, name: str, value: float, **_: object) -> None:
        self.logged[name] = float(value)


def test_retrieval_callback_dedupes_and_counts() -> None:
    module = FakeModule([])
    features = ValidationFeatures()
    callback = RetrievalCallback(features, ks=(1, 2))
    trainer = module.trainer
    e = torch.eye(3)
    # image A with two captions (rows 0, 1), image B and image C share the caption "same".
    # texts: "a1"→A, "a2"→A (weaker), "same"→B. C's features point at text "a1": a miss.
    image_rows = torch.stack([e[0], e[0], e[1], e[2]])
    text_rows = torch.stack([e[0], F.normalize(e[0] + e[2], dim=0), e[1], e[1]])
    batches = [
        (image_rows[:2], text_rows[:2], ["a1", "a2"], ["A", "A"]),
        (image_rows[2:], text_rows[2:], ["same", "same"], ["B", "C"]),
    ]
    features.on_validation_epoch_start(trainer, module)
    for i, (img, txt, caps, ids) in enumerate(batches):
        batch = Batch(img, torch.zeros(2, 1), caps, ids)
        features.on_validation_batch_end(trainer, module, {"image_features": img, "text_features": txt}, batch, i)
    callback.on_validation_epoch_end(trainer, module)
    got = module.logged
    assert got["val/retrieval/n_images"] == 3 and got["val/retrieval/n_texts"] == 3
    # i2t: A→a1 hit; B→"same" hit; C: scores a1 0, a2 0.707, same 0 → top-1 is a2 (not C's): miss
    assert got["val/retrieval/i2t_r1"] == pytest.approx(2 / 3)
    # t2i: a1→A hit, a2→(A 0.707, C 0.707 tie → pessimistic miss), same→B hit
    assert got["val/retrieval/t2i_r1"] == pytest.approx(2 / 3)
    assert got["val/retrieval/t2i_r2"] == 1.0


class Images(torch.utils.data.Dataset):
    def __init__(self, features: torch.Tensor, labels: list[int]) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return self.features[i], self.labels[i], str(i)


def test_zero_shot_callback_mean_vs_max() -> None:
    # 2 classes × 2 templates over a 4-word vocabulary; text features are one-hot on words.
    vocab = ["cat-a", "cat-b", "dog-a", "dog-b"]
    module = FakeModule(vocab)
    templates = lambda name: [f"{name}-a", f"{name}-b"]  # noqa: E731
    # image 0 (a cat): its best template is cat-a (0.9 > 0.7), so max says cat; but both dog
    # templates score 0.7, so the mean of the dog templates wins (1.4/√2 > 0.9/√2): mean says dog.
    # images 1 (cat) and 2 (dog) are one-hot on their class: both rules are right.
    features = torch.tensor([[0.9, 0.0, 0.7, 0.7], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    data = Images(features, [0, 0, 1])
    expected = {"max": (1.0, 1.0), "mean": (2 / 3, (1 / 2 + 1) / 2)}  # (top1, balanced accuracy)
    for ensemble, (top1, balanced) in expected.items():
        task = ZeroShotTask("animals", data, ["cat", "dog"], templates, ensemble)
        callback = ZeroShotCallback([task], batch_size=1)
        callback.on_validation_epoch_end(module.trainer, module)
        assert module.logged["val/zeroshot/animals/top1"] == pytest.approx(top1), ensemble
        assert module.logged["val/zeroshot/animals/mean_per_class_recall"] == pytest.approx(balanced), ensemble
        assert module.logged["val/zeroshot/animals/top5"] == 1.0
    # labels swapped: every prediction of max wrong
    task = ZeroShotTask("swapped", Images(features, [1, 1, 0]), ["cat", "dog"], templates, "max")
    ZeroShotCallback([task]).on_validation_epoch_end(module.trainer, module)
    assert module.logged["val/zeroshot/swapped/top1"] == 0.0
    assert module.logged["val/zeroshot/swapped/mean_per_class_recall"] == 0.0


def test_run_report_writes_val_metrics(tmp_path: Path) -> None:
    report = RunReport(tmp_path / "report.json", extra={"method": "finetune"})
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, global_step=7, current_epoch=0,
        callback_metrics={"val/loss": torch.tensor(1.5), "train/loss": torch.tensor(2.0), "val/x/top1": torch.tensor(0.25)},
    )
    report.on_validation_end(trainer, None)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == {"method": "finetune", "global_step": 7, "epoch": 0, "metrics": {"val/loss": 1.5, "val/x/top1": 0.25}}
    assert not list(tmp_path.glob(".report.json.*"))  # no temporary file left behind


def test_gap_callback_shares_features_and_plots(tmp_path: Path) -> None:
    module = FakeModule([])
    features = ValidationFeatures()
    gap = GapCallback(features, plot_path=tmp_path / "gap.png")
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(40, 8, generator=g) + torch.tensor([3.0] + [0.0] * 7), dim=1)
    text = F.normalize(torch.randn(40, 8, generator=g) - torch.tensor([3.0] + [0.0] * 7), dim=1)
    batch = Batch(image, torch.zeros(40, 1), [f"c{i}" for i in range(40)], [str(i) for i in range(40)])
    features.on_validation_epoch_start(module.trainer, module)
    features.on_validation_batch_end(module.trainer, module, {"image_features": image, "text_features": text}, batch, 0)
    gap.on_validation_epoch_end(module.trainer, module)
    from clipft.eval.gap import centroid_distance

    assert module.logged["val/gap/centroid_distance"] == pytest.approx(centroid_distance(image, text))
    assert module.logged["val/gap/linear_separability"] == 1.0  # two far-apart clusters
    assert (tmp_path / "gap.png").stat().st_size > 10_000
    assert features.get(module) is features.get(module)  # gathered once, shared


def test_gap_callback_ignores_row_order() -> None:
    """DDP interleaves rows differently from one process: the metrics must not change."""
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(60, 8, generator=g), dim=1)
    results = []
    for order in (torch.arange(60), torch.randperm(60, generator=torch.Generator().manual_seed(2))):
        module = FakeModule([])
        features = ValidationFeatures()
        batch = Batch(image[order], torch.zeros(60, 1), [f"c{i}" for i in order.tolist()], [str(i) for i in order.tolist()])
        features.on_validation_epoch_start(module.trainer, module)
        features.on_validation_batch_end(
            module.trainer, module, {"image_features": image[order], "text_features": text[order]}, batch, 0
        )
        GapCallback(features).on_validation_epoch_end(module.trainer, module)
        results.append({k: v for k, v in module.logged.items() if k.startswith("val/gap/")})
    assert results[0] == pytest.approx(results[1], rel=1e-9)
    assert results[0]["val/gap/n_pairs"] == 60
