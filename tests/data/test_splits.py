"""Tables with a split file (data.split_file), several training tables, and zero-shot classes
read from a data set's classes.json: recipes read a data set such as the emoji folders
directly (captions.csv + splits.json + classes.json), with no conversion step."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from torchvision import transforms as T

from clipft.config import ConfigError, ZeroShotTaskConfig, load_config
from clipft.data.datamodule import ImageTextDataModule
from clipft.data.sources import source
from clipft.data.table import DataError, Split, read_table

GROUPS = {"animal": "animals and nature", "food": "food and drink", "sign": "symbols"}


def write_style(folder: Path, style: str, colour: tuple[int, int, int]) -> Path:
    """An emoji-like data set: 6 concepts (2 per group), captions.csv with a hexcode column,
    splits.json (4 train, 2 test, plus non-split keys), classes.json with readable names."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for n, (code, group) in enumerate([("A1", "animal"), ("A2", "animal"), ("F1", "food"), ("F2", "food"),
                                       ("S1", "sign"), ("S2", "sign")]):
        Image.new("RGB", (8, 8), tuple(min(255, c + 10 * n) for c in colour)).save(folder / "images" / f"{code}.png")
        rows.append({"image": f"images/{code}.png", "caption": f"a {style} emoji number {n}", "group": group, "hexcode": code})
    with (folder / "captions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "splits.json").write_text(json.dumps(
        {"seed": 1, "counts": {"train": 4, "test": 2}, "train": ["A1", "F1", "S1", "F2"], "test": ["A2", "S2"]}))
    (folder / "classes.json").write_text(json.dumps(
        {"groups": [{"key": k, "name": v.replace(" and ", " & "), "text": v} for k, v in GROUPS.items()], "notes": "x"}))
    return folder / "captions.csv"


@pytest.fixture
def styles(tmp_path: Path) -> tuple[Path, Path]:
    return write_style(tmp_path / "flat", "flat", (200, 0, 0)), write_style(tmp_path / "noto", "noto", (0, 0, 200))


def keys(table: str) -> list[str]:
    return ["data.source=csv", "data.image_key=image", "data.caption_key=caption", "data.split_file=splits.json",
            "data.split_key=hexcode", "data.train_split=train", "data.val_split=test", f"data.val={table}"]


def test_a_split_file_selects_the_rows_of_each_split(styles: tuple[Path, Path]) -> None:
    flat, _ = styles
    train = read_table(flat, "image", "caption", split=Split("splits.json", "train", "hexcode"))
    assert [p.stem for p in train.images] == ["A1", "F1", "F2", "S1"]  # the table's order, only the split's rows
    assert train.lines == [2, 4, 5, 6]
    cfg = load_config(None, [*keys(str(flat)), f"data.train={flat}", "data.batch_size=2"])
    dm = ImageTextDataModule(cfg.data, T.ToTensor(), T.ToTensor(), lambda texts: texts)
    dm.prepare_sources()
    assert dm.summary()["train_size"] == 4 and dm.summary()["val_size"] == 2
    assert sorted(Path(dm.val_fetch(i)[2]).stem for i in range(2)) == ["A2", "S2"]
    assert source("csv").describe(cfg.data) == f"{flat} (train)"


def test_several_training_tables_are_concatenated(styles: tuple[Path, Path]) -> None:
    flat, noto = styles
    cfg = load_config(None, [*keys(str(flat)), f"data.train=[{flat},{noto}]", "data.batch_size=4"])
    assert cfg.data.train == [str(flat), str(noto)]
    dm = ImageTextDataModule(cfg.data, T.ToTensor(), T.ToTensor(), lambda texts: texts)
    batches = list(dm.train_dataloader())
    captions = sorted(c for b in batches for c in b.captions)
    assert len(captions) == 8 and sum("flat" in c for c in captions) == 4 and sum("noto" in c for c in captions) == 4
    assert {Path(i).parent.parent.name for b in batches for i in b.image_ids} == {"flat", "noto"}
    with pytest.raises(ConfigError, match=r"^data\.hard_images: needs one training table"):
        load_config(None, [*keys(str(flat)), f"data.train=[{flat},{noto}]", "data.hard_images=1"])


