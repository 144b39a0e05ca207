"""docs/adding-a-method.md stays true: every code excerpt in it is a verbatim part of the file of
the worked example it comes from, and every file of its closing list exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-method.md"
EXAMPLE = ["clipft/methods/contrastive_gap.py", "recipes/contrastive_gap.yaml", "tests/methods/test_contrastive_gap.py",
           "docs/methods/contrastive_gap.md", "README.md", "docs/results_table.md", "docs/results.md"]


def test_every_excerpt_is_copied_from_the_example() -> None:
    sources = {path: (ROOT / path).read_text() for path in EXAMPLE}
    blocks = re.findall(r"```(python|yaml|text)\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 6
    stale = [body[:80] for _, body in blocks if not any(body in text for text in sources.values())]
    assert stale == [], f"excerpts of docs/adding-a-method.md no longer in the example's files: {stale}"


def test_the_files_it_lists_exist() -> None:
    closing = GUIDE.read_text().split("## The files a new method touches", 1)[1]
    listed = re.findall(r"^\d+\. `([^`]+)`", closing, flags=re.M)
    assert listed == EXAMPLE[:6]
    assert all((ROOT / path).is_file() for path in EXAMPLE)
