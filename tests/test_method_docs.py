"""Every registered method has its page, docs/methods/<name>.md, that names every one of its
``method.*`` settings (the keys ``clipft info --methods`` prints from the code's declarations)
and, where its settings table gives a default, the code's default; and the README's methods
table links to that page: a new method, a new setting or a changed default fails here until it
is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clipft.methods import METHODS
from clipft.methods.catalog import describe

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "methods"


def readme_methods_table() -> dict[str, str]:
    """The rows of the README's table under '## Methods', by the `method.name` in their first cell."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def every_setting_key() -> set[str]:
    """``method.<key>`` of every registered method, and ``method.name``."""
    return {"method.name"} | {key for name in METHODS for key in describe(name)["settings"]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_page_names_every_setting(name: str) -> None:
    page = PAGES / f"{name}.md"
    assert page.is_file(), f"method {name} has no page: write docs/methods/{name}.md (see docs/methods/README.md)"
    text = page.read_text()
    missing = [key for key in describe(name)["settings"] if not re.search(re.escape(key) + r"(?![\w])", text)]
    assert missing == [], f"docs/methods/{name}.md does not mention {missing}"
    # a settings-table row `| `method.x` | `default` | ... |` states the code's default
    for key, setting in describe(name)["settings"].items():
        row = re.search(r"^\|\s*`" + re.escape(key) + r"`\s*\|\s*`([^`]*)`", text, flags=re.M)
        if row:
            assert json.loads(row.group(1)) == setting["default"], f"docs/methods/{name}.md: {key} defaults to {json.dumps(setting['default'])} in the code"
    # and names no setting that does not exist (a renamed or removed key); dotted sub-keys
    # such as method.loss_weights.m2mix name their setting's first part
    known = every_setting_key()
    named = {f"method.{key}" for key in re.findall(r"(?<![\w-])method\.(\w+)", text)}
    assert named - known == set(), f"docs/methods/{name}.md names settings no method has: {sorted(named - known)}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_readme_methods_table_links_the_page(name: str) -> None:
    rows = readme_methods_table()
    assert name in rows, f"README.md's methods table has no row for `{name}`"
    assert f"(docs/methods/{name}.md)" in rows[name], f"README.md's `{name}` row must link docs/methods/{name}.md"

