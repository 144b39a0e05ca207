"""clipft export --format transformers: the folder Hugging Face transformers' CLIPModel /
CLIPTextModel(WithProjection) / CLIPVisionModel(WithProjection) and CLIPProcessor load offline,
computing what open_clip computes: embeddings, every layer's hidden state, the logit scale, the
tokenization and the preprocessing; back to open_clip unchanged; a one-line refusal for what
does not map."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel,
                          CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModel, CLIPVisionModelWithProjection)

from clipft.cli import main
from clipft.config import load_config
from clipft.export_transformers import (EOT_ID, NotMappable, check_mappable, clip_tokenizer, image_processor,
                                        to_open_clip, to_transformers, write_transformers)
from clipft.models import build_model

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a small red circle.", "two blue squares!!", "it's a green star, isn't it? (3.14) — naïve café",
            "UPPER lower: a/b-c_d; \"quoted\" & done", "word " * 90]  # the last one is cut at the context limit


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """open_clip starts LayerNorms at (1, 0) and biases at 0, where a swapped weight and bias,
    or a bias mapped to the wrong projection, would go unseen: make those random too (the
    matrices keep open_clip's random initialisation and scale)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _random(name: str, seed: int = 0, quick_gelu: bool = False) -> tuple[dict, torch.nn.Module]:
    cfg = json.loads(json.dumps(open_clip.get_model_config(name)))
    if quick_gelu:
        cfg["quick_gelu"] = True
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    return cfg, _perturbed(model, seed)


def _trained_tiny() -> tuple[dict, torch.nn.Module]:
    """clipft's shipped pre-trained tiny model (model.pretrained=synthetic)."""
    built = build_model(load_config(None, ["model.pretrained=synthetic"]).model)
    return json.loads(json.dumps(open_clip.get_model_config("clipft-tiny-vit"))), built.model.eval()


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _open_clip_states(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> dict:
    """open_clip's outputs and every block's hidden state (forward hooks), in transformers'
    convention: states[0] is the input of the first block (vision: after ln_pre), states[i]
    the output of block i; text_final is after ln_final."""
    states: dict = {"vision": [], "text": []}
    hooks = [model.visual.ln_pre.register_forward_hook(lambda m, i, o: states["vision"].append(o)),
             model.transformer.resblocks[0].register_forward_pre_hook(lambda m, i: states["text"].append(i[0])),
             model.ln_final.register_forward_hook(lambda m, i, o: states.__setitem__("text_final", o))]
    hooks += [b.register_forward_hook(lambda m, i, o: states["vision"].append(o)) for b in model.visual.transformer.resblocks]
    hooks += [b.register_forward_hook(lambda m, i, o: states["text"].append(o)) for b in model.transformer.resblocks]
    with torch.no_grad():
        states["image"], states["text_embeds"] = model.encode_image(images), model.encode_text(ids)
    for hook in hooks:
        hook.remove()
    normalized = [torch.nn.functional.normalize(states[k], dim=-1) for k in ("image", "text_embeds")]
    states["logits"] = model.logit_scale.detach().exp() * normalized[0] @ normalized[1].T  # open_clip's get_logits
    return states


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def _assert_same_network(hf: CLIPModel, model: torch.nn.Module, image_size: int, tokenizer,
                         n_images: int = 3, captions: list[str] = CAPTIONS) -> None:
    images, ids = _images(image_size, n_images), tokenizer(captions)
    expected = _open_clip_states(model, images, ids)
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=images, output_hidden_states=True)
        text = hf.text_model(input_ids=ids, output_hidden_states=True)
        out = hf(input_ids=ids, pixel_values=images)
        image_embeds = hf.get_image_features(pixel_values=images).pooler_output
        text_embeds = hf.get_text_features(input_ids=ids).pooler_output
    _close(image_embeds, expected["image"])
    _close(text_embeds, expected["text_embeds"])
    assert len(vision.hidden_states) == len(expected["vision"]) == len(model.visual.transformer.resblocks) + 1
    assert len(text.hidden_states) == len(expected["text"]) == len(model.transformer.resblocks) + 1
    for got, want in zip(vision.hidden_states, expected["vision"]):
        _close(got, want)
    for got, want in zip(text.hidden_states, expected["text"]):
        _close(got, want)
    _close(text.last_hidden_state, expected["text_final"])  # after the final LayerNorm (Stable Diffusion's input)
    assert float(hf.logit_scale.detach()) == float(model.logit_scale.detach())
    _close(out.logits_per_image, expected["logits"], atol=1e-4)  # scaled by exp(logit_scale)


@pytest.mark.parametrize("name, quick_gelu, trained", [
    ("clipft-tiny-vit", False, True), ("clipft-tiny-vit", True, False), ("clipft-small-vit", False, False),
])
def test_transformers_clip_computes_what_open_clip_computes(tmp_path: Path, name: str, quick_gelu: bool,
                                                          trained: bool) -> None:
    cfg, model = _trained_tiny() if trained else _random(name, quick_gelu=quick_gelu)
    write_transformers(tmp_path, cfg, dict(open_clip.get_model_preprocess_cfg(model)), model.state_dict())
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
            "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["text_config"]["eos_token_id"] == EOT_ID
    assert config["text_config"]["hidden_act"] == ("quick_gelu" if quick_gelu else "gelu")
    hf, info = CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_network(hf.eval(), model, cfg["vision_cfg"]["image_size"], open_clip.get_tokenizer(name))


def test_one_tower_folders_load_as_diffusers_and_llava_load_them(tmp_path: Path) -> None:
    cfg, model = _random("clipft-tiny-vit", seed=3)
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    write_transformers(tmp_path / "text", cfg, preprocess, model.state_dict(), "transformers-text")
    write_transformers(tmp_path / "vision", cfg, preprocess, model.state_dict(), "transformers-vision")
    assert not (tmp_path / "text" / "preprocessor_config.json").exists()
    assert not (tmp_path / "vision" / "tokenizer.json").exists()
    images, ids = _images(32), open_clip.get_tokenizer("clipft-tiny-vit")(CAPTIONS)
    expected = _open_clip_states(model, images, ids)

    with_projection = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text").eval()
    plain, info = CLIPTextModel.from_pretrained(tmp_path / "text", output_loading_info=True)  # as diffusers does
    assert not info["missing_keys"]
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "text")
    hf_ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        _close(with_projection(input_ids=hf_ids).text_embeds, expected["text_embeds"])
        out = plain.eval()(input_ids=ids, output_hidden_states=True)
    _close(out.last_hidden_state, expected["text_final"])  # Stable Diffusion 1/2
    _close(out.hidden_states[-2], expected["text"][-2])  # the penultimate layer (SDXL, clip skip)

    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        _close(vision(pixel_values=images).image_embeds, expected["image"])
        states = CLIPVisionModel.from_pretrained(tmp_path / "vision").eval()(pixel_values=images,
                                                                                output_hidden_states=True)
    _close(states.hidden_states[-2], expected["vision"][-2])  # LLaVA's feature layer
    assert CLIPImageProcessor.from_pretrained(tmp_path / "vision").crop_size == {"height": 32, "width": 32}


