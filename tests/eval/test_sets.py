"""Named evaluation sets (eval.sets) on toy tables with known answers: each set's retrieval and
zero-shot metrics under val/sets/<name>/, their mean, a classifier restricted to a subset of
the classes, the report, and the recipe checks."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from clipft.config import ConfigError, DataConfig, EvalSetConfig, ZeroShotTaskConfig, load_config
from clipft.data.table import DataError
from clipft.eval.callbacks import RunReport
from clipft.eval.sets import EvalSetsCallback, build_eval_set, set_metric_names

COLOURS = ["red", "green", "blue"]


class ColourModule:
    """An image's feature is its mean colour; a text's is the one-hot of the colour it names."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._trainer = None
        self.logged: dict[str, float] = {}
        self.trainer = SimpleNamespace(world_size=1, sanity_checking=False, is_global_zero=True, global_step=3)

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([next(i for i, c in enumerate(COLOURS) if c in t) for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, 3).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.mean(dim=(2, 3)), dim=1)

    def log(self, name: str, value: float, **_: object) -> None:
        self.logged[name] = float(value)


def write_set(folder: Path, blue: tuple[int, int, int]) -> Path:
    """Three images (red, green, and a 'blue' drawn as ``blue``), captions naming the colour,
    a label column, and a split file that puts all three in 'test' and none of a decoy row."""
    folder.mkdir(parents=True)
    rows = []
    for name, rgb in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", blue), ("decoy", (9, 9, 9))):
        Image.new("RGB", (4, 4), rgb).save(folder / f"{name}.png")
        rows.append({"filepath": f"{name}.png", "title": f"an emoji of {name if name != 'decoy' else 'red'}",
                     "colour": name if name != "decoy" else "red", "id": name})
    with (folder / "captions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "splits.json").write_text(json.dumps({"test": ["red", "green", "blue"], "train": ["decoy"]}))
    return folder / "captions.csv"


def eval_set(name: str, table: Path, shifted: bool = False, subset: list[str] | None = None) -> EvalSetConfig:
    tasks = [ZeroShotTaskConfig(name="colour", label_key="colour", templates=["a {} emoji"])]
    if subset:
        tasks.append(ZeroShotTaskConfig(name="rb", label_key="colour", templates=["a {} emoji"], subset=subset))
    return EvalSetConfig(name=name, data=str(table), split_file="splits.json", split_key="id", split="test",
                         shifted=shifted, zeroshot=tasks)


def test_each_set_is_scored_on_its_own_and_their_mean(tmp_path: Path) -> None:
    clean = write_set(tmp_path / "clean", (0, 0, 255))
    shifted = write_set(tmp_path / "shifted", (0, 150, 100))  # the 'blue' drawing is nearer green
    sets = [build_eval_set(eval_set("clean", clean), DataConfig(), T.ToTensor()),
            build_eval_set(eval_set("shifted", shifted, True, subset=["red", "blue"]), DataConfig(), T.ToTensor())]
    assert [len(s.pairs) for s in sets] == [3, 3]  # the split's rows: the decoy row is not read
    assert sets[1].shifted and not sets[0].shifted
    module = ColourModule()
    EvalSetsCallback(sets, ks=(1,), batch_size=2).on_validation_epoch_end(module.trainer, module)
    got = module.logged
    assert got["val/sets/clean/zeroshot/colour/top1"] == 1.0
    assert got["val/sets/shifted/zeroshot/colour/top1"] == pytest.approx(2 / 3)
    assert got["val/sets/shifted/zeroshot/colour/mean_per_class_recall"] == pytest.approx(2 / 3)
    # among red and blue only (green left out of images and classifier) the drawing is blue
    assert got["val/sets/shifted/zeroshot/rb/top1"] == 1.0
    assert got["val/sets/clean/retrieval/i2t_r1"] == 1.0 and got["val/sets/shifted/retrieval/i2t_r1"] == pytest.approx(2 / 3)
    assert got["val/sets/shifted/retrieval/n_images"] == 3
    # the mean over the sets of every metric both have (rb: only one set has it; counts: no mean)
    assert got["val/sets/mean/zeroshot/colour/top1"] == pytest.approx(5 / 6)
    assert got["val/sets/mean/retrieval/i2t_r1"] == pytest.approx(5 / 6)
    assert "val/sets/mean/zeroshot/rb/top1" not in got and "val/sets/mean/retrieval/n_images" not in got
    # the report holds each set's metrics together, and a table per set
    report = RunReport(tmp_path / "report.json")
    report.metrics = dict(got)
    report.write()
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["sets"]["shifted"]["zeroshot/colour/top1"] == pytest.approx(2 / 3)
    assert set(written["sets"]) == {"clean", "shifted", "mean"}
    markdown = (tmp_path / "report.md").read_text()
    assert "## Evaluation sets" in markdown and "| shifted | 0.6667 | 0.6667 | 1.0000 | 1.0000 | 0.6667 |" in markdown


def test_recipe_sets_are_checked_and_name_their_metrics(tmp_path: Path) -> None:
    table = write_set(tmp_path / "clean", (0, 0, 255))
    sets = (f"eval.sets=[{{name: clean, data: {table}, split_file: splits.json, split: test, "
            "zeroshot: [{name: colour, label_key: colour}]}, "
            f"{{name: noto, data: {table}, shifted: true, zeroshot: [{{name: colour, label_key: colour}}]}}]")
    cfg = load_config(None, [sets, "eval.retrieval.ks=[1,5]"])
    assert [s.name for s in cfg.eval.sets] == ["clean", "noto"] and cfg.eval.sets[1].shifted
    names = set_metric_names(cfg)
    assert {"val/sets/noto/zeroshot/colour/top1", "val/sets/mean/zeroshot/colour/mean_per_class_recall",
            "val/sets/clean/retrieval/mean_r1", "val/sets/mean/retrieval/t2i_r5"} <= names
    for bad, message in [
        (sets.replace("name: noto", "name: mean"), r"^eval\.sets\[1\]\.name='mean': give each set a name"),
        (sets.replace("name: noto", "name: clean"), r"^eval\.sets\[1\]\.name='clean': two sets have this name"),
        (sets.replace("split: test", "split: tset"), r"^eval\.sets\[0\]\.split='tset' is not a split of .*splits\.json \(splits: test, train\)$"),
        (sets.replace("split: test, ", ""), r"^eval\.sets\[0\]: give split_file and split together"),
        ("eval.sets=[{name: a}]", r"^eval\.sets\[0\]\.data: the set's table of image paths and captions is required$"),
        (sets.replace("label_key", "labl_key"), r"unknown key 'eval\.sets\[0\]\.zeroshot\[0\]\.labl_key'; did you mean"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def test_a_class_scored_by_its_best_subclass(tmp_path: Path) -> None:
    """CHiLS-style zero-shot (``subclasses``): classes warm (red) and cool (green, blue); the blue
    drawing is purple (red 0.62, blue 0.78 after normalising). By the classes' own names (warm:
    "red", cool: "green") it is warm; by the best subclass cool (blue 0.78 > red 0.62); by the
    mean of cool's subclass prompts it would be warm again (0.78 / sqrt 2 = 0.55 < 0.62)."""
    table = write_set(tmp_path / "tones", (200, 0, 255))
    folder = table.parent
    rows = list(csv.DictReader(table.open()))
    for row in rows:
        row["tone"] = "warm" if row["colour"] == "red" else "cool"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.json").write_text(json.dumps({
        "tones": [{"key": "warm", "text": "red"}, {"key": "cool", "text": "green"}],
        "colours": [{"key": c, "text": c, "tone": "warm" if c == "red" else "cool"} for c in COLOURS]}))
    (folder / "tones.json").write_text(json.dumps({"warm": ["red"], "cool": ["green", "blue"]}))

    def task(name: str, subclasses: str | None) -> ZeroShotTaskConfig:
        return ZeroShotTaskConfig(name=name, label_key="tone", names="classes.json", templates=["an emoji of {}"],
                                  subclasses=subclasses)

    spec = EvalSetConfig(name="tones", data=str(table), split_file="splits.json", split_key="id", split="test",
                         retrieval=False, zeroshot=[task("flat", None), task("listed", "colours"), task("file", "tones.json")])
    module = ColourModule()
    EvalSetsCallback([build_eval_set(spec, DataConfig(), T.ToTensor())], ks=(1,)).on_validation_epoch_end(module.trainer, module)
    got = module.logged
    assert got["val/sets/tones/zeroshot/flat/top1"] == pytest.approx(2 / 3)  # purple 'blue' read as warm
    assert got["val/sets/tones/zeroshot/listed/top1"] == 1.0
    assert got["val/sets/tones/zeroshot/file/top1"] == 1.0
    assert got["val/sets/tones/zeroshot/file/mean_per_class_recall"] == 1.0
    # a class without subclasses, a missing list, and the synthetic tasks: one line each
    (folder / "tones.json").write_text(json.dumps({"warm": ["red"]}))
    bad = dataclasses.replace(spec, zeroshot=[task("file", "tones.json")])
    with pytest.raises(DataError, match=r"tones\.json: no subclasses for labels \['cool'\]"):
        build_eval_set(bad, DataConfig(), T.ToTensor())
    with pytest.raises(DataError, match=r"classes\.json: no list 'subgroups' .*\(lists there: tones, colours\)"):
        build_eval_set(dataclasses.replace(spec, zeroshot=[task("x", "subgroups")]), DataConfig(), T.ToTensor())
    with pytest.raises(ConfigError, match=r"^eval\.zeroshot\[0\]\.subclasses: works on tables and image folders"):
        load_config(None, ["eval.zeroshot=[{name: shape, subclasses: parts}]"])


