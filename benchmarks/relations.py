"""Spatial relations on the synthetic data: where is the limit, and can NegCLIP get past it?
(issue 8: NegCLIP >= 10 points above plain fine-tuning on replace_rel, R@1 within 2 points)

    python benchmarks/relations.py probe       [--train 8000] [--test 2000]
    python benchmarks/relations.py supervised  [--steps 400] [--target given|canonical] [--only 0,1,2]
    python benchmarks/relations.py arms        [--steps 800] [--lr 1e-3] [--recipe recipes/negclip_relations.yaml]

All three run on two-object scenes of the synthetic data set (``SyntheticScenes`` with
``two_object_fraction=1``), train split for fitting, val split (other seeds) for scoring.
Targets of a scene, each a function of what the image shows:

* ``axis``: horizontal (left/right) or vertical (above/below), 2-way. Needs where the two
  objects are, not which is which.
* ``caption``: the caption's relation, ``objects[0] <relation> objects[1]``, 4-way. From an
  image alone left/right (and above/below) is ambiguous — the image does not say which object
  the caption names first — so an image probe is capped near axis + coin-flip; from the text
  it is the relation word, which a bag of words already has.
* ``canonical``: the relation of the canonically first object (lower colour index in
  ``COLOURS``, then shape, then size) to the other, 4-way, chance 25 %. It is fixed by the image
  and needs what ``replace_rel`` needs: each object's identity bound to its position. From a
  caption it needs word order ("A left of B" and "B left of A" have the same words but
  opposite canonical relations).
* ``given``: the caption's relation with the caption's two objects given to the head, which
  builds one query vector per candidate relation from the objects' words and dots it with the
  feature (:class:`GivenObjects`, linear in the feature): what a dual encoder has to do to
  tell "A left of B" from "A right of B". Chance 25 %.

``probe``: frozen features of the shipped tiny model (``synthetic``) and of the same
architecture untrained, probed with a linear classifier and a one-hidden-layer MLP; the patch
tokens also with an attention-pooling probe (learned queries over the tokens, then the MLP).
``supervised``: the image tower trained with a ``given`` (default) or ``canonical`` head on
its pooled embedding (tiny from the checkpoint and from scratch, small from scratch). ``arms``: plain fine-tuning vs NegCLIP with
relation negatives, same steps and learning rate (``benchmarks/arms.py``).

Each command prints its table and replaces its own section of
benchmarks/results/relations_synthetic.md. Single-threaded by default (``--threads``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
import torch.nn.functional as F
from arms import ROOT, run_arm, table
from torch import nn

import clipft.methods  # noqa: F401  (every method registers its settings)
from clipft.config import load_config
from clipft.data.synthetic import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SyntheticScenes,
)
from clipft.data.transforms import array_fast_path
from clipft.models import ModelBundle, build_model

RESULTS = ROOT / "benchmarks" / "results" / "relations_synthetic.md"
RECIPE = str(ROOT / "recipes" / "negclip.yaml")
TARGETS = ("axis", "caption", "canonical", "given")
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
ATTRIBUTE_VALUES = len(COLOURS) + len(SHAPES) + len(SIZES)  # one multi-hot slot per attribute word


# ------------------------------------------------------------------------------- targets


def _key(obj) -> tuple[int, int, int]:
    return _COLOUR_INDEX[obj.colour], SHAPES.index(obj.shape), SIZES.index(obj.size)


def multi_hot(obj) -> list[float]:
    """The object's colour, shape and size words as a multi-hot vector."""
    colour, shape, size = _key(obj)
    hot = [0.0] * ATTRIBUTE_VALUES
    for i in (colour, len(COLOURS) + shape, len(COLOURS) + len(SHAPES) + size):
        hot[i] = 1.0
    return hot