@pytest.mark.parametrize("context_length", [32, 77])
def test_tokenization_equals_open_clip_up_to_the_end_of_text(tmp_path: Path, context_length: int) -> None:
    clip_tokenizer(context_length).save_pretrained(tmp_path)
    hf = CLIPTokenizer.from_pretrained(tmp_path)
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    expected = reference(CAPTIONS)
    got = hf(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert got.shape == expected.shape == (len(CAPTIONS), context_length)
    for want, have in zip(expected, got):
        end = int((want == EOT_ID).nonzero()[0]) + 1
        assert have[:end].tolist() == want[:end].tolist()
        assert set(have[end:].tolist()) <= {EOT_ID} and set(want[end:].tolist()) <= {0}  # the pads differ
    assert expected[-1, -1] == got[-1, -1] == EOT_ID  # cut at the context limit, ending in end-of-text
    # what older transformers and diffusers read: vocab.json + merges.txt alone give the same ids
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    from clipft.export_transformers import _write_vocab_files

    _write_vocab_files(legacy)
    shutil.copy(tmp_path / "tokenizer_config.json", legacy)
    assert torch.equal(CLIPTokenizer.from_pretrained(legacy)(CAPTIONS, padding="max_length", truncation=True,
                                                            return_tensors="pt").input_ids, got)


def test_open_clips_text_cleaning_is_the_documented_difference() -> None:
    """open_clip runs ftfy and html.unescape before tokenizing; transformers' CLIPTokenizer does
    not. Cleaning the text as open_clip does first (docs/models.md) gives the same ids."""
    hf, reference = clip_tokenizer(77), open_clip.tokenizer.SimpleTokenizer()
    dirty = ["Tom &amp; Jerry", "don’t", "ﬁsh"]
    raw = hf(dirty, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert not torch.equal(raw[:, :4], reference(dirty)[:, :4])
    cleaned = [open_clip.tokenizer.basic_clean(t) for t in dirty]
    got = hf(cleaned, padding="max_length", truncation=True, return_tensors="pt").input_ids
    expected = reference(dirty)
    assert torch.equal(torch.where(expected == 0, EOT_ID, expected), got)


def _picture(width: int, height: int) -> Image.Image:
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 60, (height, width, 3))
    return Image.fromarray((np.stack([cols * 1.5, rows * 3, cols + rows], -1) + noise).clip(0, 255).astype(np.uint8))


def test_processor_preprocesses_as_open_clip(tmp_path: Path) -> None:
    """The processor's pixel values against open_clip's validation transform (resize the
    shortest edge to 64 px, bicubic, centre crop) on the same PIL image. Two known differences,
    both asserted: transformers' default (torchvision) backend resizes a uint8 tensor and rounds
    differently from PIL, by at most one 8-bit level, 1 / (255 · std) ≤ 0.0151 after
    normalisation (its PIL backend is exact); and its centre crop floors an odd margin where
    torchvision's rounds half to even, so the crop can sit one pixel further left or up."""
    _, _, preprocess = open_clip.create_model_and_transforms("clipft-small-vit")
    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model("clipft-small-vit"))
    CLIPProcessor(image_processor=image_processor(dict(cfg)), tokenizer=clip_tokenizer(32)).save_pretrained(tmp_path)
    processor = CLIPProcessor.from_pretrained(tmp_path)
    one_level = 1 / (255 * min(cfg["std"]))
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pil = CLIPImageProcessorPil(**{k: v for k, v in processor.image_processor.to_dict().items()
                                   if k in ("size", "crop_size", "resample", "image_mean", "image_std")})
    # 130 x 75 -> 110 x 64: an even margin (46), the same crop
    image = _picture(130, 75)
    expected = preprocess(image)
    got = processor(images=image, return_tensors="pt").pixel_values[0]
    assert got.shape == expected.shape == (3, 64, 64)
    assert (got - expected).abs().max() <= one_level + 1e-6
    assert (got - expected).abs().mean() < 0.01 * one_level  # almost every pixel is exact
    _close(pil(image, return_tensors="pt").pixel_values[0], expected, atol=1e-6)
    # 131 x 75 -> 111 x 64: margin 47, transformers crops from column 23, open_clip from 24
    image = _picture(131, 75)
    expected, got = preprocess(image), processor(images=image, return_tensors="pt").pixel_values[0]
    assert (got - expected).abs().max() > 10 * one_level
    assert (got[:, :, 1:] - expected[:, :, :-1]).abs().max() <= one_level + 1e-6
    # resize_mode squash: a square resize without crop
    squash = image_processor({**cfg, "resize_mode": "squash"})
    assert squash.size == {"height": 64, "width": 64} and not squash.do_center_crop


