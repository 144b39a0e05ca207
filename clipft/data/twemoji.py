"""Tables for the twemoji64 data set (real emoji images with CLDR captions, CC BY 4.0).

``python -m clipft.data.twemoji SRC OUT`` writes, from a twemoji64 folder (captions.csv,
splits.json, classes.json), ``OUT/train.csv`` and ``OUT/test.csv`` in clipft's table format:
``filepath`` (absolute image path), ``title`` (the caption), and for zero-shot classification
``group`` and ``subgroup`` as readable class names from classes.json (``"animals and nature"``,
not the key ``animals-nature``), so that prompts such as ``"an emoji of {}"`` read naturally.
The test emoji never appear in training.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def write_tables(source: str | Path, out: str | Path) -> dict[str, int]:
    source, out = Path(source), Path(out)
    for name in ("captions.csv", "splits.json", "classes.json"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source}: '{name}' not found (is this the twemoji64 folder?)")
    splits = json.loads((source / "splits.json").read_text())
    classes = json.loads((source / "classes.json").read_text())
    text = {c["key"]: c["text"] for kind in ("groups", "subgroups") for c in classes[kind]}
    with (source / "captions.csv").open(newline="", encoding="utf-8") as f:
        rows = {r["hexcode"]: r for r in csv.DictReader(f)}
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        with (out / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "title", "group", "subgroup"])
            for code in splits[split]:
                row = rows[code]
                image = (source / row["image"]).resolve()
                writer.writerow([str(image), row["caption"], text[row["group"]], text[row["subgroup"]]])
        counts[split] = len(splits[split])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the twemoji64 folder")
    parser.add_argument("out", help="where to write train.csv and test.csv")
    args = parser.parse_args()
    counts = write_tables(args.source, args.out)
    print(f"wrote {args.out}/train.csv ({counts['train']} rows) and {args.out}/test.csv ({counts['test']} rows)")


if __name__ == "__main__":
    main()
