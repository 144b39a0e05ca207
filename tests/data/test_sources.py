"""Every data source behind the registry declares what config and the data module ask of it,
and the allowed values of data.source / eval.zeroshot[i].source are the registry's names."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torchvision import transforms as T

from clipft import config
from clipft.config import ConfigError, DataConfig, ZeroShotTaskConfig, load_config
from clipft.data.datamodule import ImageTextDataModule
from clipft.data.sources import DataSource, LabelledFiles, Pairs, SyntheticFetch, register_source, source
from clipft.data.synthetic import SyntheticScenes

NAMES = config.data_source_names()


def test_the_registry_holds_the_four_sources_in_order() -> None:
    assert NAMES == ["synthetic", "csv", "folder", "webdataset"]
    assert config.data_source_names(labelled=True) == ["synthetic", "csv", "folder"]


@pytest.mark.parametrize("name", NAMES)
def test_each_source_declares_what_it_must(name: str) -> None:
    src = source(name)
    assert isinstance(src, DataSource) and src.name == name
    cls = type(src)
    # a file-backed source names what data.train holds, and config says so when it is missing
    assert src.file_backed == (src.train_holds is not None)
    if src.file_backed:
        assert src.train_holds.strip()
        with pytest.raises(ConfigError, match=rf"^data\.train: .*{src.train_holds}.* required when data\.source={name}"):
            src.check(DataConfig(source=name))
        assert src.describe(DataConfig(source=name, train="my/data")) == "my/data"
    else:
        src.check(DataConfig(source=name))  # nothing to give
        assert src.describe(DataConfig(source=name))
    # it builds pairs, unless every image it reads is class-labelled
    assert (cls.pairs is not DataSource.pairs) or src.always_labelled
    # a labelled source builds class splits and zero-shot images; the others never have classes
    builds_labels = cls.class_splits is not DataSource.class_splits and cls.zeroshot_images is not DataSource.zeroshot_images
    assert builds_labels == src.labelled
    with_classes = DataConfig(source=name)
    with_classes.classes.enabled = True
    assert src.has_classes(with_classes) == src.labelled
    assert src.has_classes(DataConfig(source=name)) == src.always_labelled
    if isinstance(src, LabelledFiles):
        assert cls.read_labels is not LabelledFiles.read_labels


def test_what_each_source_answers() -> None:
    assert [source(n).file_backed for n in NAMES] == [False, True, True, True]
    assert [source(n).always_labelled for n in NAMES] == [False, False, True, False]
    assert source("synthetic").describe(DataConfig()) == "synthetic (seed 0)"
    with pytest.raises(ConfigError, match=r"^data\.train: shards are required when data\.source=webdataset \(e\.g\."):
        source("webdataset").check(DataConfig(source="webdataset"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=csvv"], "data.source='csvv' is not one of: synthetic, csv, folder, webdataset; did you mean csv?"),
        (["data.source=foldr"], "data.source='foldr' is not one of: synthetic, csv, folder, webdataset; did you mean folder?"),
        (["eval.zeroshot=[{name: a, source: synthetc}]"],
         "eval.zeroshot[0].source='synthetc' is not one of: synthetic, csv, folder; did you mean synthetic?"),
        (["eval.zeroshot=[{name: a, source: webdataset}]"], "eval.zeroshot[0].source='webdataset' is not one of: synthetic, csv, folder"),
        (["data.source=webdataset", "data.classes.enabled=true"],
         "data.classes: class-labelled data comes from synthetic, csv or folder sources, not webdataset"),
    ],
)
def test_an_unknown_source_is_one_line_with_the_registry_names(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


def test_config_uses_each_source_for_what_a_run_must_give() -> None:
    with pytest.raises(ConfigError, match=r"data\.train: a table of image paths and captions is required when data\.source=csv"):
        load_config(None, ["data.source=csv"])
    with pytest.raises(ConfigError, match=r"data\.webdataset\.weights: source weights need"):
        load_config(None, ["data.source=webdataset", "data.train=a.tar", "data.webdataset.weights=[1]"])
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\[0\]\.data: a table or image folder is required for source=folder"):
        load_config(None, ["eval.zeroshot=[{name: a, source: folder}]"])
    # a file-backed source needs data.val for the validation loop; the synthetic one makes its own
    with pytest.raises(ConfigError, match=r"run\.monitor=val/loss needs validation data"):
        load_config(None, ["data.source=folder", "data.train=f"])
    assert load_config(None, ["data.source=folder", "data.train=f"], check_data=False).data.train == "f"
    assert load_config(None, []).data.source == "synthetic"


@pytest.fixture
def counting_source() -> Iterator[type[DataSource]]:
    """A new source, as a user would add one: one class, one decorator, nothing else."""

    @register_source("counting")
    class Counting(DataSource):
        """The first data.synthetic.train_size training scenes, and no validation pairs."""

        def describe(self, data: DataConfig) -> str:
            return f"counting ({data.synthetic.train_size})"

        def pairs(self, data: DataConfig) -> Pairs:
            return Pairs(train=SyntheticFetch(SyntheticScenes("train", data.synthetic.train_size, 0, 32)))

    yield Counting
    del config._DATA_SOURCES["counting"]


def test_a_new_source_is_one_class(counting_source: type[DataSource]) -> None:
    cfg = load_config(None, ["data.source=counting", "data.synthetic.train_size=12", "data.batch_size=4"])
    assert source("counting").describe(cfg.data) == "counting (12)"
    assert not source("counting").has_classes(cfg.data)
    tokenize = lambda texts: torch.zeros(len(texts), 5, dtype=torch.long)  # noqa: E731
    dm = ImageTextDataModule(cfg.data, T.ToTensor(), T.ToTensor(), tokenize)
    batches = list(dm.train_dataloader())
    assert [b.images.shape for b in batches] == [(4, 3, 32, 32)] * 3
    assert sorted(i for b in batches for i in b.image_ids) == sorted(f"synthetic:train:{i}" for i in range(12))
    assert dm.val_dataloader() == [] and dm.summary() == {"source": "counting", "train_size": 12, "val_size": 0}
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\[0\]\.source='counting' is not one of: synthetic, csv, folder$"):
        load_config(None, ["eval.zeroshot=[{name: a, source: counting}]"])
    with pytest.raises(ConfigError, match="data.classes: class-labelled data comes from synthetic, csv or folder sources, not counting"):
        load_config(None, ["data.source=counting", "data.classes.enabled=true"])
    assert config.data_source_names()[-1] == "counting"


def test_zero_shot_images_come_from_the_task_source() -> None:
    images = source("synthetic").zeroshot_images(ZeroShotTaskConfig(task="colour", size=20), seed=0, image_size=32)
    assert len(images.fetch) == 20 and images.class_names[:2] == ["red", "green"] and images.array_size == 32
    assert images.prompts is not None and all("red" in p for p in images.prompts("red"))
    image, label, image_id = images.fetch(0)
    assert image.shape == (32, 32, 3) and images.class_names[label] in images.prompts(images.class_names[label])[0]
    assert image_id == "synthetic:val:0"