def test_round_trip_back_to_open_clip(tmp_path: Path) -> None:
    cfg, model = _random("clipft-tiny-vit", seed=5, quick_gelu=True)
    write_transformers(tmp_path, cfg, dict(open_clip.get_model_preprocess_cfg(model)), model.state_dict())
    back_cfg, back_state = to_open_clip(CLIPConfig.from_pretrained(tmp_path), load_file(str(tmp_path / "model.safetensors")))
    assert back_cfg["quick_gelu"] is True and back_cfg["vision_cfg"]["patch_size"] == cfg["vision_cfg"]["patch_size"]
    again = open_clip.model.CLIP(**back_cfg).eval()
    again.load_state_dict(back_state, strict=True)
    original = model.state_dict()
    assert back_state.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back_state[key], value), key
    images, ids = _images(32), open_clip.get_tokenizer("clipft-tiny-vit")(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), model.encode_image(images))
        assert torch.equal(again.encode_text(ids), model.encode_text(ids))


def _tiny_cfg(**changes: dict) -> dict:
    cfg = json.loads(json.dumps(open_clip.get_model_config("clipft-tiny-vit")))
    for key, value in changes.items():
        if key in ("vision_cfg", "text_cfg"):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("cfg, words", [
    (open_clip.get_model_config("ViT-B-16-SigLIP"), "logit bias"),
    (_tiny_cfg(init_logit_bias=-10.0), "SiglipModel"),
    (open_clip.get_model_config("nllb-clip-base"), "Hugging Face text tower"),
    (open_clip.get_model_config("convnext_base"), "timm image tower"),
    (open_clip.get_model_config("RN50"), "ResNet image tower"),
    (open_clip.get_model_config("coca_ViT-B-32"), "multimodal text decoder"),
    (open_clip.get_model_config("ViT-M-16-alt"), "layer-scale"),
    (open_clip.get_model_config("MobileCLIP-S1"), "timm image tower"),
    (_tiny_cfg(text_cfg={"no_causal_mask": True}), "without a causal mask"),
    (_tiny_cfg(vision_cfg={"pool_type": "avg"}), "class token"),
    (_tiny_cfg(vision_cfg={"attentional_pool": True}), "attentional pooler"),
    (_tiny_cfg(text_cfg={"proj_bias": True}), "Linear without bias"),
    (_tiny_cfg(text_cfg={"pool_type": "last"}), "end-of-text token"),
    (_tiny_cfg(text_cfg={"embed_cls": True}), "class token (CoCa)"),
    (_tiny_cfg(vision_cfg={"qk_norm": True}), "custom attention block"),
    (_tiny_cfg(vision_cfg={"no_ln_pre": True}), "pre_layrnorm"),
    (_tiny_cfg(vision_cfg={"image_size": [32, 48]}), "non-square image size"),
    (_tiny_cfg(text_cfg={"vocab_size": 32000}), "own tokenizer files"),
])
def test_what_does_not_map_is_refused_in_one_line(cfg: dict, words: str) -> None:
    with pytest.raises(NotMappable) as err:
        check_mappable(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_unmapped_weight_and_preprocessing_are_refused() -> None:
    cfg, model = _random("clipft-tiny-vit")
    state = {**model.state_dict(), "visual.extra_tokens": torch.zeros(4, 64)}  # e.g. a method's learned tokens
    with pytest.raises(NotMappable, match="no place in transformers' CLIPModel: visual.extra_tokens"):
        to_transformers(cfg, state)
    with pytest.raises(NotMappable, match="resize_mode=longest"):
        image_processor({"size": 32, "resize_mode": "longest"})
    to_transformers(cfg, model.state_dict())  # the unchanged model maps
    check_mappable(open_clip.get_model_config("ViT-H-14-378-quickgelu"))  # head_width 80, 378 px


def test_vit_b32_sized_model_maps_exactly(tmp_path: Path) -> None:
    """The real layout (ViT-B/32: 12 + 12 layers, widths 768 / 512, 12 / 8 heads, 224 px,
    context 77), random weights, one image and two captions to keep it short."""
    cfg, model = _random("ViT-B-32", seed=7)
    write_transformers(tmp_path, cfg, dict(open_clip.get_model_preprocess_cfg(model)), model.state_dict())
    hf, info = CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf.config.vision_config.num_attention_heads, hf.config.text_config.num_attention_heads) == (12, 8)
    assert hf.config.text_config.max_position_embeddings == 77 and hf.config.projection_dim == 512
    _assert_same_network(hf.eval(), model, 224, open_clip.get_tokenizer("ViT-B-32"), 1, CAPTIONS[2:4])


