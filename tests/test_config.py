from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from clipft.config import ConfigError, RunConfig, compose, from_dict, load_config, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_and_types() -> None:
    cfg = load_config(None, [])
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "finetune" and cfg.optim.lr == 1e-5 and cfg.optim.betas == [0.9, 0.98]


def test_include_then_recipe_then_overrides(tmp_path: Path) -> None:
    write(tmp_path / "configs/model/m.yaml", "model: {name: clipft-small-vit}\noptim: {lr: 0.1, weight_decay: 0.3}\n")
    recipe = write(
        tmp_path / "recipes/r.yaml",
        "include: [configs/model/m.yaml]\noptim: {lr: 0.2}\ndata: {batch_size: 7}\n",
    )
    cfg = load_config(recipe, ["data.batch_size=9", "trainer.devices=2"])
    assert cfg.model.name == "clipft-small-vit"  # from the include (found in a parent folder)
    assert cfg.optim.weight_decay == 0.3  # include
    assert cfg.optim.lr == 0.2  # recipe wins over include
    assert cfg.data.batch_size == 9  # override wins over recipe
    assert cfg.trainer.devices == 2


def test_unknown_key_names_nearest(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'optim\.lrr'; did you mean optim\.lr\?"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"command-line override: unknown key 'data\.batch_sise'.*data\.batch_size"):
        load_config(None, ["data.batch_sise=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.zeroshot\[0\]\.tsak'.*task"):
        load_config(None, ["eval.zeroshot=[{name: a, tsak: shape}]"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle\.name'; did you mean model"):
        load_config(None, ["modle.name=x"])


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad value for 'optim\.lr'"):
        load_config(None, ["optim.lr=fast"])
    recipe = write(tmp_path / "r.yaml", "data: {batch_size: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: bad value for 'data\.batch_size'"):
        load_config(recipe)


def test_missing_include_and_recipe(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "include: [configs/nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: included file 'configs/nope\.yaml' not found"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="recipe file .*absent.yaml' not found"):
        load_config(tmp_path / "absent.yaml")


def test_values_checked_before_anything_is_built() -> None:
    for override, message in [
        ("trainer.precision=fp64", r"trainer\.precision: unknown precision"),
        ("data.batch_size=0", r"data\.batch_size: must be > 0"),
        ("run.threads=-1", r"run\.threads: must be >= 0"),
        ("optim.lr=-1", r"optim\.lr: must be >= 0"),
        ("eval.retrieval.ks=[0]", r"eval\.retrieval\.ks: must be positive"),
        ("eval.zeroshot=[{name: a, source: csv, data: x.csv, templates: [a photo]}]", r"template 'a photo' has no \{\}"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"run\.monitor=val/loss needs validation data: set data\.val"):
        load_config(None, ["data.source=csv", "data.train=t.csv"])


def test_override_inside_a_list_item(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "eval:\n  zeroshot:\n    - {name: shape, size: 600}\n    - {name: colour, task: colour}\n")
    cfg = load_config(recipe, ["eval.zeroshot[0].size=64", "eval.zeroshot.1.ensemble=max"])
    assert cfg.eval.zeroshot[0].size == 64 and cfg.eval.zeroshot[0].name == "shape"
    assert cfg.eval.zeroshot[1].ensemble == "max" and cfg.eval.zeroshot[1].task == "colour"
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.zeroshot\.0\.sise'; did you mean eval\.zeroshot\.0\.size"):
        load_config(recipe, ["eval.zeroshot[0].sise=64"])
    with pytest.raises(ConfigError, match=r"bad value for 'eval\.zeroshot\[5\]\.size'"):
        load_config(recipe, ["eval.zeroshot[5].size=64"])


def test_missing_mandatory_value() -> None:
    with pytest.raises(ConfigError, match=r"data\.train: a table .* required when data\.source=csv"):
        load_config(ROOT / "configs/data/csv.yaml")
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\[0\]\.data"):
        load_config(None, ["eval.zeroshot=[{name: a, source: csv}]"])


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "include: [b.yaml]\n")
    write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_choices_and_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"data\.source='lmdb' is not one of: synthetic, csv"):
        load_config(None, ["data.source=lmdb"])
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\[0\]\.ensemble='median'"):
        load_config(None, ["eval.zeroshot=[{name: a, ensemble: median}]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown method 'fintune'; did you mean finetune"):
        load_config(None, ["method.name=fintune"])


def test_plain_dict_round_trip_is_weights_only_safe() -> None:
    cfg = load_config(ROOT / "recipes/quickstart.yaml", ["optim.lr=0.5"])
    plain = to_dict(cfg)
    buffer = io.BytesIO()
    torch.save({"config": plain}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["config"]
    assert from_dict(loaded) == cfg
    assert "lr: 0.5" in to_yaml(cfg)


DATA_ENV = "${oc.env:CLIPFT_DATA"  # recipes on the emoji data sets read them from $CLIPFT_DATA


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recipe composes: recipes on user data with data.train / data.val filled in, recipes
    on the shared emoji folders with $CLIPFT_DATA pointing at a stand-in that has their split
    files (composing checks the splits they name), so no test needs ../shared."""
    reads_shared = DATA_ENV in recipe.read_text()
    if reads_shared:
        for style in ("twemoji64", "noto64"):
            write(tmp_path / style / "splits.json", '{"train": ["1F600"], "test": ["1F603"]}')
        monkeypatch.setenv("CLIPFT_DATA", str(tmp_path))
    cfg = compose(recipe, [] if reads_shared else ["data.train=your_pairs.csv", "data.val=your_val.csv"])
    assert cfg.run.name
    if reads_shared:  # every data path is the stand-in's: nothing reads the default ../shared/data
        tables = [*([cfg.data.train] if isinstance(cfg.data.train, str) else cfg.data.train), cfg.data.val,
                  *(s.data for s in cfg.eval.sets)]
        assert tables and all(t.startswith(str(tmp_path)) for t in tables), tables


@pytest.mark.parametrize("block", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_building_block_validates(block: Path) -> None:
    needs_data = {"csv.yaml": ["data.train=x.csv", "data.val=y.csv"], "webdataset.yaml": ["data.train=shards", "data.val=val"]}
    cfg = compose(block, needs_data.get(block.name, []))
    assert cfg is not None


@pytest.mark.parametrize("overrides, message", [
    (["method.name=clip_refine", "method.rafa_prior=spere"],
     "method.rafa_prior='spere' is not one of: gaussian, uniform, sphere; did you mean sphere?"),
    (["method.name=clip_refine", "method.features=rwa"], "method.features='rwa' is not one of: normalized, raw, raw_rafa; did you mean raw?"),
    (["method.name=clip_refine", "method.hycd_alpha=2"], "method.hycd_alpha=2.0 must be in [0, 1]"),
    (["method.name=degla", "data.negatives.count=1", "method.distill_reduction=avg"],
     "method.distill_reduction='avg' is not one of: sum, mean"),
    (["method.name=degla", "data.negatives.count=1", "method.ema_momentum=null"],
     "method degla's teacher is the EMA of the model: method.ema_momentum must be set"),
    (["method.name=mixup", "method.decay=epochs"], "method.decay='epochs' is not one of: epoch, none; did you mean epoch?"),
    (["method.name=negclip"], "method negclip needs negative captions: set data.negatives.count >= 1"),
    (["method.name=mmrl"], "method mmrl learns from class-labelled images: set data.classes.enabled: true (synthetic or a "
                           "csv with a label column) or data.source: folder"),
    (["method.name=mmrl", "data.classes.enabled=true", "model.lora.rank=4"],
     "method mmrl trains its tokens on a frozen backbone: set model.lora.rank to 0"),
])
def test_method_settings_are_checked_when_the_recipe_is_composed(overrides: list[str], message: str) -> None:
    """Before any model, data or download: composing the recipe names the key and the value."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_info_names_a_method_typo_without_building_the_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import open_clip

    from clipft.cli import main

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the recipe was checked")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_model)
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "clip_refine_vitb32_coco.yaml")
    assert main(["info", recipe, "method.rafa_prior=spere", "model.pretrained=null"]) == 2
    assert capsys.readouterr().err.strip() == (
        "clipft: error: method.rafa_prior='spere' is not one of: gaussian, uniform, sphere; did you mean sphere?"
    )