def targets(scene: Scene) -> dict[str, object]:
    """axis (0 horizontal, 1 vertical), the caption's relation and the canonical relation
    (both as indices into RELATIONS) of a two-object scene, and the caption's two objects as
    multi-hot words (``given``: the caption's relation, the objects given to the head)."""
    relation = RELATIONS.index(scene.relation)
    first_is_canonical = _key(scene.objects[0]) < _key(scene.objects[1])
    canonical = relation if first_is_canonical else relation ^ 1  # left<->right, above<->below
    return {"axis": relation // 2, "caption": relation, "canonical": canonical,
            "objects": multi_hot(scene.objects[0]) + multi_hot(scene.objects[1])}


def scenes(split: str, size: int, seed: int, image_size: int) -> SyntheticScenes:
    return SyntheticScenes(split, size, seed, image_size, two_object_fraction=1.0)


def batch(data: SyntheticScenes, indices, normalise) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    items = [data[int(i)] for i in indices]
    images = torch.stack([normalise(item["image"]) for item in items])
    labels = [targets(item["scene"]) for item in items]
    out = {t: torch.tensor([lab[t] for lab in labels]) for t in ("axis", "caption", "canonical", "objects")}
    out["given"] = out["caption"]
    return images, [item["caption"] for item in items], out


def bundle_of(overrides: list[str]) -> tuple[ModelBundle, Callable, int]:
    """Model bundle of the negclip recipe with ``overrides``, its array preprocess, image size."""
    cfg = load_config(RECIPE, overrides)
    bundle = build_model(cfg.model)
    size = cfg.data.synthetic.image_size
    normalise = array_fast_path(bundle.preprocess_val, size)
    assert normalise is not None, "the model's preprocess is not the plain normalisation"
    return bundle, normalise, size


TINY = ["model.name=clipft-tiny-vit", "data.synthetic.image_size=32"]
SMALL = ["model.name=clipft-small-vit", "data.synthetic.image_size=64"]


# ------------------------------------------------------------------------------- probes


@torch.no_grad()
def features(bundle: ModelBundle, normalise, size: int, split: str, count: int, seed: int) -> dict[str, torch.Tensor]:
    """Frozen features of ``count`` two-object scenes: pixels, the pooled image embedding,
    the patch tokens (after ln_post, before pooling), the caption's text embedding, and the
    targets."""
    model = bundle.model.eval()
    visual = model.visual
    data = scenes(split, count, seed, size)
    out: dict[str, list] = {}
    for start in range(0, count, 250):
        images, captions, labels = batch(data, range(start, min(count, start + 250)), normalise)
        visual.output_tokens = True
        try:
            pooled, tokens = visual(images)
        finally:
            visual.output_tokens = False
        text = model.encode_text(bundle.tokenizer(captions), normalize=True)
        rows = {"pixels": images.flatten(1), "pooled": F.normalize(pooled, dim=-1), "tokens": tokens,
                "tokens_mean": tokens.mean(1), "text": text, **labels}
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


class AttentionPool(nn.Module):
    """Learned queries attend over the tokens (single head); their outputs are concatenated."""

    def __init__(self, width: int, queries: int = 8) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) / width**0.5)
        self.key = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.key(tokens) @ self.queries.T / tokens.shape[-1] ** 0.5, dim=1)  # [N, T, Q]
        return torch.einsum("ntq,ntd->nqd", weights, tokens).flatten(1)


