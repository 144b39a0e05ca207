from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipft.data.table import DataError, read_table


def make_images(root: Path, n: int) -> list[str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        names.append(f"img/{i}.png")
    return names


def test_csv_tsv_jsonl_relative_paths(tmp_path: Path) -> None:
    names = make_images(tmp_path, 3)
    (tmp_path / "a.csv").write_text("filepath,title\n" + "".join(f"{n},caption {i}\n" for i, n in enumerate(names)))
    (tmp_path / "a.tsv").write_text("image\ttext\n" + "".join(f"{n}\tcaption, {i}\n" for i, n in enumerate(names)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"image": n, "text": f"c {i}"}) + "\n" for i, n in enumerate(names)))
    csv = read_table(tmp_path / "a.csv", "filepath", "title")
    tsv = read_table(tmp_path / "a.tsv", "image", "text")
    jsonl = read_table(tmp_path / "a.jsonl", "image", "text")
    assert csv.images == tsv.images == jsonl.images == [tmp_path / n for n in names]
    assert csv.texts[2] == "caption 2" and tsv.texts[1] == "caption, 1" and jsonl.texts[0] == "c 0"
    assert csv.lines == [2, 3, 4] and jsonl.lines == [1, 2, 3]


def test_missing_column_names_file_and_columns(tmp_path: Path) -> None:
    make_images(tmp_path, 1)
    (tmp_path / "a.csv").write_text("path,title\nimg/0.png,x\n")
    with pytest.raises(DataError, match=r"a\.csv: missing image path column 'filepath' \(columns: path, title\)"):
        read_table(tmp_path / "a.csv", "filepath", "title")


@pytest.mark.parametrize(
    "row, problem",
    [
        ("img/9.png,a caption", r"line 3: image '.*img/9\.png' not found"),
        ("img/broken.png,a caption", r"line 3: image '.*broken\.png' cannot be read"),
        ("img/1.png,   ", r"line 3: empty caption"),
        (",a caption", r"line 3: empty image path"),
    ],
)
def test_bad_rows_error_or_skip(tmp_path: Path, row: str, problem: str) -> None:
    make_images(tmp_path, 2)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    path = tmp_path / "a.csv"
    path.write_text(f"filepath,title\nimg/0.png,first\n{row}\nimg/1.png,last\n")
    with pytest.raises(DataError, match=r"a\.csv, " + problem + r".*on_bad_sample=skip"):
        read_table(path, "filepath", "title")
    table = read_table(path, "filepath", "title", on_bad_sample="skip")
    assert table.texts == ["first", "last"] and len(table.skipped) == 1
    assert "line 3" in table.skipped[0]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(DataError, match=r"empty\.csv: the file has no rows"):
        read_table(tmp_path / "empty.csv", "filepath", "title")
    with pytest.raises(DataError, match=r"data file '.*nope\.csv' not found"):
        read_table(tmp_path / "nope.csv", "filepath", "title")
    make_images(tmp_path, 1)
    (tmp_path / "bad.jsonl").write_text('{"image": "img/0.png", "text": "y"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: each line must be a JSON object"):
        read_table(tmp_path / "bad.jsonl", "image", "text", check_images=False)


def test_encodings_and_jsonl_keys(tmp_path: Path) -> None:
    names = make_images(tmp_path, 2)
    # a spreadsheet's UTF-8 CSV starts with a byte-order mark
    (tmp_path / "bom.csv").write_bytes(("\ufefffilepath,title\n" + f"{names[0]},café\n").encode("utf-8"))
    assert read_table(tmp_path / "bom.csv", "filepath", "title").texts == ["café"]
    (tmp_path / "latin.csv").write_bytes(f"filepath,title\n{names[0]},caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text"):
        read_table(tmp_path / "latin.csv", "filepath", "title")
    lines = [json.dumps({"image": names[0]}), json.dumps({"image": names[1], "text": "ok"})]
    (tmp_path / "keys.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"keys\.jsonl, line 1: no 'text' key"):
        read_table(tmp_path / "keys.jsonl", "image", "text")
    assert read_table(tmp_path / "keys.jsonl", "image", "text", on_bad_sample="skip").texts == ["ok"]
