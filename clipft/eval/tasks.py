"""Zero-shot tasks from the recipe's ``eval.zeroshot`` list (synthetic built-ins or tables)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from clipft.config import ZeroShotTaskConfig
from clipft.data.datamodule import TransformedImages
from clipft.data.sources import source
from clipft.data.transforms import array_transform
from clipft.eval.callbacks import ZeroShotTask


def _format_strings(templates: Any) -> tuple[str, ...]:
    """open_clip keeps its template lists as functions of the class name."""
    return tuple(t("{}") if callable(t) else t for t in templates)


# Named prompt sets: one prompt, and open_clip's copies of OpenAI's public ImageNet lists.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "openai_imagenet": _format_strings(OPENAI_IMAGENET_TEMPLATES),
    "simple_imagenet": _format_strings(SIMPLE_IMAGENET_TEMPLATES),
}


def build_zeroshot_task(
    cfg: ZeroShotTaskConfig,
    preprocess_val: Callable[[Any], torch.Tensor],
    seed: int = 0,
    image_size: int = 32,
    separator: Optional[str] = None,
) -> ZeroShotTask:
    """A task of labelled images from its source (:mod:`clipft.data.sources`): the synthetic
    data set's built-in tasks (their prompts are every caption of the data's grammar that
    describes the class), or a table or image folder of labelled images."""
    images = source(cfg.source).zeroshot_images(cfg, seed, image_size, separator)
    transform = preprocess_val if images.array_size is None else array_transform(preprocess_val, images.array_size)
    return ZeroShotTask(
        name=cfg.name,
        dataset=TransformedImages(images.fetch, transform),
        class_names=images.class_names,
        templates=images.prompts or list(cfg.templates or TEMPLATE_SETS[cfg.template_set or "single"]),
        ensemble=cfg.ensemble,
        subclasses=images.subclasses,
    )