def _checkpoint(path: Path, *overrides: str) -> tuple[Path, torch.nn.Module]:
    """A clipft checkpoint as a run writes it (the method's ``model.*`` weights and the run
    config), here of the shipped pre-trained tiny model, without a run's minutes."""
    from clipft.config import to_dict

    cfg = load_config(None, ["model.pretrained=synthetic", *overrides])
    model = build_model(cfg.model).model.eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": to_dict(cfg)}, "global_step": 0}, path)
    return path, model


def test_cli_export_writes_what_transformers_loads_and_refuses_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    ckpt, model = _checkpoint(tmp_path / "tiny.ckpt")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "transformers"]) == 0
    assert "CLIPModel.from_pretrained" in (tmp_path / "hf" / "README.md").read_text()
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    _assert_same_network(hf, model, 32, open_clip.get_tokenizer("clipft-tiny-vit"))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "vision"), "--format", "transformers-vision"]) == 0
    assert {p.name for p in (tmp_path / "vision").iterdir()} == {"config.json", "model.safetensors",
                                                                 "preprocessor_config.json", "README.md"}

    capsys.readouterr()
    biased, _ = _checkpoint(tmp_path / "biased.ckpt", "model.logit_bias=-10", "model.logit_scale=10")
    assert main(["export", str(biased), "--out", str(tmp_path / "no"), "--format", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "logit bias" in err and "SiglipModel" in err and err.count("\n") == 1
    from clipft.methods import METHODS  # a method with parameters of its own (MMRL's tokens)

    monkeypatch.setattr(METHODS["finetune"], "export_writer", staticmethod(lambda folder, checkpoint: None))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "no"), "--format", "transformers-text"]) == 2
    err = capsys.readouterr().err
    assert "adds parameters of its own" in err and "--format local-dir" in err and err.count("\n") == 1
    assert not (tmp_path / "no").exists()


