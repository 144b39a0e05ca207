from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from clipft.data.synthetic import COLOURS, RELATIONS, SHAPES
from clipft.eval.compositional import (
    SUBSETS,
    group_averages,
    load_benchmark,
    pair_accuracy,
    synthetic_items,
    write_synthetic_benchmark,
)

PHRASE = rf"a (small|large) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
CAPTION = re.compile(rf"^{PHRASE}( ({'|'.join(RELATIONS)}) {PHRASE})?$")


def test_synthetic_items_are_exact_hard_negatives() -> None:
    items = synthetic_items(200, seed=0)
    assert {i["subset"] for i in items} == set(SUBSETS)
    for item in items:
        caption, negative = item["caption"], item["negative_caption"]
        assert caption != negative
        if item["subset"] == "add_att":
            assert re.fullmatch(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})", caption)
            assert negative.endswith(caption[2:]) and CAPTION.match(negative)
            continue
        assert CAPTION.match(caption) and CAPTION.match(negative), item
        words, neg_words = caption.split(), negative.split()
        if item["subset"].startswith("swap"):  # same words, another order
            assert sorted(words) == sorted(neg_words)
        if item["subset"] in ("replace_obj", "replace_att"):  # exactly one word differs
            assert len(words) == len(neg_words) and sum(a != b for a, b in zip(words, neg_words)) == 1
        if item["subset"] == "add_obj":
            assert negative.startswith(caption + " ")
    assert synthetic_items(50, seed=3) == synthetic_items(50, seed=3)
    assert synthetic_items(50, seed=3) != synthetic_items(50, seed=4)


def test_written_folder_is_sugarcrepe_format(tmp_path: Path) -> None:
    folder = write_synthetic_benchmark(tmp_path / "bench", size=60, seed=1)
    files = sorted(p.name for p in folder.glob("*.json") if p.name != "synthetic.json")
    assert files == sorted(f"{s}.json" for s in SUBSETS)
    data = json.loads((folder / "swap_att.json").read_text())
    first = next(iter(data.values()))
    assert set(first) == {"filename", "caption", "negative_caption"}
    assert (folder / "images" / first["filename"]).is_file()
    subsets = load_benchmark(folder)
    assert sum(len(v) for v in subsets.values()) == len(synthetic_items(60, seed=1))
    # broken items are named
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "swap_obj.json").write_text(json.dumps({"7": {"filename": "x.jpg", "caption": "a"}}))
    with pytest.raises(ValueError, match=r"swap_obj\.json: item '7' lacks negative_caption"):
        load_benchmark(tmp_path / "bad")


def test_pair_accuracy_and_groups() -> None:
    image = torch.eye(4)
    positive = torch.eye(4)
    negative = torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    # rows 0 and 2 right (1 > 0); row 1 a tie (wrong); row 3 a tie (wrong)
    assert pair_accuracy(image, positive, negative) == 0.5
    got = group_averages({"replace_obj": 1.0, "replace_att": 0.5, "swap_obj": 0.25, "add_obj": 0.0})
    assert got == {"REPLACE": 0.75, "SWAP": 0.25, "ADD": 0.0}
