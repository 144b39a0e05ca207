"""``classifier``: the image tower and a linear head, fine-tuned end to end with cross-entropy on
class labels, the head started at the zero-shot classifier — the baseline of WiSE-FT (Wortsman et
al., "Robust fine-tuning of zero-shot models", CVPR 2022, Sec. 2 and Appendix: "end-to-end"
fine-tuning, the final linear layer initialised with the zero-shot weights).

    logits(x) = W·f̂(x) + b,   f̂ = the unit image embedding,
    W₀ = s·ĉ,  b₀ = 0,         ĉ_k = unit mean of class k's unit prompt embeddings, s = exp(logit_scale)
    L = CE(logits(x), y)       (mean over the batch)

so at step 0 the head's logits are exactly s times the zero-shot cosine scores (OpenAI's prompt
ensemble, the mean over the class's templates). The text tower and the logit scale are frozen
(the loss does not use them); the head's rows are the classes trained on
(``data.classes.train_classes``), its class names and prompts those of ``data.classes``.

The head is built in ``setup`` (before Lightning restores a checkpoint and builds the optimizer)
from the data module's classes; ``head.start_weight`` / ``start_bias`` keep the zero-shot head,
the start that WiSE-FT interpolates from (``clipft export --wise-ft α``). Evaluation: a zero-shot
task whose class names equal the head's is scored by the head (``head_for``). Export: the head
and its class names beside the open_clip files (``classifier_head.safetensors`` / ``.json``);
``clipft.load_exported`` returns :class:`ClassifierModel`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipft.config import ConfigError, MethodConfig, RunConfig
from clipft.data.batch import Batch
from clipft.data.classes import ClassSet
from clipft.data.sources import source
from clipft.methods.base import ContrastiveMethod, register_method
from clipft.models import ModelBundle, read_module_state, read_training_state

HEAD_KEY = "clipft_head"  # the checkpoint's entry with the head's class names and prompts
HEAD_FILE = "classifier_head.safetensors"
HEAD_CONFIG = "classifier_head.json"


def needs_classes(name: str, run: RunConfig) -> None:
    if not source(run.data.source).has_classes(run.data):
        raise ConfigError(
            f"method {name} learns from class-labelled images: set data.classes.enabled: true "
            "(synthetic or a csv with a label column) or data.source: folder"
        )


@dataclass
class ClassifierConfig(MethodConfig):
    name: str = "classifier"

    def check(self, run: RunConfig) -> None:
        needs_classes(self.name, run)


class ClassHead(nn.Module):
    """logits = W·f̂ + b over unit image features, with its class names; ``start_weight`` /
    ``start_bias``: the zero-shot head (WiSE-FT's θ₀ for the head)."""

    def __init__(self, weight: Tensor, bias: Tensor, class_names: Sequence[str],
                 start_weight: Optional[Tensor] = None, start_bias: Optional[Tensor] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float())
        self.register_buffer("start_weight", (weight if start_weight is None else start_weight).detach().clone().float())
        self.register_buffer("start_bias", (bias if start_bias is None else start_bias).detach().clone().float())
        self.class_names = list(class_names)

    @classmethod
    def empty(cls, classes: int = 0, dim: int = 0, class_names: Sequence[str] = ()) -> "ClassHead":
        return cls(torch.zeros(classes, dim), torch.zeros(classes), class_names)

    def forward(self, unit_features: Tensor) -> Tensor:
        return unit_features @ self.weight.to(unit_features.dtype).T + self.bias.to(unit_features.dtype)


@torch.no_grad()
def zero_shot_head(encode_text: Any, tokenizer: Any, prompts: list[list[str]], scale: float,
                   batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(W, b) = (s·ĉ, 0): ĉ_k the unit mean of class k's unit prompt embeddings (each class the
    same number of prompts), s the logit scale."""
    flat = [p for row in prompts for p in row]
    features = torch.cat([F.normalize(encode_text(tokenizer(flat[i:i + batch_size])).float(), dim=-1)
                          for i in range(0, len(flat), batch_size)])
    classes = F.normalize(features.reshape(len(prompts), -1, features.shape[-1]).mean(dim=1), dim=-1)
    return scale * classes, torch.zeros(len(prompts), device=classes.device)


@register_method("classifier", ClassifierConfig)
class Classifier(ContrastiveMethod):
    """Image tower + linear head, cross-entropy on class labels (see the module docstring)."""

    summary = "fine-tune the image tower and a linear head started at the zero-shot classifier, cross-entropy"
    paper = 'Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT), CVPR 2022'
    loss_term_names = ("cross_entropy",)

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        for name, param in self.model.named_parameters():  # the loss reads the image tower only
            if not name.startswith("visual."):
                param.requires_grad_(False)
        self.head = ClassHead.empty()  # sized in setup (or from a checkpoint)
        self.head_ready = False
        self.templates: list[str] = []
        self.probe: Optional[dict[str, Any]] = None  # a linear probe's λ and validation accuracies (linear_probe, lp_ft)
        self.register_buffer("label_to_row", torch.empty(0, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ the head

    def start_head(self, zero_shot: tuple[Tensor, Tensor], features: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """The head's starting (W, b), given the zero-shot head: that head. ``features``: the
        training images' unit features and head rows (computed only when :attr:`needs_features`)."""
        return zero_shot

    needs_features = False  # whether start_head needs the training images' features

    def zero_shot(self, prompts: list[list[str]]) -> tuple[Tensor, Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            return zero_shot_head(self.model.encode_text, lambda t: self.tokenizer(t).to(self.device), prompts,
                                  float(self.logit_scale))
        finally:
            self.model.train(was_training)

    def setup(self, stage: str) -> None:
        """Build the head from the data module's classes, before a checkpoint is restored and the
        optimizer built: zero-shot (or :meth:`start_head`), or only its shape when resuming."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "classes", None)
        if classes is None:
            raise ConfigError(
                f"method {self.cfg.method.name} learns from class-labelled images: set data.classes.enabled: true "
                "(synthetic or a csv with a label column) or data.source: folder"
            )
        rows = list(datamodule.train_classes)
        self.set_label_rows(rows, len(classes.names))
        if self.head_ready:  # loaded from a checkpoint already (validate --ckpt)
            return
        self.to(self.trainer.strategy.root_device)
        resuming = stage == "fit" and self.trainer.ckpt_path is not None
        features = self.training_features(datamodule) if self.needs_features and not resuming else None
        self.build_head(classes, rows, features, shape_only=resuming)

    def build_head(self, classes: ClassSet, rows: list[int], features: Optional[tuple[Tensor, Tensor]] = None,
                   shape_only: bool = False) -> None:
        """The head over ``rows`` (labels of ``classes``): its start (:meth:`start_head`, from
        ``features``: the training images' unit features and head rows, where
        :attr:`needs_features`), and the zero-shot head as WiSE-FT's start; ``shape_only``: zeros of
        the right shape (a checkpoint's head comes next)."""
        self.set_label_rows(rows, len(classes.names))
        prompts = [classes.prompts(c) for c in rows]
        names = [classes.names[c] for c in rows]
        self.templates = list(classes.templates)
        start_weight, start_bias = self.zero_shot(prompts[:1] if shape_only else prompts)
        if shape_only:
            self.head = ClassHead.empty(len(rows), start_weight.shape[1], names).to(self.device)
        else:
            weight, bias = self.start_head((start_weight, start_bias), features)
            self.head = ClassHead(weight, bias, names, start_weight, start_bias).to(self.device)
        self.head_ready = True

    @torch.no_grad()
    def training_features(self, datamodule: Any) -> tuple[Tensor, Tensor]:
        """Unit image features (eval preprocess, model in eval mode) and head rows of every
        training image (every rank computes all of them)."""
        from clipft.data.datamodule import collate_labelled

        data = self.cfg.data
        loader = torch.utils.data.DataLoader(
            datamodule.class_training_set(), batch_size=data.val_batch_size or data.batch_size,
            num_workers=data.num_workers, collate_fn=collate_labelled,
        )
        was_training = self.model.training
        self.model.eval()
        features, labels = [], []
        try:
            for images, batch_labels in loader:
                features.append(self.encode_image(images.to(self.device)).float())
                labels.append(batch_labels.to(self.device))
        finally:
            self.model.train(was_training)
        return torch.cat(features), self.label_to_row[torch.cat(labels)]

    def set_label_rows(self, rows: list[int], num_labels: int) -> None:
        lookup = torch.full((num_labels,), -1, dtype=torch.long)
        lookup[torch.tensor(rows)] = torch.arange(len(rows))
        self.label_to_row = lookup.to(self.device)

    def head_for(self, class_names: Sequence[str]) -> Optional[ClassHead]:
        """The head, for evaluation of a task with exactly its classes (in its order); else None."""
        return self.head if self.head_ready and list(class_names) == self.head.class_names else None

    def _load_head(self, state: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """The head from a checkpoint's state (``head.*``) and its class names."""
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        if "weight" not in head:
            raise ConfigError(f"method {self.cfg.method.name}: the checkpoint holds no head (head.weight)")
        self.head = ClassHead(head["weight"], head["bias"], meta.get("class_names", []),
                              head.get("start_weight"), head.get("start_bias")).to(self.device)
        self.templates = list(meta.get("templates", []))
        self.probe = meta.get("probe")
        self.head_ready = True

    def load_method_state(self, checkpoint: Path) -> None:
        self._load_head(read_module_state(checkpoint), read_training_state(checkpoint).get(HEAD_KEY) or {})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[HEAD_KEY] = {"class_names": list(self.head.class_names), "templates": list(self.templates),
                                "probe": self.probe}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict") or {}
        if "head.weight" in state and not self.head_ready:  # load_from_checkpoint: size the head first
            self._load_head(state, checkpoint.get(HEAD_KEY) or {})

    # ------------------------------------------------------------------ training

    def rows(self, batch: Batch) -> Tensor:
        if batch.labels is None:
            raise ValueError(f"method {self.cfg.method.name}: the batch has no class labels (data.classes.enabled)")
        rows = self.label_to_row[batch.labels]
        if (rows < 0).any():
            raise ValueError(f"method {self.cfg.method.name}: labels outside the head's classes: "
                             f"{batch.labels[rows < 0].tolist()}")
        return rows

    def encode_batch(self, batch: Batch) -> dict[str, Tensor]:
        return {"image": self.encode_image(batch.images)}

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        return {"cross_entropy": F.cross_entropy(self.head(features["image"]), self.rows(batch))}

    def classify_images(self, images: Tensor) -> Tensor:
        """The head's logits ``[N, C]`` of images."""
        return self.head(self.encode_image(images))


class ClassifierModel(nn.Module):
    """An exported open_clip model with its head, as ``clipft.load_exported`` returns it:
    ``encode_image`` / ``encode_text`` / ``forward`` as open_clip's, plus ``classify(images)``
    (the head's logits) and ``class_names``."""

    def __init__(self, model: nn.Module, head: ClassHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    @property
    def class_names(self) -> list[str]:
        return self.head.class_names

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, texts: Tensor, normalize: bool = False) -> Tensor:
        return self.model.encode_text(texts, normalize=normalize)

    def classify(self, images: Tensor) -> Tensor:
        return self.head(self.model.encode_image(images, normalize=True))

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None) -> Any:
        return self.model(image, text)


# ---------------------------------------------------------------------- export

def head_at(checkpoint: Path, alpha: Optional[float] = None) -> Optional[ClassHead]:
    """The head of a clipft checkpoint (None: it has none), at WiSE-FT's α:
    (1 − α)·(zero-shot head) + α·(trained head); α None: the trained head. Its class names and
    probe summary come along (``class_names``, ``meta``)."""
    state = read_module_state(checkpoint)
    if "head.weight" not in state:
        return None
    head = {k[len("head."):]: v.detach().float().cpu() for k, v in state.items() if k.startswith("head.")}
    weight, bias = head["weight"], head["bias"]
    if alpha is not None:
        weight = (1 - alpha) * head["start_weight"] + alpha * weight
        bias = (1 - alpha) * head["start_bias"] + alpha * bias
    meta = read_training_state(checkpoint).get(HEAD_KEY) or {}
    out = ClassHead(weight, bias, meta.get("class_names", []), head["start_weight"], head["start_bias"])
    out.meta = meta
    return out


def write_head(folder: Path, checkpoint: Path, alpha: Optional[float] = None) -> None:
    """Export: the head (WiSE-FT: at α, :func:`head_at`) and its class names beside the open_clip files."""
    from safetensors.torch import save_file

    head = head_at(checkpoint, alpha)
    if head is None:
        raise ConfigError(f"{checkpoint}: holds no classification head (head.weight) to export")
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(folder / HEAD_FILE))
    meta = head.meta
    (folder / HEAD_CONFIG).write_text(json.dumps({
        "class_names": meta.get("class_names", []), "templates": meta.get("templates", []),
        "input": "unit image features (encode_image(images, normalize=True)); logits = features @ weight.T + bias",
        "wise_ft_alpha": alpha, "probe": meta.get("probe"),
    }, indent=2))


def load_head(folder: Path, model: nn.Module) -> ClassifierModel:
    """``clipft.load_exported``: the open_clip model with its head (:class:`ClassifierModel`)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / HEAD_FILE))
    meta = json.loads((folder / HEAD_CONFIG).read_text())
    return ClassifierModel(model, ClassHead(tensors["weight"], tensors["bias"], meta["class_names"])).eval()


Classifier.export_writer, Classifier.export_loader = staticmethod(write_head), staticmethod(load_head)

__all__ = ["ClassHead", "Classifier", "ClassifierConfig", "ClassifierModel", "head_at", "load_head", "write_head",
           "zero_shot_head"]
