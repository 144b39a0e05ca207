"""Class-labelled data: CoOp's base/novel split, the seeded k-shot sample, and the three
class-based sources (synthetic objects, an image folder with a class-name file, a table with
a label column) as batches whose captions are class prompts and which carry labels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipft.config import ConfigError, DataConfig, load_config
from clipft.data.classes import ClassSet, few_shot_indices
from clipft.data.datamodule import ImageTextDataModule
from clipft.data.table import DataError
from clipft.models import build_model


def test_base_novel_split_is_coops() -> None:
    """base = the first ceil(C/2) labels, novel = the rest."""
    odd = ClassSet(["a", "b", "c", "d", "e"], ["a photo of a {}."])
    assert (odd.base, odd.novel) == ([0, 1, 2], [3, 4])
    even = ClassSet(["a", "b", "c", "d"], ["{} texture.", "a photo of {}."])
    assert (even.base, even.novel) == ([0, 1], [2, 3])
    assert even.prompts(2) == ["c texture.", "a photo of c."] and even.caption(2) == "c texture."
    with pytest.raises(DataError, match="no '{}'"):
        ClassSet(["a", "b"], ["a photo"])


def test_few_shot_sample_counts_and_seed() -> None:
    labels = [i % 5 for i in range(100)] + [4] * 3 + [5, 5]  # class 5 has only 2 images
    sample = few_shot_indices(labels, 4, seed=0, classes=[0, 2, 5])
    counts = Counter(labels[i] for i in sample)
    assert counts == {0: 4, 2: 4, 5: 2}  # k per class; a short class gives what it has
    assert sample == sorted(set(sample))  # no index twice
    assert few_shot_indices(labels, 4, seed=0, classes=[0, 2, 5]) == sample
    assert few_shot_indices(labels, 4, seed=1, classes=[0, 2, 5]) != sample


def _bundle():  # type: ignore[no-untyped-def]
    return build_model(load_config(None, []).model)


def _module(cfg: DataConfig) -> ImageTextDataModule:
    bundle = _bundle()
    module = ImageTextDataModule(cfg, bundle.preprocess_val, bundle.preprocess_val, bundle.tokenizer, seed=3)
    module.prepare_sources()
    return module


def test_synthetic_objects_as_classes() -> None:
    cfg = DataConfig(batch_size=8)
    cfg.classes.enabled, cfg.classes.shots, cfg.classes.templates = True, 5, ["a large {}"]
    cfg.synthetic.train_size, cfg.synthetic.val_size = 1500, 120
    module = _module(cfg)
    classes = module.classes
    assert classes is not None and len(classes.names) == 30  # 35 colour-shape objects minus 5 held out
    assert "red star" not in classes.names and module.train_classes == list(range(15))
    assert len(module.train_fetch) == 15 * 5  # type: ignore[arg-type]
    batch = next(iter(module.train_dataloader()))
    assert batch.labels is not None and batch.labels.dtype == torch.long and batch.labels.max() < 15
    assert batch.captions == [f"a large {classes.names[int(label)]}" for label in batch.labels]
    # the label is the object in the image: the scene the fetch rendered has that colour and shape
    fetch = module.train_fetch
    for row in range(5):
        scene = fetch.fetch.scenes.scene(fetch.indices[row])  # type: ignore[attr-defined]
        obj = scene.objects[0]
        assert classes.names[fetch.labels[fetch.indices[row]]] == f"{obj.colour} {obj.shape}"  # type: ignore[attr-defined]
    assert len(module.val_fetch) == 120  # type: ignore[arg-type]  (all classes: base and novel)


def _write_folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_with_class_name_file(tmp_path: Path) -> None:
    train = _write_folder(tmp_path / "train", {"n01": 4, "n02": 4, "n03": 4, "n04": 2})
    val = _write_folder(tmp_path / "val", {"n01": 1, "n02": 1, "n03": 1, "n04": 1, "n05": 2})
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01": "cat", "n02": "dog", "n03": "fox", "n04": "owl", "n05": "yak"}))
    cfg = DataConfig(source="folder", train=str(train), val=str(val), batch_size=2)
    cfg.classes.names, cfg.classes.shots, cfg.classes.template_set = str(names), 2, "oxford_pets"
    module = _module(cfg)
    assert module.classes.names == ["cat", "dog", "fox", "owl", "yak"]  # type: ignore[union-attr]
    assert module.train_classes == [0, 1, 2]  # base: the first ceil(5/2)
    assert len(module.train_fetch) == 6  # type: ignore[arg-type]
    image, target, _ = module.train_fetch(0)  # type: ignore[misc]
    assert target.caption == f"a photo of a {module.classes.names[target.label]}, a type of pet."  # type: ignore[union-attr]
    assert len(module.val_fetch) == 6  # type: ignore[arg-type]

    names.write_text(json.dumps({"n01": "cat"}))
    with pytest.raises(DataError, match="no class name for labels"):
        _module(cfg)


def test_table_with_a_label_column(tmp_path: Path) -> None:
    _write_folder(tmp_path / "img", {"a": 3, "b": 3})
    rows = ["filepath,label"] + [f"img/{c}/{i}.png,{c}" for c in "ab" for i in range(3)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source="csv", train=str(tmp_path / "train.csv"), batch_size=2)
    cfg.classes.enabled, cfg.classes.train_classes = True, "all"
    module = _module(cfg)
    assert module.classes.names == ["a", "b"] and module.train_classes == [0, 1]  # type: ignore[union-attr]
    assert sorted(module.train_fetch.labels) == [0, 0, 0, 1, 1, 1]  # type: ignore[union-attr]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="an image folder is required"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["data.classes.templates=['{}']", "data.classes.template_set=dtd"])
    with pytest.raises(ConfigError, match="shots"):
        load_config(None, ["data.classes.shots=0"])
