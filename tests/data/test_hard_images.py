"""NegCLIP's hard images: nearest neighbours in the start's embedding space, cached, and one
per pair appended to every training batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clipft.data.datamodule import TrainingOrder
from clipft.data.hard_images import WithHardImages, cached, nearest_neighbours


def test_nearest_neighbours_by_cosine_skip_the_same_image() -> None:
    angles = torch.tensor([0.0, 0.1, 0.3, 1.0, 1.05, 3.0])
    features = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * 5  # not unit: normalised inside
    ids = ["a", "b", "c", "d", "e", "f"]
    assert nearest_neighbours(features, ids, 2).tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 2], [4, 3]]
    # rows of one image (two captions) never pick each other
    same = nearest_neighbours(features, ["a", "a", "c", "d", "e", "f"], 1, chunk=2)
    assert same[0].item() == 2 and same[1].item() == 2
    with pytest.raises(ValueError, match="more than k=3 distinct"):
        nearest_neighbours(features[:3], ids[:3], 3)


def test_every_batch_gets_one_neighbour_per_pair(tmp_path: Path) -> None:
    neighbours = torch.tensor([[(i + 1) % 20, (i + 2) % 20, (i + 3) % 20] for i in range(20)])
    order = TrainingOrder(20, 1, 0, seed=0, batch_size=4)
    batches = list(WithHardImages(order, 4, neighbours, seed=0))
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    for batch in batches:
        pairs, hard = batch[:4], batch[4:]
        assert all(h in neighbours[p].tolist() for p, h in zip(pairs, hard))
    again = WithHardImages(TrainingOrder(20, 1, 0, seed=0, batch_size=4), 4, neighbours, seed=0)
    assert list(again) == batches  # seeded by the batch: a resumed run draws the same
    calls = []
    first = cached(tmp_path / "n.pt", lambda: calls.append(1) or neighbours)
    second = cached(tmp_path / "n.pt", lambda: calls.append(1) or neighbours)
    assert calls == [1] and torch.equal(first, second)


def test_a_fit_with_hard_images_trains_on_doubled_batches(tmp_path: Path, fast_overrides: list[str]) -> None:
    from clipft.config import load_config
    from clipft.runner import build_run

    cfg = load_config("recipes/negclip.yaml", [*fast_overrides, "data.hard_images=3", "data.synthetic.train_size=256",
                                                "data.batch_size=16", "trainer.max_steps=2"])
    run = build_run(cfg)
    neighbours = run.datamodule.hard_neighbours
    assert neighbours.shape == (256, 3)
    batch = next(iter(run.datamodule.train_dataloader()))
    assert len(batch) == 32 and batch.negative_texts.shape[:2] == (32, 2)
    pairs, hard = batch.image_ids[:16], batch.image_ids[16:]
    for pair, neighbour in zip(pairs, hard):
        index = int(pair.rsplit(":", 1)[1])
        assert int(neighbour.rsplit(":", 1)[1]) in neighbours[index].tolist()
    assert math.isfinite(run.trainer.fit(run.method, datamodule=run.datamodule) or 0.0)
    assert run.trainer.global_step == 2
    cache = list((Path(cfg.run.out_dir) / ".cache").glob("hard-images-*.pt"))
    assert len(cache) == 1 and torch.equal(torch.load(cache[0], weights_only=True), neighbours)