def _in_memory_model(run: Path) -> torch.nn.Module:
    """The trained model as the run left it (adapters unmerged, attention split)."""
    from clipft.config import from_dict
    from clipft.methods import build_method

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    method = build_method(from_dict(ckpt["hyper_parameters"]["config"]))
    method.load_state_dict(ckpt["state_dict"])
    return method.model.eval()


def _fit(fast_overrides: list[str], *extra: str) -> Path:
    assert main(["fit", "recipes/quickstart.yaml", *fast_overrides, "trainer.max_steps=2",
                 "trainer.val_check_interval=2", *extra]) == 0
    out = Path(fast_overrides[-1].split("=", 1)[1])
    return max(out.glob("*/*/report.json"), key=lambda p: p.stat().st_mtime).parent


LOAD_OFFLINE = """
import json, sys, torch
from transformers import CLIPModel, CLIPProcessor
model, processor = CLIPModel.from_pretrained(sys.argv[1]).eval(), CLIPProcessor.from_pretrained(sys.argv[1])
inputs = processor(text=json.loads(sys.argv[2]), padding="max_length", truncation=True, return_tensors="pt")
with torch.no_grad():
    out = {"image": model.get_image_features(pixel_values=torch.load(sys.argv[3])).pooler_output,
           "text": model.get_text_features(**inputs).pooler_output}
assert not any(m.startswith("clipft") for m in sys.modules), "clipft was imported"
torch.save(out, sys.argv[4])
"""


@pytest.mark.slow
def test_cli_exports_a_lora_run_that_transformers_loads_offline(tmp_path: Path, fast_overrides: list[str]) -> None:
    """A trained LoRA run through `clipft export --format transformers --merge-lora` (and
    WiSE-FT), loaded by transformers in a process without clipft, the hub or its cache."""
    run = _fit(fast_overrides, "model.pretrained=synthetic", "model.lora.rank=4", "optim.lr=1e-2",
               "model.lora.targets=[q,k,v,out,c_fc,c_proj]")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out), "--format", "transformers", "--merge-lora"]) == 0
    assert "CLIPModel.from_pretrained" in (out / "README.md").read_text()
    model = _in_memory_model(run)
    images, ids = _images(32), open_clip.get_tokenizer("clipft-tiny-vit")(CAPTIONS)
    with torch.no_grad():
        expected = {"image": model.encode_image(images), "text": model.encode_text(ids)}
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_OFFLINE, str(out), json.dumps(CAPTIONS), str(tmp_path / "images.pt"),
         str(tmp_path / "got.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    for key in ("image", "text"):
        _close(got[key], expected[key])

    folders = [tmp_path / "wise" / f"wise_ft_{a}" for a in ("0", "1")]
    assert main(["export", str(run), "--out", str(tmp_path / "wise"), "--format", "transformers-text",
                 "--merge-lora", "--wise-ft", "0", "1"]) == 0
    start = build_model(load_config(None, ["model.pretrained=synthetic"]).model).model.eval()
    for folder, reference in zip(folders, (start, model)):
        text = CLIPTextModelWithProjection.from_pretrained(folder).eval()
        with torch.no_grad():
            _close(text(input_ids=ids).text_embeds, reference.encode_text(ids))


def test_transformers_is_declared_at_the_installed_version() -> None:
    import transformers

    assert f'"transformers=={transformers.__version__}"' in (ROOT / "pyproject.toml").read_text()