class GivenObjects(nn.Module):
    """The caption's relation scored as a dual encoder would: one query vector per candidate
    relation, built from the relation and the caption's two objects' words (as a text tower
    could), dotted with the (image) feature. Linear in the feature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.relation = nn.Parameter(torch.randn(len(RELATIONS), dim) * 0.01)
        self.words = nn.Parameter(torch.randn(2, len(RELATIONS), ATTRIBUTE_VALUES, dim) * 0.01)

    def forward(self, x: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        first, second = objects.split(ATTRIBUTE_VALUES, dim=1)
        query = (self.relation + torch.einsum("na,rad->nrd", first, self.words[0])
                 + torch.einsum("na,rad->nrd", second, self.words[1]))
        return torch.einsum("nd,nrd->nr", x, query)


class Probe(nn.Module):
    """``linear``: flattened features; ``mlp``: + one hidden layer of 256; ``attention``
    (tokens): attention pooling + the hidden layer. Then a linear classifier, or for
    ``given`` the :class:`GivenObjects` head."""

    def __init__(self, kind: str, shape: tuple[int, ...], target: str) -> None:
        super().__init__()
        if kind == "linear":
            self.trunk, dim = nn.Flatten(), int(np.prod(shape))
        elif kind == "mlp":
            self.trunk, dim = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 256), nn.GELU()), 256
        elif kind == "attention":  # shape: (tokens, width)
            self.trunk, dim = nn.Sequential(AttentionPool(shape[-1]), nn.Linear(8 * shape[-1], 256), nn.GELU()), 256
        else:
            raise ValueError(kind)
        self.given = target == "given"
        self.head = GivenObjects(dim) if self.given else nn.Linear(dim, 2 if target == "axis" else len(RELATIONS))

    def forward(self, x: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        return self.head(x, objects) if self.given else self.head(x)


def fit_probe(kind: str, target: str, train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], feature: str,
              epochs: int = 40, seed: int = 0) -> float:
    """Train a probe (AdamW lr 1e-3, minibatches of 256, weight decay 1e-3, cosine) on
    standardised features; its held-out accuracy."""
    torch.manual_seed(seed)
    x, x_test = train[feature], test[feature]
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    y, objects = train[target], train["objects"].float()
    probe = Probe(kind, tuple(x.shape[1:]), target)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * ((len(x) + 255) // 256))
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            loss = F.cross_entropy(probe(x[idx], objects[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        return (probe(x_test, test["objects"].float()).argmax(-1) == test[target]).float().mean().item()


PROBES = [  # (row label, feature, probe kind)
    ("pixels, linear", "pixels", "linear"),
    ("patch tokens (concatenated), linear", "tokens", "linear"),
    ("patch tokens, attention-pool + MLP", "tokens", "attention"),
    ("patch tokens mean-pooled, MLP", "tokens_mean", "mlp"),
    ("pooled image embedding, linear", "pooled", "linear"),
    ("pooled image embedding, MLP", "pooled", "mlp"),
    ("caption text embedding, linear", "text", "linear"),
    ("caption text embedding, MLP", "text", "mlp"),
]


def run_probes(args: argparse.Namespace) -> str:
    starts = {"clipft-tiny-vit `synthetic`": [*TINY, "model.pretrained=synthetic"],
              "clipft-tiny-vit untrained": [*TINY, "model.pretrained=null"]}
    results: dict[str, dict[str, float]] = {}
    for start, overrides in starts.items():
        torch.manual_seed(0)  # the untrained model's initialisation
        bundle, normalise, size = bundle_of(overrides)
        t0 = time.perf_counter()
        train = features(bundle, normalise, size, "train", args.train, seed=101)
        test = features(bundle, normalise, size, "val", args.test, seed=202)
        print(f"{start}: features in {time.perf_counter() - t0:.0f} s", flush=True)
        for label, feature, kind in PROBES:
            if feature == "pixels" and start != next(iter(starts)):
                continue  # the same pixels for every model
            row = {target: fit_probe(kind, target, train, test, feature, epochs=args.epochs) for target in TARGETS}
            name = label if feature == "pixels" else f"{start}: {label}"
            results[name] = row
            print(f"  {name}: " + ", ".join(f"{t} {row[t]:.3f}" for t in TARGETS), flush=True)
    columns = [("axis (2-way, chance 0.5)", "axis"), ("caption relation (4-way)", "caption"),
               ("canonical relation (4-way, chance 0.25)", "canonical"),
               ("caption relation, objects given (4-way, chance 0.25)", "given")]
    return table(f"Probes on frozen features: {args.train} train / {args.test} held-out two-object scenes, "
                 f"{args.epochs} epochs, held-out accuracy", columns, results)


# ------------------------------------------------------------------------------- supervised


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over 5 % of the steps, then cosine to 0."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))


def run_supervised(args: argparse.Namespace) -> str:
    """The image tower + a head on its pooled embedding, trained on ``args.target``:
    ``given`` (the caption's relation, the :class:`GivenObjects` head: what a dual encoder
    needs) or ``canonical`` (a linear 4-way head: needs the objects ordered too)."""
    configs = {
        "tiny, from the `synthetic` checkpoint": ([*TINY, "model.pretrained=synthetic"], args.lr_finetune),
        "tiny, from scratch": ([*TINY, "model.pretrained=null"], args.lr_scratch),
        "small (64 px, patch 8, 4 layers, width 128), from scratch": ([*SMALL, "model.pretrained=null"], args.lr_scratch),
    }
    configs = {k: v for i, (k, v) in enumerate(configs.items()) if not args.only or str(i) in args.only.split(",")}
    results: dict[str, dict[str, float]] = {}
    for label, (overrides, lr) in configs.items():
        torch.manual_seed(0)
        bundle, normalise, size = bundle_of(overrides)
        visual = bundle.model.visual.train()
        dim = visual.output_dim
        head = GivenObjects(dim) if args.target == "given" else nn.Linear(dim, len(RELATIONS))
        optimiser = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(args.steps))

        def scores(images: torch.Tensor, objects: torch.Tensor, visual=visual, head=head) -> torch.Tensor:
            x = visual(images)
            return head(x, objects.float()) if args.target == "given" else head(x)

        train = scenes("train", args.steps * args.batch, 303, size)
        test_images, _, test_labels = batch(scenes("val", args.test, 404, size), range(args.test), normalise)
        t0 = time.perf_counter()
        row: dict[str, float] = {}
        for step in range(args.steps):
            images, _, labels = batch(train, range(step * args.batch, (step + 1) * args.batch), normalise)
            loss = F.cross_entropy(scores(images, labels["objects"]), labels[args.target])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if (step + 1) % max(1, args.steps // 4) == 0 or step + 1 == args.steps:
                visual.eval()
                with torch.no_grad():
                    logits = torch.cat([scores(x, o) for x, o in
                                        zip(test_images.split(500), test_labels["objects"].split(500))])
                visual.train()
                acc = (logits.argmax(-1) == test_labels[args.target]).float().mean().item()
                row[f"step {step + 1}"] = acc
                print(f"{label}: step {step + 1} loss {loss.item():.3f} held-out accuracy {acc:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results[f"{label}, lr {lr:g}"] = row
    checkpoints = [k for k in next(iter(results.values())) if k.startswith("step")]
    what = ("the caption's relation, objects given (dual-encoder head)" if args.target == "given"
            else "the canonical relation (linear head)")
    return table(f"Supervised 4-way relation, image tower trained with a head on its pooled embedding: {what}; "
                 f"{args.steps} steps of batch {args.batch} two-object scenes (AdamW, wd 0.05, warm-up then cosine), "
                 f"held-out accuracy on {args.test} scenes (chance 0.25)",
                 [(k, k) for k in checkpoints], results)


# ------------------------------------------------------------------------------- arms


ARM_COLUMNS = [
    ("replace_rel", "val/compositional/replace_rel"), ("swap_obj", "val/compositional/swap_obj"),
    ("swap_att", "val/compositional/swap_att"), ("replace_obj", "val/compositional/replace_obj"),
    ("replace_att", "val/compositional/replace_att"), ("add_obj", "val/compositional/add_obj"),
    ("add_att", "val/compositional/add_att"), ("R@1 (mean)", "val/retrieval/mean_r1"),
    ("shape top-1", "val/zeroshot/shape/top1"), ("novel top-1", "val/zeroshot/novel_object/top1"),
]


def run_arms(args: argparse.Namespace) -> str:
    arms: dict[str, list[str] | None] = {
        "start (no training)": None,
        "plain fine-tuning": ["method.name=finetune", "data.negatives.count=0"],
        f"NegCLIP, K={args.count}, {'+'.join(args.types)}": [
            "method.name=negclip", f"data.negatives.count={args.count}", f"data.negatives.types=[{','.join(args.types)}]"],
    }
    common = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", "run.plot=false",
              f"optim.lr={args.lr}", f"run.threads={args.threads}", *args.set]
    out = Path(args.out or tempfile.mkdtemp(prefix="relations_arms_"))
    results = {}
    for label, arm in arms.items():
        t0 = time.perf_counter()
        results[label] = run_arm(args.recipe, common, arm, out / re.sub(r"[^A-Za-z0-9]+", "_", label))
        print(f"{label}: {time.perf_counter() - t0:.0f} s: " +
              ", ".join(f"{h} {results[label][k]:.3f}" for h, k in ARM_COLUMNS if k in results[label]), flush=True)
    print(f"run folders: {out}")
    extra = f", overrides {' '.join(args.set)}" if args.set else ""
    return table(f"Plain fine-tuning vs NegCLIP with relation negatives: {Path(args.recipe).name}, {args.steps} steps, "
                 f"lr {args.lr:g}{extra}; held-out scenes", ARM_COLUMNS, results)


# ------------------------------------------------------------------------------- report


def save_section(name: str, command: str, text: str) -> None:
    """Replace (or append) this command's section of the results file."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    section = f"{start}\n`{command}`\n\n{text}\n{end}"
    old = RESULTS.read_text() if RESULTS.is_file() else "# Spatial relations on the synthetic data (benchmarks/relations.py)\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["probe", "supervised", "arms"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", type=int, default=8000, help="probe: training scenes")
    parser.add_argument("--test", type=int, default=2000, help="probe/supervised: held-out scenes")
    parser.add_argument("--epochs", type=int, default=40, help="probe: epochs")
    parser.add_argument("--steps", type=int, default=None, help="supervised (400) / arms (800): steps")
    parser.add_argument("--batch", type=int, default=128, help="supervised: batch size")
    parser.add_argument("--target", choices=["given", "canonical"], default="given", help="supervised: target")
    parser.add_argument("--only", default=None, help="supervised: comma-separated config indices (0 tiny ckpt, 1 tiny scratch, 2 small)")
    parser.add_argument("--lr-scratch", type=float, default=1e-3, help="supervised: lr from scratch")
    parser.add_argument("--lr-finetune", type=float, default=3e-4, help="supervised: lr from the checkpoint")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "negclip_relations.yaml"), help="arms: recipe")
    parser.add_argument("--lr", type=float, default=1e-3, help="arms: learning rate")
    parser.add_argument("--count", type=int, default=1, help="arms: NegCLIP negatives per pair")
    parser.add_argument("--types", nargs="+", default=["replace_rel"], help="arms: NegCLIP negative types")
    parser.add_argument("--set", nargs="*", default=[], help="arms: extra overrides for every arm")
    parser.add_argument("--out", default=None, help="arms: run folders (default: a temporary folder)")
    parser.add_argument("--section", default=None, help="results section name (default: the command)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 400 if args.command == "supervised" else 800
    run = {"probe": run_probes, "supervised": run_supervised, "arms": run_arms}[args.command]
    t0 = time.perf_counter()
    text = run(args)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    command = "python benchmarks/relations.py " + " ".join(sys.argv[1:])
    section = args.section or (f"supervised_{args.target}" if args.command == "supervised" else args.command)
    save_section(section, command, text)


if __name__ == "__main__":
    main()