def test_a_run_logs_its_sets_and_may_monitor_their_mean(tmp_path: Path, fast_overrides: list[str]) -> None:
    from clipft.runner import fit

    table = write_set(tmp_path / "clean", (0, 0, 255))
    sets = (f"eval.sets=[{{name: clean, data: {table}, split_file: splits.json, split_key: id, split: test, "
            "zeroshot: [{name: colour, label_key: colour}]}, "
            f"{{name: all, data: {table}, shifted: true, retrieval: false, zeroshot: [{{name: colour, label_key: colour}}]}}]")
    result = fit(load_config(None, [*fast_overrides, sets, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                    "run.monitor=val/sets/mean/zeroshot/colour/top1", "run.monitor_mode=max"]))
    metrics = result["metrics"]
    clean, everything = metrics["val/sets/clean/zeroshot/colour/top1"], metrics["val/sets/all/zeroshot/colour/top1"]
    assert round(clean * 3, 4) % 1 == 0 and round(everything * 4, 4) % 1 == 0  # of 3 and of 4 images
    assert metrics["val/sets/mean/zeroshot/colour/top1"] == pytest.approx((clean + everything) / 2, abs=1e-6)
    assert metrics["val/sets/clean/retrieval/n_images"] == 3 and "val/sets/all/retrieval/i2t_r1" not in metrics
    report = json.loads((Path(result["run_dir"]) / "report.json").read_text())
    assert report["sets"]["all"] == {k.split("/", 3)[3]: v for k, v in metrics.items() if k.startswith("val/sets/all/")}
    with pytest.raises(ConfigError, match=r"run\.monitor: 'val/sets/mean/zeroshot/colour/top5x' is not a metric"):
        fit(load_config(None, [*fast_overrides, sets, "run.monitor=val/sets/mean/zeroshot/colour/top5x"]))
