"""The memory estimate of ``clipft info``: DeepSpeed's own figures where its estimators apply,
the documented formulas elsewhere, counted on the meta device without allocating weights."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from clipft.config import load_config
from clipft.memory import GiB, Counts, activation_bytes, count, estimate, model_state_bytes, parse_size, suggest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vitb32() -> Counts:
    """ViT-B-32 fine-tuned in full: every parameter trainable but the frozen logit scale."""
    return count(load_config(None, ["model.name=ViT-B-32", "model.lock_logit_scale=false"]))


@pytest.mark.parametrize("devices, nodes", [(1, 1), (8, 1), (4, 2)])
def test_model_states_equal_deepspeeds_estimators_when_every_parameter_trains(vitb32: Counts, devices: int, nodes: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = replace(vitb32, trainable=vitb32.total)  # DeepSpeed's assumption
    base = load_config(None, ["trainer.precision=amp_bf16", f"trainer.num_nodes={nodes}"]).trainer
    psi, largest = counts.total, counts.largest_layer
    expected = {
        "deepspeed_stage_2": estimate_zero2_model_states_mem_needs(psi, devices, nodes, cpu_offload=False),
        "deepspeed_stage_2_offload": estimate_zero2_model_states_mem_needs(psi, devices, nodes, cpu_offload=True),
    }
    zero3 = {
        "deepspeed_stage_3": estimate_zero3_model_states_mem_needs(psi, largest, devices, nodes, cpu_offload=False),
        "deepspeed_stage_3_offload": estimate_zero3_model_states_mem_needs(psi, largest, devices, nodes, cpu_offload=True,
                                                                          cpu_offload_params=True),
    }
    for strategy, (cpu, gpu) in expected.items():
        ours_gpu, ours_cpu = model_state_bytes(counts, replace(base, strategy=strategy), devices)
        assert int(ours_gpu) == gpu, strategy
        if strategy.endswith("offload"):  # the CPU side matters only where states live there
            assert int(ours_cpu) == cpu, strategy
    for strategy, (cpu, gpu, _) in zero3.items():
        ours_gpu, ours_cpu = model_state_bytes(counts, replace(base, strategy=strategy), devices)
        assert int(ours_gpu) == gpu, strategy
        if strategy.endswith("offload"):
            assert int(ours_cpu) == cpu, strategy


def test_frozen_parameters_keep_only_their_weights_and_copies_add_up() -> None:
    cfg = load_config(str(ROOT / "recipes" / "clip_refine_vitb32_coco.yaml"),
                      ["model.pretrained=null", "model.lora.rank=8", "include=configs/trainer/deepspeed_zero2.yaml",
                       "trainer.devices=4"], check_data=False)
    counts = count(cfg)
    assert 0 < counts.trainable < counts.total / 100 and counts.teacher == 0  # LoRA: the teacher is the model, adapters off
    gpu, _ = model_state_bytes(counts, cfg.trainer, 4)
    assert gpu == 2 * counts.total + 18 * counts.trainable / 4
    full = count(load_config(str(ROOT / "recipes" / "clip_refine_vitb32_coco.yaml"), ["model.pretrained=null"], check_data=False))
    assert full.teacher == full.total  # a frozen copy of the whole model
    ema = count(load_config(None, ["model.name=ViT-B-32", "method.ema_momentum=0.99"]))
    ddp = load_config(None, ["model.name=ViT-B-32", "method.ema_momentum=0.99"])
    assert ema.ema == ema.total and estimate(ddp, ema).copies == 4 * ema.total  # fp32 shadow


def test_activations_follow_the_formula_and_checkpointing_keeps_layer_inputs() -> None:
    cfg = load_config(None, ["model.name=ViT-B-32", "data.batch_size=8", "trainer.precision=amp_bf16"])
    per_layer = lambda s, h, a, b, r=4.0: (18 + 4 * r) * s * b * h + 5 * a * s * s * b  # noqa: E731
    image = 12 * per_layer(50, 768, 12, 8)  # 224/32 = 7, 49 patches + class token
    text = 12 * per_layer(77, 512, 8, 8)
    assert activation_bytes(cfg, 8) == image + text
    assert activation_bytes(replace(cfg, trainer=replace(cfg.trainer, precision="fp32")), 8) == 2 * (image + text)
    checkpointed = replace(cfg, model=replace(cfg.model, grad_checkpointing=True))
    assert activation_bytes(checkpointed, 8) == 12 * 2 * 50 * 8 * 768 + per_layer(50, 768, 12, 8) + 12 * 2 * 77 * 8 * 512 + per_layer(77, 512, 8, 8)
    negatives = load_config(None, ["model.name=ViT-B-32", "data.negatives.count=2", "trainer.precision=amp_bf16"])
    assert activation_bytes(negatives, 8) == image + 3 * text  # each pair's negatives are encoded too


@pytest.mark.parametrize("budget", ["16GB", "6GB"])
def test_a_too_small_gpu_gets_a_change_that_fits(budget: str) -> None:
    recipe = str(ROOT / "recipes" / "negclip_vitb32_coco.yaml")
    cfg = load_config(recipe, ["model.pretrained=null"], check_data=False)
    counts = count(cfg)
    assert estimate(cfg, counts).total > parse_size(budget)
    fix = suggest(cfg, parse_size(budget), counts)
    assert fix is not None
    fitted = load_config(recipe, ["model.pretrained=null", *fix.split()], check_data=False)
    assert estimate(fitted, counts).total <= parse_size(budget)
    assert parse_size("80GB") == 80e9 and parse_size("141GiB") == 141 * GiB


def test_info_on_vit_bigg_answers_without_allocating_its_weights(tmp_path: Path) -> None:
    """2.5B parameters would be 10 GB in fp32; the structure on the meta device costs nothing."""
    code = (
        "import resource, sys\n"
        "import torch, lightning, open_clip\n"
        "from clipft.cli import main\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert main(sys.argv[1:]) == 0\n"
        "print('RSS_GROWTH_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    argv = ["info", str(ROOT / "recipes" / "clip_refine_vitb32_coco.yaml"), "model.name=ViT-bigG-14", "model.pretrained=null",
            "include=configs/trainer/deepspeed_zero3_offload.yaml", "trainer.devices=8", "--gpu-memory", "141GB"]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "total 2,539,567,105" in result.stdout
    growth = int(result.stdout.split("RSS_GROWTH_MB")[1].split()[0])
    assert growth < 400, f"info grew the process by {growth} MB"
    assert "warning: the estimate" in result.stdout and "this would fit: trainer.micro_batch_size=" in result.stdout
