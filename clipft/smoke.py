"""``clipft fit RECIPE --smoke``: a recipe at its real size, on synthetic data, in minutes on a CPU.

A recipe written for a GPU (ViT-B/16, batch 512, COCO tables, bf16) fails on a GPU machine
for reasons a laptop could have found: a key that does not compose, a method that does not
build at that size, a shape that only breaks at 224 px. The smoke test builds the recipe's
model at its real size with random weights (nothing downloaded), swaps its data for the
synthetic data set at the model's own image resolution, and trains 2 optimizer steps on a
small batch in one CPU process, then runs a small evaluation. Everything else stays the
recipe's: the method and its teacher or EMA copies, negatives and hard images, LoRA, MMRL's
tokens and class-labelled data. 16-bit precisions train in fp32 on a CPU (see CPU_PRECISION).

:func:`smoke_overrides` is the whole transformation, as ``key=value`` overrides; the user's
own overrides win over it (``trainer.max_steps=20 trainer.accelerator=gpu`` turns it into a
short GPU run of the same recipe, as ``benchmarks/gpu_check.py`` does).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Collection

import open_clip

import clipft.models  # noqa: F401  (registers clipft's shipped model configs with open_clip)
from clipft.config import PRECISION, ConfigError, RunConfig, load_config, to_dict
from clipft.data.sources import source

STEPS = 2
BATCH = 4
VAL_SIZE = 16  # validation pairs: 4 batches, enough for both halves of base-to-novel
CLASS_TRAIN_SIZE = 128  # at least this many one-object scenes; about half show a base class
# On a CPU, 16-bit precisions train in fp32. Lightning refuses fp16 autocast on a CPU, and its CPU
# bf16 autocast is slow where it matters here: with a frozen backbone (MMRL) PyTorch's attention
# multiplies a transposed input by a bf16 weight copied once per position (an MMRL ViT-B/16 step:
# 24 s in bf16-mixed, 6.5 s in fp32, on 2 cores with avx512_bf16). The GPU check runs the bf16.
CPU_PRECISION = {"16-mixed": "32-true", "16-true": "32-true", "bf16-mixed": "32-true", "bf16-true": "32-true"}


def image_size(model_name: str) -> int:
    """The image side the model was built for (its open_clip config's ``vision_cfg``)."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ConfigError(f"model.name: '{model_name}' has no open_clip config to read its image size from; "
                          "give it: data.synthetic.image_size=N")
    size = config["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _given(key: str, keys: Collection[str]) -> bool:
    """Whether the user's overrides set ``key`` or a key inside it."""
    return any(k == key or k.startswith((f"{key}.", f"{key}[")) for k in keys)


def smoke_overrides(cfg: RunConfig, keep: Collection[str] = ()) -> list[str]:
    """Overrides that turn ``cfg`` (a recipe with the user's overrides) into its smoke test.

    Keys in ``keep`` (those the user set) are left out, and sizes that derive from them (the
    synthetic training set from the batch and steps) use the user's values.
    """
    batch = cfg.data.batch_size if _given("data.batch_size", keep) else BATCH
    steps = cfg.trainer.max_steps if _given("trainer.max_steps", keep) else STEPS
    accelerator = cfg.trainer.accelerator if _given("trainer.accelerator", keep) else "cpu"
    size = cfg.data.synthetic.image_size if _given("data.synthetic.image_size", keep) else image_size(cfg.model.name)
    classes = source(cfg.data.source).has_classes(cfg.data)
    precision = cfg.trainer.precision
    if accelerator == "cpu":
        precision = CPU_PRECISION.get(PRECISION.get(precision, precision), precision)
    zeroshot = [dict(to_dict(cfg)["eval"]["zeroshot"][i], size=VAL_SIZE)
                for i, task in enumerate(cfg.eval.zeroshot) if not source(task.source).file_backed]
    compositional = cfg.eval.compositional.source == "synthetic"
    monitor = cfg.run.monitor
    dropped_task = monitor.startswith("val/zeroshot/") and not any(monitor.startswith(f"val/zeroshot/{t['name']}/") for t in zeroshot)
    if dropped_task or (monitor.startswith("val/compositional/") and not compositional):
        monitor = "val/loss"  # it named an evaluation that reads data files the smoke test does not have

    overrides: dict[str, Any] = {
        "model.pretrained": None,  # random weights at the real size: nothing to download
        "data.source": "synthetic",
        "data.train": None,
        "data.val": None,
        "data.synthetic.image_size": size,
        # one batch per step (hard images encode the whole training set once: keep it small);
        # class data keeps about half the scenes (those of base classes)
        "data.synthetic.train_size": max(4 * batch * steps, CLASS_TRAIN_SIZE) if classes else batch * steps,
        "data.synthetic.val_size": VAL_SIZE,
        "data.batch_size": batch,
        "data.val_batch_size": batch,
        "data.num_workers": 0,
        "data.negatives.column": None,  # rule-made negatives from the synthetic captions, same count
        "trainer.accelerator": accelerator,
        "trainer.devices": 1,
        "trainer.num_nodes": 1,
        "trainer.strategy": "auto",  # one process: DDP / ZeRO recipes run their method unsharded
        "trainer.precision": precision,
        "trainer.max_steps": steps,
        "trainer.max_epochs": None,
        "trainer.limit_train_batches": None,
        "trainer.limit_val_batches": None,
        "trainer.micro_batch_size": None,
        "trainer.accumulate_grad_batches": 1,
        # validate once, after training (no best.ckpt); last.ckpt only at the end
        "trainer.val_check_interval": None,
        "trainer.check_val_every_n_epoch": 10**6,
        "trainer.log_every_n_steps": 1,
        "run.checkpoint_every_n_steps": steps + 1,
        "run.resume": None,
        "run.monitor": monitor,
        "eval.batch_size": batch,
        "eval.zeroshot": zeroshot,
        "eval.compositional.source": "synthetic" if compositional else None,
    }
    if compositional:
        overrides["eval.compositional.size"] = VAL_SIZE
    if classes:  # class-labelled synthetic objects instead of the recipe's image folder or table
        overrides |= {"data.classes.enabled": True, "data.classes.task": "object", "data.classes.names": None,
                      "data.classes.shots": None}  # every base-class scene: enough for the steps at any batch
    return [f"{key}={_format(value)}" for key, value in overrides.items() if not _given(key, keep)]


def _format(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def smoke_config(recipe: str | Path, overrides: list[str]) -> tuple[RunConfig, RunConfig]:
    """(the recipe's config, its smoke test's): the recipe with the user's ``overrides``, then
    :func:`smoke_overrides`, then the ``overrides`` again (they win). Without ``run.out_dir``
    the run goes to a new temporary folder."""
    keys = [o.split("=", 1)[0] for o in overrides if "=" in o]
    recipe_cfg = load_config(recipe, overrides, check_data=False)
    smoke = smoke_overrides(recipe_cfg, keep=keys)
    if not _given("run.out_dir", keys):
        smoke.append(f"run.out_dir={tempfile.mkdtemp(prefix='clipft-smoke-')}")
    return recipe_cfg, load_config(recipe, [*smoke, *overrides])


def describe(before: RunConfig, after: RunConfig) -> list[str]:
    """What the smoke test changed, one ``key: recipe -> smoke`` line each, and what it means."""
    old, new = _flatten(to_dict(before)), _flatten(to_dict(after))
    lines = [f"smoke test: {after.model.name} at its real size with random weights, synthetic data at "
             f"{after.data.synthetic.image_size} px, {after.trainer.max_steps} steps of {after.data.batch_size} pairs, "
             f"one {after.trainer.accelerator} process; changed from the recipe:"]
    lines += [f"  {key}: {_short(old.get(key))} -> {_short(value)}" for key, value in new.items() if old.get(key) != value]
    if before.trainer.strategy != "auto" or before.trainer.devices not in (1, "auto") or before.trainer.num_nodes != 1:
        lines.append(f"  note: the recipe's {before.trainer.strategy} on {before.trainer.devices} device(s) x "
                     f"{before.trainer.num_nodes} node(s) runs here as one process: the method is the same, "
                     "nothing is sharded or gathered")
    if after.trainer.precision != before.trainer.precision:
        lines.append(f"  note: {before.trainer.precision} trains in fp32 on a CPU (docs/gpu.md); "
                     f"trainer.precision={before.trainer.precision} keeps it (Lightning's CPU bf16 autocast)")
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."
