"""``linear_probe``: an L2-regularised multinomial logistic regression on the frozen model's unit
image features, its regularisation chosen on a validation split carved from the training data —
the linear-probe protocol of CLIP (Radford et al., ICML 2021, Sec. 3.2 and Appendix A.3: L-BFGS
logistic regression, its L2 strength swept on a validation split) as the robust fine-tuning
papers use it (WiSE-FT, Wortsman et al., CVPR 2022; LP-FT, Kumar et al., ICLR 2022).

    (W, b) = argmin  (1/N) Σ_i CE(W·f̂_i + b, y_i) + λ·‖W‖²_F        (b not penalised)
    λ      = the value of ``method.l2_grid`` with the best accuracy on the validation split
             (ties: the largest λ), then (W, b) refitted on all the training images

(sklearn's ``LogisticRegression(C)`` minimises C·Σ_i CE + ½‖W‖², the same problem at
λ = 1 / (2·N·C).) The fit runs once in ``setup``, by full-batch L-BFGS (strong-Wolfe line search)
in float64 on the features of every training image (evaluation preprocess, model in eval mode).
Training steps then continue the same objective on mini-batches, the head only — the recipe sets
``optim.lr: 0`` so that they change nothing and the run reports the L-BFGS probe; with
``optim.lr`` > 0 they fine-tune the head with the optimizer (on augmented images, if the recipe
augments). :func:`fit_linear_probe` is the fitting function on tensors (benchmarks/mmrl.py uses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clipft.config import ConfigError, RunConfig
from clipft.data.batch import Batch
from clipft.methods.base import register_method
from clipft.methods.classifier import Classifier, ClassifierConfig
from clipft.models import ModelBundle, keep_in_eval

DEFAULT_GRID = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


@dataclass
class ProbeFit:
    """A fitted probe: logits = features @ weight.T + bias; λ and the validation accuracy of each λ tried."""

    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    l2: float
    val_accuracy: dict[float, float] = field(default_factory=dict)


def fit_logistic_regression(features: Tensor, labels: Tensor, num_classes: int, l2: float, max_iter: int = 300,
                            init: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """(W, b) minimising mean CE(W·x + b, y) + λ‖W‖² by full-batch L-BFGS in float64."""
    x = features.detach().double()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    if init is not None:
        weight, bias = init[0].detach().double().clone(), init[1].detach().double().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach().float(), bias.detach().float()


def validation_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices: per class, round(fraction·n) of its items (seeded), none from a class
    with a single item."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique().tolist():
        items = (labels == label).nonzero().flatten().cpu()
        items = items[torch.randperm(len(items), generator=generator)]
        n_val = min(len(items) - 1, round(fraction * len(items))) if len(items) > 1 else 0
        val.append(items[:n_val])
        train.append(items[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def choose_l2(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], num_classes: int, grid: list[float],
              max_iter: int = 300) -> tuple[float, dict[float, float]]:
    """The λ of ``grid`` whose fit on ``train`` classifies ``val`` best (ties: the largest λ), and
    every λ's validation accuracy. Fits from the largest λ down, each warm-started from the last."""
    accuracy: dict[float, float] = {}
    init = None
    for l2 in sorted(grid, reverse=True):
        init = fit_logistic_regression(train[0], train[1], num_classes, l2, max_iter, init)
        predicted = (val[0].float() @ init[0].T + init[1]).argmax(dim=-1)
        accuracy[l2] = (predicted == val[1]).float().mean().item()
    best = max(accuracy.values())
    return max(l2 for l2, value in accuracy.items() if value == best), accuracy


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, grid: Optional[list[float]] = None,
                     val_fraction: float = 0.2, seed: int = 0, max_iter: int = 300,
                     l2: Optional[float] = None) -> ProbeFit:
    """The linear probe of the module docstring: λ chosen on a validation split of
    (``features``, ``labels``) (or ``l2`` as given), then the fit on all of them."""
    scores: dict[float, float] = {}
    if l2 is None:
        train, val = validation_split(labels, val_fraction, seed)
        if len(val) == 0:
            raise ValueError("linear probe: no validation split (every class has a single training image); "
                             "set method.l2 to a fixed value")
        grid = list(grid or DEFAULT_GRID)
        l2, scores = choose_l2((features[train], labels[train]), (features[val], labels[val]), num_classes, grid,
                               max_iter)
    weight, bias = fit_logistic_regression(features, labels, num_classes, l2, max_iter)
    return ProbeFit(weight, bias, l2, scores)


