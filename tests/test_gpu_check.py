"""benchmarks/gpu_check.py proven without a GPU: --cpu-smoke runs every stage at the smallest
sizes and writes the table; the FLOPs count that MFU divides by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_forward_flops_of_vit_b32() -> None:
    """ViT-B/32 at 224 px: 50 image tokens of width 768 and 77 text tokens of width 512, 12
    layers each; per layer 2·12h²·s + 4·s²·h, plus the patch embedding and projections."""
    image = 12 * (2 * 12 * 768**2 * 50 + 4 * 50**2 * 768) + 2 * 3 * 32**2 * 768 * 49 + 2 * 768 * 512
    text = 12 * (2 * 12 * 512**2 * 77 + 4 * 77**2 * 512) + 2 * 512 * 512
    assert gpu_check.forward_flops("ViT-B-32") == image + text
    assert 14.7e9 < image + text < 14.9e9  # 4.4 GMACs image tower, as open_clip's model table


def test_peak_by_name_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPU_PEAK_TFLOPS", raising=False)
    assert gpu_check.peak_tflops("NVIDIA H200") == 989 and gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu_check.peak_tflops("Some GPU") is None
    monkeypatch.setenv("GPU_PEAK_TFLOPS", "100")
    assert gpu_check.peak_tflops("Some GPU") == 100
    # 1000 samples/s x 3 x 14.777 GFLOPs = 44.3 TFLOPS of 100
    assert gpu_check.mfu(1000.0, "ViT-B-32", 100.0) == "44.3 %"


def test_cpu_smoke_writes_the_table(tmp_path: Path) -> None:
    recipe = str(ROOT / "recipes" / "m2mix_vitb32_flickr.yaml")
    code = gpu_check.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--recipes", recipe])
    text = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert code == 0, text
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables[0] == "| " + " | ".join(gpu_check.THROUGHPUT_COLUMNS) + " |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in tables if not line.startswith(("|---", "| row", "| recipe"))}
    assert rows["clipft fit (WebDataset shards)"][-1] == "ok |"
    assert float(rows["clipft fit (WebDataset shards)"][1]) > 0  # samples/s
    assert rows["compute-bound (batches on the device)"][-1] == "ok |"
    assert "open_clip_train.main (same shards)" in rows  # measured, or skipped with the reason
    assert "| " + " | ".join(gpu_check.RECIPE_COLUMNS) + " |" in tables
    assert rows["m2mix_vitb32_flickr"][1] == "8" and rows["m2mix_vitb32_flickr"][-1] == "ok |"
    assert "pytest -m gpu: skipped (--cpu-smoke)" in text
