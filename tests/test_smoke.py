"""``clipft fit RECIPE --smoke``: every paper recipe's smoke config keeps the recipe's model,
method and copies at their real size on synthetic data; one recipe trains end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipft.config import load_config, to_dict
from clipft.smoke import smoke_config

ROOT = Path(__file__).resolve().parents[1]
PAPER_RECIPES = sorted((ROOT / "recipes").glob("*_vit*.yaml"))


def test_the_paper_recipes_are_found() -> None:
    assert {"mmrl_vitb16_imagenet", "clip_refine_vitb32_coco", "degla_vitb32_coco"} <= {r.stem for r in PAPER_RECIPES}


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda r: r.stem)
def test_smoke_config_keeps_the_recipe_at_real_size(recipe: Path, tmp_path: Path) -> None:
    from clipft.memory import count

    before, cfg = smoke_config(recipe, [f"run.out_dir={tmp_path}"])
    # the method, its model and the copies it holds are the recipe's, counted at real size
    assert to_dict(cfg)["method"] == to_dict(before)["method"]
    assert (cfg.model.name, cfg.model.lora, cfg.model.pretrained) == (before.model.name, before.model.lora, None)
    assert count(cfg) == count(before)
    assert (cfg.data.negatives.count, cfg.data.negatives.types, cfg.data.hard_images) == (
        before.data.negatives.count, before.data.negatives.types, before.data.hard_images)
    # synthetic data at the model's own image size, 2 steps of 4 pairs in one CPU process
    assert (cfg.data.source, cfg.data.synthetic.image_size, cfg.data.train, cfg.data.val) == ("synthetic", 224, None, None)
    assert (cfg.data.batch_size, cfg.trainer.max_steps, cfg.trainer.max_epochs) == (4, 2, None)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy, cfg.trainer.micro_batch_size) == ("cpu", 1, "auto", None)
    assert cfg.trainer.precision in (before.trainer.precision, "32-true")
    assert cfg.run.out_dir == str(tmp_path) and cfg.run.checkpoint_every_n_steps > cfg.trainer.max_steps
    classes = before.data.source == "folder"  # MMRL: class-labelled synthetic objects
    assert (cfg.data.classes.enabled, cfg.data.classes.task) == ((True, "object") if classes else (False, before.data.classes.task))
    assert cfg.data.synthetic.train_size == (128 if classes else 8)
    assert cfg.data.classes.shots is None
    assert all(task.source == "synthetic" and task.size == 16 for task in cfg.eval.zeroshot)


def test_user_overrides_win_and_sizes_follow_them(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "degla_vitb32_coco.yaml"
    _, cfg = smoke_config(recipe, [f"run.out_dir={tmp_path}", "data.batch_size=8", "trainer.max_steps=3"])
    assert (cfg.data.batch_size, cfg.trainer.max_steps, cfg.data.synthetic.train_size) == (8, 3, 24)
    assert cfg.trainer.precision == "32-true"  # amp_bf16 on a CPU
    _, gpu = smoke_config(recipe, [f"run.out_dir={tmp_path}", "trainer.accelerator=gpu"])
    assert gpu.trainer.precision == "amp_bf16"  # the recipe's own on a GPU
    _, kept = smoke_config(recipe, [f"run.out_dir={tmp_path}", "trainer.precision=amp_bf16"])
    assert kept.trainer.precision == "amp_bf16"


def test_a_deepspeed_recipe_runs_in_one_process_and_says_so(tmp_path: Path) -> None:
    from clipft.smoke import describe

    recipe = ROOT / "recipes" / "clip_refine_vitb32_coco.yaml"
    before, cfg = smoke_config(recipe, [f"run.out_dir={tmp_path}", "include=configs/trainer/deepspeed_zero3.yaml"])
    assert before.trainer.strategy == "deepspeed_stage_3"
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.accelerator) == ("auto", 1, "cpu")
    lines = describe(before, cfg)
    assert "  trainer.strategy: deepspeed_stage_3 -> auto" in lines
    assert any("deepspeed_stage_3" in line and "one process" in line for line in lines if "note" in line)


def test_smoke_drops_evaluations_that_read_files() -> None:
    from clipft.smoke import smoke_overrides

    tasks = "eval.zeroshot=[{name: imagenet, source: folder, data: /nowhere}, {name: shape, source: synthetic}]"
    recipe = ROOT / "recipes" / "clip_refine_vitb32_coco.yaml"
    base = load_config(recipe, [tasks, "run.monitor=val/zeroshot/imagenet/top1"], check_data=False)
    overrides = dict(o.split("=", 1) for o in smoke_overrides(base))
    assert [(t["name"], t["size"]) for t in json.loads(overrides["eval.zeroshot"])] == [("shape", 16)]
    assert overrides["run.monitor"] == "val/loss"  # it named the task that reads a folder
    assert overrides["model.pretrained"] == "null" and overrides["eval.compositional.source"] == "null"
    # keys the user gave are left to the user
    assert "data.batch_size" not in dict(o.split("=", 1) for o in smoke_overrides(base, keep=["data.batch_size"]))


def test_mmrl_vitb16_smoke_trains_at_224px(tmp_path: Path) -> None:
    """The fastest paper recipe through the CLI: ViT-B/16 at its real size (~45 s on 2 cores)."""
    import torch

    from clipft.cli import main

    seen: list[tuple[int, ...]] = []  # inputs of the patch embedding (the only Conv2d of a ViT)

    def record(module: torch.nn.Module, inputs: tuple) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen.append(tuple(inputs[0].shape))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    recipe = ROOT / "recipes" / "mmrl_vitb16_imagenet.yaml"
    try:
        code = main(["fit", str(recipe), "--smoke", f"run.out_dir={tmp_path}", "trainer.enable_progress_bar=false", "run.plot=false"])
    finally:
        hook.remove()
    assert code == 0
    run = next(tmp_path.glob("mmrl_vitb16_imagenet/*"))
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 2 and report["model"] == "ViT-B-16"
    assert report["parameters"]["total"]["total"] == 149_620_737  # open_clip's ViT-B-16, random weights
    assert report["parameters"]["total"]["trainable"] == 0  # frozen: MMRL trains its own tokens and maps
    assert 0 < report["trainable_parameters"] < 0.05 * 149_620_737
    assert report["step_time_s"] > 0 and 0 <= report["metrics"]["val/base_to_novel/hm"] <= 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    # training batches of 4 and validation batches, every one at 224 px
    assert seen and {shape[1:] for shape in seen} == {(3, 224, 224)} and (4, 3, 224, 224) in seen


@pytest.mark.gpu
def test_smoke_on_a_gpu_reports_peak_memory_near_the_estimate(tmp_path: Path) -> None:
    """NegCLIP ViT-B/32 at its batch of 256 for 5 steps on one GPU, in bf16: the peak memory
    holds at least the model states clipft.memory estimates and not twice the whole estimate."""
    from clipft.cli import main
    from clipft.memory import count, estimate, model_state_bytes

    recipe = ROOT / "recipes" / "negclip_vitb32_coco.yaml"
    overrides = [f"run.out_dir={tmp_path}", "trainer.accelerator=gpu", "data.batch_size=256", "trainer.max_steps=5",
                 "trainer.enable_progress_bar=false", "run.plot=false"]
    assert main(["fit", str(recipe), "--smoke", *overrides]) == 0
    report = json.loads(next(tmp_path.glob("negclip_vitb32_coco/*/report.json")).read_text())
    _, cfg = smoke_config(recipe, overrides)
    assert cfg.trainer.precision == "amp_bf16"
    states, _ = model_state_bytes(count(cfg), cfg.trainer, 1)
    assert states <= report["peak_gpu_memory_bytes"] <= 2 * estimate(cfg).total
