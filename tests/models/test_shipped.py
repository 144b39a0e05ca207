"""Weights shipped in the package (``model.pretrained=synthetic``) and the temperature options."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipft.config import ConfigError, ModelConfig, load_config
from clipft.models import ModelError, build_model
from clipft.models.__main__ import write_shipped_weights
from clipft.models.shipped import shipped_weights


def test_synthetic_tag_loads_the_package_file() -> None:
    path = shipped_weights("clipft-tiny-vit", "synthetic")
    assert path is not None and path.is_file() and path.stat().st_size < 10e6
    stored = load_file(str(path))
    model = build_model(ModelConfig(name="clipft-tiny-vit", pretrained="synthetic")).model
    own = model.state_dict()
    assert set(stored) == set(own)
    assert all(torch.equal(own[k], v.float()) for k, v in stored.items())
    # pre-trained with the temperature fixed at 1/200 (recipes/pretrain_tiny.yaml)
    assert model.logit_scale.exp().item() == pytest.approx(200, rel=5e-3)  # fp16-stored


def test_unknown_tag_lists_the_shipped_one() -> None:
    with pytest.raises(ModelError, match="tags: synthetic"):
        build_model(ModelConfig(name="clipft-tiny-vit", pretrained="laion"))


def test_write_shipped_weights_from_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipft.models.shipped as shipped

    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    model = build_model(ModelConfig(name="clipft-tiny-vit")).model
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = write_shipped_weights(ckpt)
    stored = load_file(str(out))
    assert stored["text_projection"].dtype == torch.float16
    assert torch.allclose(stored["text_projection"].float(), model.state_dict()["text_projection"], atol=1e-3)


def test_logit_scale_can_be_set_and_locked() -> None:
    model = build_model(ModelConfig(name="clipft-tiny-vit", logit_scale=50.0, lock_logit_scale=True)).model
    assert model.logit_scale.item() == pytest.approx(math.log(50.0))
    assert not model.logit_scale.requires_grad
    with pytest.raises(ConfigError, match="model.logit_scale"):
        load_config(None, ["model.logit_scale=200"])  # above optim.logit_scale_max (100)
    assert load_config(None, ["model.logit_scale=200", "optim.logit_scale_max=200"]).model.logit_scale == 200


def test_logit_bias_option_adds_a_learned_bias() -> None:
    model = build_model(ModelConfig(name="clipft-tiny-vit", logit_bias=-10.0)).model
    assert model.logit_bias.requires_grad and model.logit_bias.item() == -10.0
    assert "logit_bias" in model.state_dict()
