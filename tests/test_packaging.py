"""clipft installed anywhere: the recipes and configs ship in the wheel, a shipped recipe runs by
name from any folder, and ``clipft recipes`` lists and copies them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from clipft.cli import main
from clipft.config import ConfigError, compose, find_recipe, shipped_root
from clipft.recipe_book import copy_recipe, description, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=16", "data.synthetic.train_size=64",
             "data.synthetic.val_size=32", "eval.zeroshot=[]", "eval.compositional.source=null", "run.plot=false",
             "trainer.enable_progress_bar=false", "data.num_workers=0"]


def test_the_wheel_lists_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "clipft").rglob("__init__.py")}
    assert set(config["packages"]) == folders | {"clipft.recipes", "clipft.configs"}
    assert config["package-dir"] == {"clipft.recipes": "recipes", "clipft.configs": "configs"}


def test_a_bare_name_finds_a_shipped_recipe_and_a_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart") == shipped_root() / "recipes" / "quickstart.yaml"
    assert find_recipe("quickstart.yaml") == shipped_root() / "recipes" / "quickstart.yaml"
    assert find_recipe("recipes/m3mix.yaml") == shipped_root() / "recipes" / "m3mix.yaml"
    (tmp_path / "quickstart.yaml").write_text("run:\n  name: mine\n")
    assert find_recipe("quickstart.yaml") == Path("quickstart.yaml")
    assert compose("quickstart.yaml").run.name == "mine"
    assert compose("quickstart").run.name == "quickstart"
    with pytest.raises(ConfigError, match="recipe 'quikstart' not found.*did you mean 'quickstart'"):
        compose("quikstart")


def test_includes_fall_back_to_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("include: [configs/model/tiny.yaml, configs/data/synthetic.yaml]\n"
                                        "optim:\n  lr: 0.01\n")
    cfg = compose("mine.yaml")
    assert cfg.model.name == "clipft-tiny-vit" and cfg.optim.lr == 0.01
    # a config next to the recipe wins over the shipped one
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "tiny.yaml").write_text("model:\n  name: clipft-tiny-vit\n  lock_text: true\n")
    assert compose("mine.yaml").model.lock_text is True


def test_every_shipped_recipe_says_what_it_is_and_what_it_needs() -> None:
    recipes = {r.name: r for r in shipped_recipes()}
    assert {"quickstart", "finetune", "clip_refine", "negclip", "mmrl"} <= set(recipes)
    for r in recipes.values():
        assert 10 <= len(r.description) <= 130, (r.name, r.description)
    assert recipes["quickstart"].needs == []
    assert recipes["quickstart"].description.startswith("Quickstart, a tiny open_clip model")
    coco = recipes["negclip_vitb32_coco"].needs
    assert coco == ["a data table (data.train=...)", "downloaded weights (model.pretrained=openai)"]
    assert any(n.startswith("the MiniLM text encoder") for n in recipes["lit_twemoji"].needs)


def test_the_description_is_the_title_of_the_top_comment(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# My run (Someone et al., 2024): what it does\n# more.\n#   clipft fit r.yaml\nrun: {}\n")
    assert description(recipe) == "My run (Someone et al., 2024)"
    recipe.write_text("# A sentence. Another one\nrun: {}\n")
    assert description(recipe) == "A sentence"


def test_recipes_verb_lists_prints_and_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "needs: nothing (runs out of the box)" in out
    assert main(["recipes", "m3mix"]) == 0
    assert "include: [m2mix.yaml]" in capsys.readouterr().out
    target = tmp_path / "mine"
    assert main(["recipes", "m3mix", "--copy", str(target)]) == 0
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*.yaml"))
    assert written == ["configs/data/synthetic.yaml", "configs/eval/synthetic.yaml", "configs/model/tiny.yaml",
                       "configs/trainer/cpu.yaml",
                       "m2mix.yaml", "m3mix.yaml"]
    # the copy composes from its own files: an edit there takes effect
    (target / "configs" / "trainer" / "cpu.yaml").write_text("trainer:\n  deterministic: true\n")
    monkeypatch.chdir(tmp_path)
    assert compose(target / "m3mix.yaml").trainer.deterministic is True
    # a second copy refuses to overwrite the user's edit
    capsys.readouterr()
    assert main(["recipes", "m3mix", "--copy", str(target)]) == 2
    assert "exists; choose another folder or add --force" in capsys.readouterr().err
    assert "deterministic: true" in (target / "configs" / "trainer" / "cpu.yaml").read_text()
    assert copy_recipe("m3mix", target, force=True) and "deterministic" not in (target / "configs/trainer/cpu.yaml").read_text()
    assert main(["recipes", "nosuch"]) == 2


def _venv_with_our_dependencies(folder: Path) -> Path:
    """A fresh virtual environment that sees this interpreter's installed packages (torch,
    lightning, ...) through a .pth line, but not the repository nor its editable install."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # a plain directory line: .pth files inside it (the editable clipft) are not processed
    (Path(purelib) / "clipft_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_installs_and_runs_the_quickstart_from_an_empty_folder(tmp_path: Path) -> None:
    source, dist = tmp_path / "source", tmp_path / "dist"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("clipft", "recipes", "configs"):  # built from a copy: setuptools writes build/ next to its input
        shutil.copytree(ROOT / part, source / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(source)], check=True, capture_output=True)
    wheel = next(dist.glob("clipft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "clipft/recipes/quickstart.yaml" in names and "clipft/configs/model/tiny.yaml" in names
    python = _venv_with_our_dependencies(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    where = subprocess.run([str(python), "-c", "import clipft, clipft.config as c; print(clipft.__file__); "
                            "print(c.shipped_root())"], cwd=work, env=env, check=True, capture_output=True, text=True)
    package, shipped = where.stdout.split()
    assert str(tmp_path / "venv") in package and ROOT not in Path(package).parents
    assert Path(shipped) == Path(package).parent
    done = subprocess.run([str(tmp_path / "venv" / "bin" / "clipft"), "fit", "quickstart", *FEW_STEPS],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = list((work / "runs" / "quickstart").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert "steps: 2" in done.stdout
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
