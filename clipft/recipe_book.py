"""``clipft recipes``: the recipes that ship with clipft, what each is for, what it needs beyond
the package, and a copy of one (with what it includes) for the user to edit."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from clipft.config import INCLUDE_KEY, ConfigError, compose, find_recipe, shipped_root
from clipft.models.minilm import INSTALL_HINT as MINILM_HINT
from clipft.models.minilm import MINILM_MODEL, minilm_path
from clipft.models.shipped import shipped_tags


@dataclass
class RecipeInfo:
    name: str
    path: Path
    description: str
    needs: list[str]


def description(path: Path) -> str:
    """A recipe's title: the comment at the top of its file up to the first colon (or the end of
    its first sentence)."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if not text.strip() or text.startswith("   "):  # a blank comment line or an indented command ends it
            break
        words.append(text.strip())
    joined = " ".join(words)
    title = re.search(r"^(.*?)(?::(?:\s|$)|\.(?:\s|$))", joined)
    return title.group(1) if title else joined


def needs(path: Path) -> list[str]:
    """What a recipe needs beyond the installed package to run as it is: data files, downloaded
    weights, the optional MiniLM text encoder."""
    cfg = compose(path, check_data=False)
    found = []
    if cfg.data.source != "synthetic":
        what = {"csv": "a data table", "folder": "an image folder", "webdataset": "WebDataset shards"}
        given = f" ({cfg.data.train})" if cfg.data.train else " (data.train=...)"
        found.append(f"{what.get(cfg.data.source, cfg.data.source)}{given}")
    pretrained = cfg.model.pretrained
    if pretrained and pretrained not in shipped_tags(cfg.model.name):
        looks_like_file = os.sep in pretrained or Path(pretrained).suffix
        found.append(f"a weights file ({pretrained})" if looks_like_file
                     else f"downloaded weights (model.pretrained={pretrained})")
    if cfg.model.name == MINILM_MODEL:
        found.append(f"the MiniLM text encoder ({'installed' if minilm_path() else MINILM_HINT})")
    return found


def shipped_recipes() -> list[RecipeInfo]:
    folder = shipped_root() / "recipes"
    return [RecipeInfo(p.stem, p, description(p), needs(p)) for p in sorted(folder.glob("*.yaml"))]


def render() -> str:
    """The table ``clipft recipes`` prints."""
    recipes = shipped_recipes()
    width = max(len(r.name) for r in recipes)
    lines = [f"shipped recipes ({shipped_root() / 'recipes'}); run one by name: clipft fit NAME", ""]
    for r in recipes:
        lines.append(f"{r.name:{width}s}  {r.description}")
        lines.append(f"{'':{width}s}  needs: {'; '.join(r.needs) if r.needs else 'nothing (runs out of the box)'}")
    return "\n".join(lines)


def _included(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, Path]]:
    """(include entry as written, resolved file) for every file a recipe includes, recursively."""
    from clipft.config import _resolve_include

    loaded = OmegaConf.load(path)
    entries = loaded.get(INCLUDE_KEY) if hasattr(loaded, "get") else None
    if entries is None:
        return []
    found = []
    for entry in [entries] if isinstance(entries, str) else list(entries if isinstance(entries, ListConfig) else []):
        file = _resolve_include(str(entry), path)
        if file.resolve() in chain:
            continue
        found.append((str(entry), file))
        found.extend(_included(file, chain + (path.resolve(),)))
    return found


def copy_recipe(name: str, folder: str | Path, force: bool = False) -> list[Path]:
    """Write recipe ``name`` and every file it includes under ``folder``, laid out so that the
    copy's includes resolve inside ``folder``; refuse to overwrite a file unless ``force``."""
    source = find_recipe(name)
    if not source.is_file():
        raise ConfigError(f"recipe '{name}' not found; `clipft recipes` lists the shipped ones")
    folder = Path(folder)
    plan = [(folder / source.name, source)]
    for entry, file in _included(source):
        if Path(entry).is_absolute():
            continue  # an absolute include resolves from anywhere
        # includes are looked up from the including file's folder and its parents, so the copy keeps
        # each entry's path under ``folder`` (configs/model/tiny.yaml -> FOLDER/configs/model/tiny.yaml)
        plan.append((folder / entry, file))
    plan = list(dict((t.resolve(), (t, s)) for t, s in plan).values())
    existing = [t for t, _ in plan if t.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists; choose another folder or add --force to overwrite "
                          f"({len(existing)} file(s) would be replaced)")
    for target, file in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    return [t for t, _ in plan]
