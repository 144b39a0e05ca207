"""MMRL and MMRL++: shared representation tokens for few-shot adaptation.

MMRL (Guo & Gu, CVPR 2025; arXiv 2503.08497), docs/methods/mmrl.md: the backbone is frozen. A
shared, modality-agnostic space R (K × d_r, N(0, 0.02²)) is mapped by per-layer linear maps
into each tower's width; the K tokens are inserted before block ``first_layer`` (block 6 of
12, as a fraction of depth otherwise) and replaced at the input of every later block
(clipft/models/tokens.py). The image tower gives two features: the class token through the
frozen projection P (f_c) and the mean of the representation tokens, after the frozen final
norm, through a trainable projection P_r (f_r). Text prompts of the classes get the tokens
too (g). Loss: clipft/losses/representation.py (α = 0.7, λ = ``reg_weight``).

Decoupled inference (docs/methods/mmrl.md#equations): classes trained on are scored with α·f̂_c ĝᵀ + (1−α)·f̂_r ĝᵀ,
other classes with f̂_c ĝᵀ only (``classify``). ``encode_image`` / ``encode_text`` — what
retrieval, zero-shot evaluation and an exported model use — are the class-token branch.

MMRL++ (``plus: true``; arXiv 2505.10088, docs/methods/mmrl.md#equations): the per-layer maps share one weight W and add
rank-``residual_rank`` residuals with their own biases (F_l(x) = x(W + A_l B_l)ᵀ + b_l, B_l = 0
at the start); P_r = P + A B with rank ``projection_rank`` (B = 0: P_r starts as P); and each
layer after the first composes its tokens as β·F_l(R) + (1−β)·(previous block's output).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipft.config import ConfigError, MethodConfig, RunConfig, from_dict
from clipft.data.batch import Batch
from clipft.data.sources import source
from clipft.losses.representation import mmrl_terms
from clipft.methods.base import ContrastiveMethod, register_method
from clipft.models import ModelBundle, keep_in_eval, read_module_state, read_training_state
from clipft.models.tokens import (
    encode_image_with_tokens,
    encode_text_with_tokens,
    image_depth,
    image_width,
    text_depth,
    text_width,
    vision_transformer,
)


@dataclass
class MMRLConfig(MethodConfig):
    name: str = "mmrl"
    num_tokens: int = 5  # K
    token_dim: int = 512  # d_r (the paper: 2048 for EuroSAT)
    # 0-based block before which the tokens enter both towers; null: round(depth·5/12)
    # (block 6 of 12, 1-based, as the paper)
    first_layer: Optional[int] = None
    alpha: float = 0.7  # class-token share of the loss and of the fused logits
    reg_weight: float = 1.0  # λ (the paper's per-data-set values: docs/methods/mmrl.md)
    plus: bool = False  # MMRL++
    residual_rank: int = 4  # MMRL++: rank of each layer's residual on the shared map
    projection_rank: int = 64  # MMRL++: rank of P_r − P
    beta: float = 0.9  # MMRL++: share of the mapped tokens in each later layer's input

    def check(self, run: RunConfig) -> None:
        if run.model.lora.rank > 0:
            raise ConfigError("method mmrl trains its tokens on a frozen backbone: set model.lora.rank to 0")
        if not source(run.data.source).has_classes(run.data):
            raise ConfigError(
                "method mmrl learns from class-labelled images: set data.classes.enabled: true "
                "(synthetic or a csv with a label column) or data.source: folder"
            )
        if self.num_tokens < 1 or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method.num_tokens must be >= 1 and method.alpha in [0, 1] (got {self.num_tokens}, {self.alpha})")


def default_first_layer(depth: int, first_layer: Optional[int]) -> int:
    return round(depth * 5 / 12) if first_layer is None else first_layer


class LayerMaps(nn.Module):
    """MMRL: one Linear(d_r → width) per layer, all starting as copies of one."""

    def __init__(self, token_dim: int, width: int, layers: int) -> None:
        super().__init__()
        first = nn.Linear(token_dim, width)
        self.maps = nn.ModuleList([copy.deepcopy(first) for _ in range(layers)])

    def forward(self, layer: int, space: Tensor) -> Tensor:
        return self.maps[layer](space)


class SharedResidualMaps(nn.Module):
    """MMRL++'s shared-residual aligner: F_l(x) = x(W + A_l B_l)ᵀ + b_l, one W for every layer,
    A_l Kaiming-uniform, B_l = 0 (every layer starts as W)."""

    def __init__(self, token_dim: int, width: int, layers: int, rank: int) -> None:
        super().__init__()
        shared = nn.Linear(token_dim, width)
        self.weight = nn.Parameter(shared.weight.detach().clone())
        self.bias = nn.Parameter(shared.bias.detach().clone().repeat(layers, 1))
        self.up = nn.Parameter(torch.empty(layers, width, rank))
        for matrix in self.up:
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
        self.down = nn.Parameter(torch.zeros(layers, rank, token_dim))

    def forward(self, layer: int, space: Tensor) -> Tensor:
        return space @ (self.weight + self.up[layer] @ self.down[layer]).T + self.bias[layer]


class RepresentationTokens(nn.Module):
    """The trainable part of MMRL / MMRL++ for one open_clip model (its towers' depths and
    widths); the model itself is passed to each call and never stored."""

    def __init__(self, cfg: MMRLConfig, model: nn.Module) -> None:
        super().__init__()
        self.num_tokens, self.plus, self.beta, self.alpha = cfg.num_tokens, cfg.plus, cfg.beta, cfg.alpha
        depths = {"image": image_depth(model), "text": text_depth(model)}
        widths = {"image": image_width(model), "text": text_width(model)}
        self.first = {tower: default_first_layer(depth, cfg.first_layer) for tower, depth in depths.items()}
        for tower, first in self.first.items():
            if not 0 <= first < depths[tower]:
                raise ConfigError(
                    f"method.first_layer: the {tower} tower has blocks 0..{depths[tower] - 1}, got {first}"
                )
        self.learned_tokens = nn.Parameter(torch.randn(cfg.num_tokens, cfg.token_dim) * 0.02)  # R

        def maps(tower: str) -> nn.Module:
            layers = depths[tower] - self.first[tower]
            if cfg.plus:
                return SharedResidualMaps(cfg.token_dim, widths[tower], layers, cfg.residual_rank)
            return LayerMaps(cfg.token_dim, widths[tower], layers)

        self.image_maps, self.text_maps = maps("image"), maps("text")
        projection = vision_transformer(model).proj
        if projection is None:
            raise ConfigError("MMRL needs an image tower with a projection (visual.proj); this one has none")
        width, dim = projection.shape
        if cfg.plus:  # P_r = P + A·B, B = 0
            self.projection_up = nn.Parameter(torch.empty(width, cfg.projection_rank))
            nn.init.kaiming_uniform_(self.projection_up, a=math.sqrt(5))
            self.projection_down = nn.Parameter(torch.zeros(cfg.projection_rank, dim))
        else:  # P_r random, scale width^-1/2 (not a copy of P)
            self.projection = nn.Parameter(torch.randn(width, dim) * width**-0.5)

    def _layer_tokens(self, maps: nn.Module, first: int) -> Any:
        def tokens(block: int, previous: Optional[Tensor]) -> Tensor:
            mapped = maps(block - first, self.learned_tokens)
            if self.plus and previous is not None:  # progressive composition
                return self.beta * mapped + (1.0 - self.beta) * previous
            return mapped

        return tokens

    def representation_projection(self, model: nn.Module) -> Tensor:
        if self.plus:
            return vision_transformer(model).proj.detach() + self.projection_up @ self.projection_down
        return self.projection

    def image(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """(f_c, f_r): the class-token and representation-token image features (unnormalised)."""
        out = encode_image_with_tokens(
            model, images, self.num_tokens, self.first["image"], self._layer_tokens(self.image_maps, self.first["image"])
        )
        pooled = vision_transformer(model).ln_post(out.tokens.mean(dim=1))
        return out.features, pooled @ self.representation_projection(model)

    def text(self, model: nn.Module, texts: Tensor) -> Tensor:
        """g: text features with the representation tokens (unnormalised)."""
        return encode_text_with_tokens(
            model, texts, self.num_tokens, self.first["text"], self._layer_tokens(self.text_maps, self.first["text"])
        ).features

    def classify(self, model: nn.Module, images: Tensor, class_features: Tensor, seen: bool) -> Tensor:
        """Decoupled inference: fused logits for classes trained on, class-token logits otherwise."""
        class_feature, representation = self.image(model, images)
        scores = F.normalize(class_feature, dim=-1) @ class_features.T
        if not seen:
            return scores
        return self.alpha * scores + (1.0 - self.alpha) * F.normalize(representation, dim=-1) @ class_features.T


class MMRLModel(nn.Module):
    """An open_clip model with MMRL's tokens, as ``clipft.load_exported`` returns it:
    ``encode_image`` / ``encode_text`` / ``forward`` as open_clip's (class-token branch), plus
    ``encode_image_representation`` and ``classify`` (decoupled inference)."""

    def __init__(self, model: nn.Module, tokens: RepresentationTokens) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        features = self.tokens.image(self.model, images)[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_representation(self, images: Tensor, normalize: bool = False) -> Tensor:
        features = self.tokens.image(self.model, images)[1]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: Tensor, normalize: bool = False) -> Tensor:
        features = self.tokens.text(self.model, texts)
        return F.normalize(features, dim=-1) if normalize else features

    def classify(self, images: Tensor, class_features: Tensor, seen: bool) -> Tensor:
        return self.tokens.classify(self.model, images, class_features, seen)

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None) -> tuple:
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


@register_method("mmrl", MMRLConfig)
class MMRL(ContrastiveMethod):
    """MMRL / MMRL++ on class-labelled data (``data.classes``); see the module docstring."""

    summary = "few-shot adaptation with shared representation tokens on a frozen backbone (MMRL, MMRL++)"
    paper = 'Guo & Gu, "MMRL: multi-modal representation learning for vision-language models", CVPR 2025'

    loss_term_names = ("class", "representation", "image_reg", "text_reg")

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        self.model.requires_grad_(False)
        keep_in_eval(self.model)
        self.tokens = RepresentationTokens(self.cfg.method, self.model)
        # the model with its tokens, as an export loads it (kept out of the module tree: its
        # parts are registered above already)
        self._with_tokens = {"model": MMRLModel(self.model, self.tokens)}
        self.train_classes: list[int] = []
        # set at fit start from the data module's classes: prompts of the classes trained on,
        # [C·T, L] token ids (T templates per class), and the frozen model's class features
        self.register_buffer("class_prompts", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("zero_shot_text", torch.empty(0), persistent=False)
        self.register_buffer("label_to_row", torch.empty(0, dtype=torch.long), persistent=False)
        self.templates_per_class = 1

    def term_weights(self) -> dict[str, float]:
        method = self.cfg.method
        weights = {"class": method.alpha, "representation": 1.0 - method.alpha}
        weights.update(image_reg=method.reg_weight, text_reg=method.reg_weight)
        return {**weights, **method.loss_weights}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "classes", None)
        if classes is None:
            raise ConfigError(
                "method mmrl learns from class-labelled images: set data.classes.enabled: true "
                "(synthetic or a csv with a label column) or data.source: folder"
            )
        self.set_classes([classes.prompts(c) for c in datamodule.train_classes], datamodule.train_classes,
                         len(classes.names))

    @torch.no_grad()
    def set_classes(self, prompts: list[list[str]], labels: list[int], num_labels: int) -> None:
        """The classes trained on: their prompts (the same number per class) and labels."""
        self.train_classes = list(labels)
        self.templates_per_class = len(prompts[0])
        self.class_prompts = self.tokenizer([p for row in prompts for p in row]).to(self.device)
        self.zero_shot_text = self._average(self.model.encode_text(self.class_prompts))
        lookup = torch.full((num_labels,), -1, dtype=torch.long)
        lookup[torch.tensor(labels)] = torch.arange(len(labels))
        self.label_to_row = lookup.to(self.device)

    def _average(self, prompt_features: Tensor) -> Tensor:
        """Class features: the mean of each class's unit prompt features (OpenAI's ensemble)."""
        unit = F.normalize(prompt_features, dim=-1)
        return unit.reshape(-1, self.templates_per_class, unit.shape[-1]).mean(dim=1)

    # the class-token branch: what retrieval, zero-shot and the exported model use
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        return self._with_tokens["model"].encode_image(images, normalize)

    def encode_text(self, texts: Tensor, normalize: bool = True) -> Tensor:
        return self._with_tokens["model"].encode_text(texts, normalize)

    def classify(self, images: Tensor, class_features: Tensor, seen: bool) -> Tensor:
        return self._with_tokens["model"].classify(images, class_features, seen)

    def encode_batch(self, batch: Batch) -> dict[str, Tensor]:
        class_feature, representation = self.tokens.image(self.model, batch.images)
        return {"class": class_feature, "representation": representation}

    def frozen_features(self, batch: Batch) -> dict[str, Tensor]:
        return {"zero_shot_image": self.model.encode_image(batch.images)}

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        if batch.labels is None:
            raise ValueError("method mmrl: the batch has no class labels (data.classes.enabled)")
        rows = self.label_to_row[batch.labels]
        if (rows < 0).any():
            raise ValueError(f"method mmrl: labels outside the classes trained on: {batch.labels[rows < 0].tolist()}")
        text = self._average(self.tokens.text(self.model, self.class_prompts))
        return mmrl_terms(
            features["class"], features["representation"], text, rows, self.logit_scale.detach(),
            features["zero_shot_image"], self.zero_shot_text,
        )




# ---------------------------------------------------------------------- export

TOKENS_FILE = "mmrl_tokens.safetensors"
TOKENS_CONFIG = "mmrl_config.json"


def write_tokens(folder: Path, checkpoint: Path, alpha: Optional[float] = None) -> None:
    """Export: the trained tokens, maps and representation projection beside the open_clip files
    (with WiSE-FT's α too, as trained: they have no pre-trained start to interpolate with)."""
    from safetensors.torch import save_file

    state = read_module_state(checkpoint)
    tokens = {k[len("tokens."):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("tokens.")}
    save_file(tokens, str(folder / TOKENS_FILE))
    method = from_dict(read_training_state(checkpoint)["hyper_parameters"]["config"]).method
    (folder / TOKENS_CONFIG).write_text(json.dumps(dataclasses.asdict(method), indent=2))


def load_tokens(folder: Path, model: nn.Module) -> MMRLModel:
    """``clipft.load_exported``: the open_clip model with its MMRL tokens (:class:`MMRLModel`)."""
    from safetensors.torch import load_file

    cfg = MMRLConfig(**json.loads((folder / TOKENS_CONFIG).read_text()))
    tokens = RepresentationTokens(cfg, model)
    tokens.load_state_dict(load_file(str(folder / TOKENS_FILE)))
    return MMRLModel(model, tokens).eval()


MMRL.export_writer, MMRL.export_loader = staticmethod(write_tokens), staticmethod(load_tokens)

__all__ = ["MMRL", "MMRLConfig", "MMRLModel", "RepresentationTokens", "load_tokens", "write_tokens"]
