"""Every command in a ```bash block of the README and docs/ still works.

A block right after the line ``<!-- runnable -->`` runs offline: each ``clipft`` line is run
(``fit`` and ``validate`` capped at two steps of a small batch, in an empty folder, so recipe
paths resolve to the shipped recipes). Every other ``clipft fit | validate | info`` line is
composed (recipe + includes + overrides, as ``clipft info`` does, without the data files or the
downloaded weights a paper recipe needs), every other ``clipft`` line is parsed by the CLI, and
a script or module a line runs must exist. The README's first two blocks (install + quickstart,
the test command) are what CI runs itself (tests/test_readme.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipft.cli import _parser, main
from clipft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = "<!-- runnable -->"
CAPPED = ["trainer.max_steps=2", "trainer.val_check_interval=1", "data.batch_size=16", "data.synthetic.train_size=64",
          "data.synthetic.val_size=32", "run.plot=false", "trainer.enable_progress_bar=false", "data.num_workers=0"]


@dataclass
class Command:
    where: str  # file:line
    line: str
    runnable: bool


def commands() -> list[Command]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text()
        for block in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
            if doc.name == "README.md" and block.start() < text.find("## What the quickstart does"):
                continue  # the install and test commands: CI runs them
            runnable = text[:block.start()].rstrip().endswith(RUNNABLE)
            first = text[:block.start()].count("\n") + 2
            lines = block.group(1).replace("\\\n", " ").splitlines()
            for offset, line in enumerate(lines):
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append(Command(f"{doc.relative_to(ROOT)}:{first + offset}", line, runnable))
    return found


def _clipft_argv(line: str) -> list[str] | None:
    """The arguments after ``clipft`` (env assignments and a venv path allowed before it)."""
    words = [w for w in shlex.split(line) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    if not words or Path(words[0]).name != "clipft":
        return None
    argv = words[1:]
    ends = [i for i, word in enumerate(argv) if word in (">", "|", "&&", ";")]  # the clipft command alone
    return argv[:ends[0]] if ends else argv


def _static_check(command: Command, argv: list[str] | None) -> None:
    words = shlex.split(command.line)
    if argv is not None:
        verb = argv[0]
        if verb in ("fit", "validate", "info") and not any(a.startswith("--methods") for a in argv):
            recipe = next(a for a in argv[1:] if not a.startswith("-"))
            overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-") and not a.startswith("ckpt=")]
            load_config(recipe, overrides, check_data=False)
        else:  # export, data, recipes take no overrides: every argument must parse
            _parser().parse_args(argv)
    elif words[0] in ("python", "python3") and words[1] == "-m" and words[2] not in ("venv", "pip", "pytest"):
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
    elif words[0] in ("python", "python3") and words[1].endswith(".py") or words[0].endswith(".sh"):
        script = words[1] if words[0].startswith("python") else words[0]
        assert (ROOT / script).is_file(), f"no script {script}"


DOC_COMMANDS = commands()


def test_the_docs_have_commands_and_some_run() -> None:
    assert len(DOC_COMMANDS) > 15 and sum(c.runnable for c in DOC_COMMANDS) >= 5


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_doc_command(command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = _clipft_argv(command.line)
    if not command.runnable or argv is None:
        _static_check(command, argv)
        return
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("fit", "validate"):
        argv = [*argv, *CAPPED, f"run.out_dir={tmp_path / 'runs'}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, f"{command.where}: `{command.line}` exited {code}"
    assert out.getvalue().strip(), f"{command.where}: `{command.line}` printed nothing"