@pytest.mark.parametrize("override, message", [
    ("data.train_split=tRain", r"^data\.train_split='tRain' is not a split of .*splits\.json \(splits: train, test\)$"),
    ("data.split_file=nosuch.json", r"^data\.split_file: split file '.*nosuch\.json' not found$"),
    ("data.train_split=null", r"^data\.train_split: name the split of data\.train in data\.split_file \(splits\.json\)$"),
])
def test_a_wrong_split_is_one_line_before_anything_is_read(styles: tuple[Path, Path], override: str, message: str) -> None:
    flat, _ = styles
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*keys(str(flat)), f"data.train={flat}", override])
    with pytest.raises(ConfigError, match=r"^data\.val_split: a split needs data\.split_file"):
        load_config(None, ["data.source=csv", f"data.train={flat}", f"data.val={flat}", "data.val_split=test"])
    with pytest.raises(ConfigError, match=r"^data\.split_file: data\.source=synthetic has no split files"):
        load_config(None, ["data.split_file=splits.json"])


def test_a_split_key_that_is_no_column_names_the_file(styles: tuple[Path, Path]) -> None:
    flat, _ = styles
    with pytest.raises(DataError, match=r"no column 'code', whose values splits\.json lists"):
        read_table(flat, "image", "caption", split=Split("splits.json", "train", "code"))


def test_zero_shot_classes_from_a_classes_file_on_one_split(styles: tuple[Path, Path]) -> None:
    flat, _ = styles
    task = ZeroShotTaskConfig(name="group", source="csv", data=str(flat), image_key="image", label_key="group",
                              split_file="splits.json", split_key="hexcode", split="train", names="classes.json")
    images = source("csv").zeroshot_images(task, seed=0, image_size=8)
    assert images.class_names == ["animals and nature", "food and drink", "symbols"]  # classes.json "text"
    assert [images.fetch(i)[1] for i in range(len(images.fetch))] == [0, 1, 1, 2]  # A1, F1, F2, S1
    # a subset of the classes: their images only, and a classifier of only those classes
    task.subset = ["food", "sign"]
    images = source("csv").zeroshot_images(task, seed=0, image_size=8)
    assert images.class_names == ["food and drink", "symbols"]
    assert [images.fetch(i)[1] for i in range(len(images.fetch))] == [0, 0, 1]
    task.subset = ["food", "plant"]
    with pytest.raises(DataError, match=r"subset: labels \['plant'\] are not classes"):
        source("csv").zeroshot_images(task, seed=0, image_size=8)
    with pytest.raises(ConfigError, match=r"^eval\.zeroshot\[0\]\.split='val' is not a split of .*\(splits: train, test\)$"):
        load_config(None, [f"eval.zeroshot=[{{name: g, source: csv, data: {flat}, split_file: splits.json}}]"])


def test_the_emoji_classifier_recipe_scores_its_group_tasks_by_its_head(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """recipes/classifier_twemoji.yaml on stand-ins of the emoji folders: the head's classes
    (data.classes over the group column, names from classes.json) are the group task's of both
    eval.sets, names and order, so the group tasks are scored by the head; subgroup stays zero-shot."""
    from types import SimpleNamespace

    from clipft.eval.sets import build_eval_set
    from clipft.methods.classifier import Classifier, ClassHead

    subgroups = {"animal": "mammal", "food": "fruit", "sign": "arrow"}
    for style in ("twemoji64", "noto64"):
        folder = tmp_path / style
        (folder / "images").mkdir(parents=True)
        with (folder / "captions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption", "group", "subgroup", "hexcode"])
            for n, group in enumerate([*GROUPS, *GROUPS]):
                Image.new("RGB", (8, 8), (20 * n, 0, 0)).save(folder / "images" / f"{n}.png")
                writer.writerow([f"images/{n}.png", f"emoji {n}", group, subgroups[group], str(n)])
        (folder / "splits.json").write_text(json.dumps({"train": ["0", "1", "2"], "test": ["3", "4", "5"]}))
        (folder / "classes.json").write_text(json.dumps({
            "groups": [{"key": k, "text": v} for k, v in GROUPS.items()],
            "subgroups": [{"key": v, "text": f"{v} things"} for v in subgroups.values()]}))
    monkeypatch.setenv("CLIPFT_DATA", str(tmp_path))
    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / "classifier_twemoji.yaml", ["model.pretrained=null"])
    dm = ImageTextDataModule(cfg.data, T.ToTensor(), T.ToTensor(), lambda texts: texts)
    dm.prepare_sources()
    names = [dm.classes.names[c] for c in dm.train_classes]
    assert names == ["animals and nature", "food and drink", "symbols"]
    method = SimpleNamespace(head_ready=True, head=ClassHead.empty(3, 4, names))
    for spec in cfg.eval.sets:
        tasks = {t.name: t for t in build_eval_set(spec, cfg.data, T.ToTensor()).tasks}
        assert Classifier.head_for(method, tasks["group"].class_names) is method.head, spec.name
        assert Classifier.head_for(method, tasks["subgroup"].class_names) is None
