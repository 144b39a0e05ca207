"""m²-mix / m³-mix: the method's terms are the loss functions on its features with λ shared by
every device, the epoch decay, config checks, and short runs of both presets."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from clipft.config import ConfigError, load_config
from clipft.data.batch import Batch
from clipft.losses.mixup import joint_mixup_loss, m2mix_loss, unimodal_mixup_loss
from clipft.methods import build_method


def _batch(method) -> Batch:  # type: ignore[no-untyped-def]
    captions = ["a red circle", "a blue star", "a green cross", "a cyan square", "a small red star", "a large blue cross"]
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(6, 3, 32, 32, generator=g), method.tokenizer(captions), captions, [str(i) for i in range(6)])


def test_terms_lambda_and_checks() -> None:
    method = build_method(load_config(None, ["method.name=mixup", "model.pretrained=synthetic"]))
    batch = _batch(method)
    features = method.batch_features(batch)
    terms = method.loss_terms(features, batch)
    lam = method.mixing_weights()
    assert lam == method.mixing_weights()  # from (seed, step): every device draws the same
    assert all(0 < v < 1 for v in lam.values())
    expected = m2mix_loss(features["image"], features["text"], lam["m2mix"], 1 / 0.07)
    torch.testing.assert_close(terms["m2mix"], expected)
    # the CLIP term uses the fixed temperature (τ = 0.01), not the model's 1/200
    assert terms["contrastive"].item() == pytest.approx(
        method.contrastive_loss(features["image"], features["text"], scale=torch.tensor(100.0)).item())
    for bad, message in (("method.decay=linear", "method.decay"), ("method.betas.vv=0", "method.betas"),
                         ("method.temperature=0", "temperature")):
        with pytest.raises(ConfigError, match=message):
            build_method(load_config(None, ["method.name=mixup", bad]))


def test_every_m3mix_term_is_its_function_with_its_own_lambda() -> None:
    """m³-mix (recipes/m3mix.yaml): each of the four mixup terms equals its loss function with
    that term's own λ (the four λ differ, so a term given another term's λ is noticed)."""
    method = build_method(load_config("recipes/m3mix.yaml", []))
    batch = _batch(method)
    features = method.batch_features(batch)
    terms = method.loss_terms(features, batch)
    lam = method.mixing_weights()
    assert len({round(v, 6) for v in lam.values()}) == 4
    image, text, scale = features["image"], features["text"], 1 / method.options.temperature
    expected = {
        "m2mix": m2mix_loss(image, text, lam["m2mix"], 1 / method.options.m2mix_temperature),
        "vv": unimodal_mixup_loss("image", image, text, lam["vv"], scale),
        "ll": unimodal_mixup_loss("text", image, text, lam["ll"], scale),
        "vl": joint_mixup_loss(image, text, lam["vl"], scale),
    }
    assert set(terms) == {"contrastive", *expected}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, msg=name)
    for name, other in (("vv", "ll"), ("ll", "vv"), ("vl", "vv")):  # another λ gives another number
        wrong = {"vv": lambda x: unimodal_mixup_loss("image", image, text, x, scale),
                 "ll": lambda x: unimodal_mixup_loss("text", image, text, x, scale),
                 "vl": lambda x: joint_mixup_loss(image, text, x, scale)}[name](lam[other])
        assert abs(wrong.item() - terms[name].item()) > 1e-4, name


def test_mixup_terms_decay_with_the_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """c(e) = 1/(e+1) for the 0-based epoch e: at epoch 2 every mixup term is a third of its
    function's value, the CLIP term is not decayed; ``decay: none`` leaves them whole."""
    from types import SimpleNamespace

    for decay, factor in (("epoch", 1 / 3), ("none", 1.0)):
        method = build_method(load_config("recipes/m3mix.yaml", [f"method.decay={decay}"]))
        monkeypatch.setattr(method, "_trainer", SimpleNamespace(world_size=1, global_rank=0, global_step=0, current_epoch=2))
        batch = _batch(method)
        features = method.batch_features(batch)
        terms = method.loss_terms(features, batch)
        lam = method.mixing_weights()
        image, text, scale = features["image"], features["text"], 1 / method.options.temperature
        expected = m2mix_loss(image, text, lam["m2mix"], 1 / method.options.m2mix_temperature)
        torch.testing.assert_close(terms["m2mix"], factor * expected)
        torch.testing.assert_close(terms["vl"], factor * joint_mixup_loss(image, text, lam["vl"], scale))
        torch.testing.assert_close(terms["contrastive"], method.contrastive_loss(image, text, scale=torch.tensor(scale)))


@pytest.mark.parametrize("recipe", ["m2mix", "m3mix"])
def test_short_runs_of_the_presets(recipe: str, tmp_path: Path) -> None:
    from clipft.runner import fit, validate

    common = ["data.batch_size=32", "data.num_workers=0", "data.synthetic.val_size=200", "eval.zeroshot=[]",
              "eval.compositional.source=null", "run.plot=false", "trainer.enable_progress_bar=false",
              f"run.out_dir={tmp_path}"]
    start = validate(load_config(f"recipes/{recipe}.yaml", common))["metrics"]
    report = fit(load_config(f"recipes/{recipe}.yaml", [
        *common, "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1"]))
    with open(Path(report["run_dir"]) / "metrics.csv") as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v}
    terms = {"train/m2mix"} | ({"train/vv", "train/ll", "train/vl"} if recipe == "m3mix" else set())
    assert terms <= logged
    assert report["steps"] == 20 and report["metrics"]["val/retrieval/mean_r1"] > 0.8  # the start's ability kept
    if recipe == "m2mix":  # measured: alignment 0.3145 -> 0.3106, centroid gap 0.3273 -> 0.3217
        for key in ("val/gap/alignment", "val/gap/centroid_distance"):
            assert report["metrics"][key] < start[key] - 0.002, key
    else:
        # the uni-modal and joint mixups' soft targets (λ on the pair, 1 − λ on its partner) pull
        # each modality's embeddings together: uniformity rises (measured: images −1.890 -> −1.778,
        # texts −1.961 -> −1.858; the same 20 steps without the three terms: −1.898 and −1.969)
        for key in ("val/gap/uniformity_image", "val/gap/uniformity_text"):
            assert report["metrics"][key] > start[key] + 0.05, key
