"""docs/adding-a-method.md stays true: every code excerpt in it is a verbatim part of the file of
the worked example it comes from, every file of its closing list exists, and the comparison
benchmark gives the example its arm and row with no edit of its own."""

from __future__ import annotations

import re
import sys
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


def test_the_comparison_benchmark_finds_the_method_and_merges_its_row() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_methods as bench

    arms = bench.method_arms(bench.SYNTHETIC_ARMS + bench.CLASS_ARMS)
    assert ("contrastive gap (Fahim et al.)", "recipes/contrastive_gap.yaml", []) in arms
    assert not any(recipe in ("recipes/negclip.yaml", "recipes/finetune.yaml") for _, recipe, _ in arms)  # listed already
    table = "\n".join(["# t", "### Synthetic data", "", "| run | x |", "|---|---|", "| start | 1 |", "| old | 2 |",
                       "| MMRL | 3 |", "", "### twemoji64", "", "| run | x |", "|---|---|", "| old | 9 |"])
    merged = bench.merge_rows(table, ["| old | 5 |", "| new | 6 |"], before={"MMRL"}).splitlines()
    assert merged[5:9] == ["| start | 1 |", "| old | 5 |", "| new | 6 |", "| MMRL | 3 |"]
    assert merged[-1] == "| old | 9 |"  # other tables untouched