@dataclass
class LinearProbeConfig(ClassifierConfig):
    name: str = "linear_probe"
    # the L2 strengths λ tried on the validation split (λ·‖W‖² beside the mean cross-entropy)
    l2_grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))
    l2: Optional[float] = None  # a fixed λ instead of the search; null: chosen from l2_grid
    val_fraction: float = 0.2  # share of each class's training images held out to choose λ
    max_iter: int = 300  # L-BFGS iterations of each fit

    def check(self, run: RunConfig) -> None:
        super().check(run)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"method.val_fraction must be in (0, 1), got {self.val_fraction}")
        if any(value < 0 for value in self.l2_grid) or not self.l2_grid or (self.l2 is not None and self.l2 < 0):
            raise ConfigError(f"method.l2_grid must be a non-empty list of λ >= 0 (and method.l2 >= 0), got "
                              f"{self.l2_grid} / {self.l2}")
        if self.max_iter < 1:
            raise ConfigError(f"method.max_iter must be >= 1, got {self.max_iter}")


def probe_head(method: Classifier, features: tuple[Tensor, Tensor], num_classes: int) -> ProbeFit:
    """The probe of a method's training features (head rows as labels), with its ``method.*``
    probe settings, logged."""
    options = method.cfg.method
    fit = fit_linear_probe(features[0], features[1], num_classes, options.l2_grid, options.val_fraction, method.cfg.run.seed, options.max_iter, options.l2)
    chosen = "fixed" if not fit.val_accuracy else ", ".join(f"{k:g}: {v:.3f}" for k, v in sorted(fit.val_accuracy.items()))
    rank_zero_info(f"linear probe on {len(features[1])} training images: λ = {fit.l2:g} (validation accuracy by λ: {chosen})")
    method.probe = {"l2": fit.l2, "val_accuracy": {f"{k:g}": v for k, v in fit.val_accuracy.items()}}
    return fit


@register_method("linear_probe", LinearProbeConfig)
class LinearProbe(Classifier):
    """The frozen model's unit image features → an L2-regularised logistic regression (see the module docstring)."""

    summary = "L2-regularised logistic regression on frozen image features, λ chosen on a validation split"
    paper = 'Radford et al., "Learning transferable visual models from natural language supervision", ICML 2021 (linear probe)'
    loss_term_names = ("cross_entropy", "l2")
    needs_features = True

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        self.model.requires_grad_(False)
        keep_in_eval(self.model)
        self.register_buffer("probe_l2", torch.tensor(math.nan))  # the chosen λ (in the checkpoint)

    def start_head(self, zero_shot: tuple[Tensor, Tensor], features: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        assert features is not None
        fit = probe_head(self, features, len(zero_shot[0]))
        self.probe_l2 = torch.tensor(fit.l2, device=self.device)
        return fit.weight, fit.bias

    def encode_batch(self, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            return {"image": self.encode_image(batch.images)}

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        l2 = float(self.probe_l2) if not math.isnan(float(self.probe_l2)) else 0.0
        return {"cross_entropy": F.cross_entropy(self.head(features["image"]), self.rows(batch)),
                "l2": l2 * self.head.weight.pow(2).sum()}


__all__ = ["DEFAULT_GRID", "LinearProbe", "LinearProbeConfig", "ProbeFit", "choose_l2", "fit_linear_probe",
           "fit_logistic_regression", "probe_head", "validation_split"]
