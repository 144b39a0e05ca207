"""``clipft``: fit | validate | info | export | wise-ft | data | recipes — recipes in, run folders out.

Examples:
  clipft fit quickstart                      (a shipped recipe by name; `clipft recipes` lists them)
  clipft fit recipes/quickstart.yaml
  clipft fit recipes/quickstart.yaml optim.lr=5e-4 trainer.max_steps=200
  clipft fit recipes/quickstart.yaml run.resume=last
  clipft fit recipes/mmrl_vitb16_imagenet.yaml --smoke
  clipft info recipes/finetune.yaml model.name=ViT-B-32
  clipft validate recipes/quickstart.yaml ckpt=runs/quickstart/<time>/checkpoints/best.ckpt
  clipft export runs/quickstart/<time> --out exported/quickstart
  clipft wise-ft runs/finetune_noto/<time> --alphas 0 0.25 0.5 0.75 1
  clipft data write-shards data/train.csv shards/train --shard-size 1000
  clipft recipes finetune --copy my_recipes  (a shipped recipe and its includes, to edit)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

OVERRIDES_HELP = "config overrides as key=value (for example optim.lr=1e-4 data.batch_size=64)"
RECIPE_HELP = ("recipe YAML file, or the name of a shipped recipe (quickstart, finetune, ...: `clipft recipes`); "
               "a file wins over a name")
TRUST_HELP = ("load a checkpoint that needs classes beyond clipft's allowlist, or a TorchScript archive, with "
              "weights_only=False: it can run code from the file (same as run.trust_checkpoint=true; docs/safety.md)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipft",
        description="Adapt CLIP-like (open_clip) models after pre-training, with PyTorch Lightning.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    fit = verbs.add_parser(
        "fit",
        help="train a model with a recipe",
        description="Train with RECIPE. Leaves runs/<run.name>/<time>/ holding config.yaml, "
        "checkpoints/{last,best}.ckpt, metrics.csv, report.json and curves.png. "
        "Resume an interrupted run with run.resume=last.",
    )
    fit.add_argument("recipe", help=RECIPE_HELP)
    fit.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    fit.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    fit.add_argument(
        "--smoke", action="store_true",
        help="smoke-test the recipe at its real size on a CPU: random weights, synthetic data at the model's "
        "image size, 2 steps of 4 pairs, one process, a temporary run.out_dir; method, teacher/EMA, negatives, "
        "LoRA and class data as the recipe's (docs/gpu.md). Overrides still apply and win.",
    )

    val = verbs.add_parser(
        "validate",
        help="evaluate a model with a recipe's evaluation, without training",
        description="Run the recipe's whole evaluation (loss, retrieval, zero-shot, compositional, modality "
        "gap) on a clipft checkpoint (ckpt=PATH or --ckpt PATH), or on the recipe's starting model "
        "(model.name + model.pretrained) when none is given. Writes report.json, report.md and gap.png "
        "in a new run folder: compare before and after training.",
    )
    val.add_argument("recipe", help=RECIPE_HELP)
    val.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    val.add_argument("--ckpt", help="a clipft checkpoint (.ckpt file or DeepSpeed folder) to evaluate (also as ckpt=PATH)")
    val.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)

    info = verbs.add_parser(
        "info",
        help="print the resolved config and the parameter counts",
        description="Print the resolved config (recipe + includes + overrides) and the total and trainable "
        "parameter counts per tower, without loading data or training.",
    )
    info.add_argument("recipe", nargs="?", help="recipe YAML (not needed with --methods)")
    info.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    info.add_argument("--methods", action="store_true",
                      help="list every method: what it does, its paper, its loss terms and its settings with defaults")
    info.add_argument("--gpu-memory", metavar="SIZE",
                      help="warn when the memory estimate exceeds SIZE (80GB, 141GiB) and say what would fit")
    info.add_argument(
        "--launcher", choices=["slurm", "torchrun"],
        help="print instead a SLURM script or torchrun command for this recipe (docs/multinode.md)",
    )
    export = verbs.add_parser(
        "export",
        help="write a run's model as open_clip (or transformers CLIP) weights",
        description="Write the model of a run folder, .ckpt file or DeepSpeed checkpoint folder as open_clip's "
        "local-dir layout (open_clip_config.json + open_clip_model.safetensors + README.md model card), so "
        "open_clip.create_model_and_transforms('local-dir:OUT') loads it without clipft, or with --format "
        "transformers as Hugging Face transformers' CLIPModel (config.json, model.safetensors, tokenizer and "
        "image processor files). Teachers, optimizer and method state are left out.",
    )
    export.add_argument("source", help="run folder (its checkpoints/last.ckpt), .ckpt file or DeepSpeed folder")
    export.add_argument("--out", required=True, help="folder to write (new or empty; see --force)")
    export.add_argument("--force", action="store_true", help="replace --out if it holds files (it is swapped in whole at the end)")
    export.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (required for a LoRA run)")
    export.add_argument("--wise-ft", type=float, nargs="+", metavar="ALPHA",
                        help="WiSE-FT: θ = (1-α)·start + α·adapted; several α write OUT/wise_ft_<α>/ side by side")
    export.add_argument("--ema", action="store_true", help="the EMA weights (method.ema_momentum) instead of the live ones")
    export.add_argument(
        "--format", default="local-dir",
        choices=["local-dir", "state-dict", "safetensors", "transformers", "transformers-text", "transformers-vision"],
        help="local-dir: open_clip's folder (default); state-dict / safetensors: the weights file alone; "
        "transformers: a folder Hugging Face transformers' CLIPModel and CLIPProcessor load (offline); "
        "transformers-text / transformers-vision: one tower, as CLIPTextModelWithProjection (diffusers) / "
        "CLIPVisionModelWithProjection (LLaVA-style) with its tokenizer / image processor",
    )
    export.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)

    wise = verbs.add_parser(
        "wise-ft",
        help="evaluate WiSE-FT interpolations of a run on its evaluation sets",
        description="Evaluate θ_α = (1-α)·start + α·fine-tuned for each α on every set of the run's eval.sets, "
        "and write wise_ft.json, wise_ft.md (the table, the best α by the mean over the sets) and wise_ft.png "
        "(in-domain vs shifted) into the run folder. Only for runs that started from pre-trained weights.",
    )
    wise.add_argument("run", help="the run folder (its checkpoints/last.ckpt)")
    wise.add_argument("--alphas", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1], metavar="ALPHA",
                      help="interpolation weights in [0, 1] (default: 0 0.25 0.5 0.75 1)")
    wise.add_argument("--metric", help="the metric compared (default: the first zero-shot task's top1, e.g. zeroshot/group/top1)")
    wise.add_argument("--force", action="store_true", help="replace the wise_ft.* files of an earlier sweep")
    wise.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)

    recipes = verbs.add_parser(
        "recipes",
        help="list the shipped recipes, or copy one to edit",
        description="Without NAME: list the recipes that ship with clipft, each with its one-line description and "
        "what it needs beyond the package (a data table, downloaded weights, the MiniLM text encoder). With NAME: "
        "print that recipe, or with --copy DIR write it and every file it includes under DIR (its includes then "
        "resolve inside DIR).",
    )
    recipes.add_argument("name", nargs="?", help="a shipped recipe's name")
    recipes.add_argument("--copy", metavar="DIR", help="write the recipe and what it includes under DIR")
    recipes.add_argument("--force", action="store_true", help="with --copy: overwrite files that exist")

    data = verbs.add_parser("data", help="data tools (write-shards)", description="Data tools.")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="TOOL", required=True)
    shards = data_verbs.add_parser(
        "write-shards",
        help="convert a source to WebDataset tar shards with sizes.json",
        description="Write SOURCE (a .csv/.tsv/.jsonl table, an image folder with one sub-folder per class, or "
        "'synthetic') as WebDataset shards OUT_DIR/shard-NNNNNN.tar (<key>.jpg|png|..., <key>.txt, <key>.json) "
        "plus OUT_DIR/sizes.json, for data.source=webdataset. Run it again after an interruption: finished "
        "shards are kept and the rest written.",
    )
    shards.add_argument("source", help="table file, image folder, or 'synthetic'")
    shards.add_argument("out_dir", help="folder to write the shards to")
    shards.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    shards.add_argument("--resize", type=int, metavar="PX", help="resize each image so its shorter side is PX (re-encoded)")
    shards.add_argument("--image-format", choices=["jpg", "png"], default="jpg",
                        help="format of re-encoded images (resized or synthetic); files are otherwise copied as they are")
    shards.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    shards.add_argument("--image-key", default="filepath", help="table column of the image paths")
    shards.add_argument("--caption-key", default="title", help="table column of the captions")
    shards.add_argument("--separator", help="table separator (default: from the extension)")
    shards.add_argument("--on-bad-sample", choices=["error", "skip"], default="error", help="bad table rows")
    shards.add_argument("--size", type=int, default=10_000, help="synthetic: number of samples")
    shards.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    shards.add_argument("--split", default="train", choices=["train", "val", "novel"], help="synthetic: split")
    shards.add_argument("--image-size", type=int, default=32, help="synthetic: image side in pixels")
    shards.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _recipes(args: argparse.Namespace) -> int:
    import clipft.methods  # noqa: F401  (the recipes' method settings are registered before they are composed)
    from clipft.config import ConfigError, find_recipe
    from clipft.recipe_book import copy_recipe, render

    try:
        if args.name is None:
            if args.copy:
                raise ConfigError("--copy: name the recipe to copy (clipft recipes NAME --copy DIR)")
            print(render())
        elif args.copy:
            for path in copy_recipe(args.name, args.copy, force=args.force):
                print(f"wrote {path}")
        else:
            path = find_recipe(args.name)
            if not path.is_file():
                raise ConfigError(f"recipe '{args.name}' not found; `clipft recipes` lists the shipped ones")
            print(f"# {path}\n{path.read_text()}", end="")
    except ConfigError as err:
        print(f"clipft: error: {err}", file=sys.stderr)
        return 2
    return 0


def _data(args: argparse.Namespace) -> int:
    from clipft.data.shard_writer import open_source, write_shards
    from clipft.data.table import DataError

    try:
        source = open_source(
            args.source, args.image_key, args.caption_key, args.separator, args.on_bad_sample,
            synthetic_size=args.size, synthetic_seed=args.seed, synthetic_split=args.split,
            synthetic_image_size=args.image_size,
        )
        sizes = write_shards(source, args.out_dir, args.shard_size, args.resize, args.image_format, args.quality,
                             progress=not args.no_progress)
    except (DataError, ValueError) as err:
        print(f"clipft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(sizes)} shards, {sum(sizes.values())} samples: {args.out_dir}/sizes.json")
    return 0


def _export(args: argparse.Namespace) -> int:
    from clipft.export import ExportError, export
    from clipft.models import ModelError
    from clipft.models.checkpoint_io import trusting

    try:
        with trusting(args.trust_checkpoint):
            folders = export(args.source, args.out, merge_lora=args.merge_lora, wise_ft_alphas=args.wise_ft,
                             ema=args.ema, fmt=args.format, force=args.force)
    except (ExportError, ModelError) as err:
        print(f"clipft: error: {err}", file=sys.stderr)
        return 2
    for folder in folders:
        print(f"wrote {folder}")
    return 0


def _wise_ft(args: argparse.Namespace) -> int:
    import clipft.methods  # noqa: F401  (every method registers its settings: the run's config names one)
    from clipft.config import ConfigError
    from clipft.data.table import DataError
    from clipft.models import ModelError
    from clipft.models.checkpoint_io import trusting
    from clipft.wise_ft import WiseFtError, main_json, sweep

    try:
        with trusting(args.trust_checkpoint):
            result = sweep(args.run, args.alphas, metric=args.metric, force=args.force)
    except (WiseFtError, ConfigError, DataError, ModelError) as err:
        print(f"clipft: error: {err}", file=sys.stderr)
        return 2
    for row in result["rows"]:
        print(f"alpha {row['alpha']:g}: mean {result['metric']} {row['mean']:.4f}")
    print(f"best alpha by the mean: {result['best_alpha']:g}; wrote wise_ft.md, wise_ft.json, wise_ft.png in {args.run}")
    print(main_json(result))
    return 0


def _prepare_environment(recipe: str, overrides: list[str]) -> None:
    """Settings that must be in the environment before torch starts its thread pools."""
    from clipft.config import peek

    policy = peek(recipe, overrides, "run.omp_wait_policy", "PASSIVE")
    os.environ.setdefault("OMP_WAIT_POLICY", str(policy))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb in ("export", "data", "recipes", "wise-ft"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {"export": _export, "data": _data, "recipes": _recipes, "wise-ft": _wise_ft}[args.verb](args)
    if args.verb == "info" and args.methods:
        import clipft.methods  # noqa: F401  (every method registers itself)
        from clipft.methods.catalog import render

        print(render(), end="")
        return 0
    if args.verb == "info" and args.recipe is None:
        parser.error("info: give a recipe (or --methods)")
    # overrides may also follow an option (clipft validate R --ckpt C key=value)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    if getattr(args, "trust_checkpoint", False):  # fit/validate --trust-checkpoint
        args.overrides.append("run.trust_checkpoint=true")
    if args.verb == "validate":  # `ckpt=PATH` is the same as --ckpt PATH
        for item in [o for o in args.overrides if o.startswith("ckpt=")]:
            args.overrides.remove(item)
            args.ckpt = item.split("=", 1)[1]
    _prepare_environment(args.recipe, list(args.overrides))

    import clipft.methods  # noqa: F401  (every method registers its settings before a recipe is composed)
    from clipft.cluster import LostProcess
    from clipft.config import ConfigError, load_config, to_yaml
    from clipft.data.table import DataError
    from clipft.eval.callbacks import NonFiniteFeatures
    from clipft.methods.guard import DivergenceError
    from clipft.models import ModelError

    try:
        if args.verb == "fit" and args.smoke:
            from clipft.smoke import describe, smoke_config

            recipe_cfg, cfg = smoke_config(args.recipe, list(args.overrides))
            print("\n".join(describe(recipe_cfg, cfg)), flush=True)
        else:  # info reads no data: a recipe's data files need not exist yet
            cfg = load_config(args.recipe, list(args.overrides), check_data=args.verb != "info")
        from clipft import runner

        if args.verb == "info" and args.launcher:
            from clipft.launch import launch_command

            print(launch_command(cfg, args.recipe, list(args.overrides), args.launcher))
            return 0
        if args.verb == "info":
            from clipft.memory import parse_size

            budget = parse_size(args.gpu_memory) if args.gpu_memory else None
            result = runner.info(cfg, budget)
            print(to_yaml(cfg), end="")
            print("parameters:")
            for part, counts in result["parameters"].items():
                print(f"  {part:6s} total {counts['total']:>13,}  trainable {counts['trainable']:>13,}")
            print("\n".join(result["memory"]))
            return 0
        if args.verb == "fit":
            report = runner.fit(cfg)
        else:
            report = runner.validate(cfg, args.ckpt)
    except (ConfigError, DataError, ModelError, DivergenceError, NonFiniteFeatures, FileNotFoundError, LostProcess) as err:
        print(f"clipft: error: {err}", file=sys.stderr)
        return 2
    _print_report(report)
    return 0


def _print_report(report: dict) -> None:
    metrics = report.get("metrics", {})
    print(f"\nrun folder: {report.get('run_dir')}")
    if report.get("preempted"):
        stop = report["preempted"]
        print(f"stopped by {stop['signal']} at step {stop['step']} (checkpoint saved): continue with run.resume=last")
    for key in ("steps", "train_time_s", "steps_per_s", "best_checkpoint", "last_checkpoint"):
        if report.get(key) is not None:
            print(f"{key}: {report[key]}")
    shown = {k: v for k, v in metrics.items() if not k.endswith(("n_images", "n_texts", "n_pairs"))}
    if shown:
        width = max(map(len, shown))
        print("final validation:")
        for key, value in shown.items():
            print(f"  {key:{width}s}  {value:.4f}")
    print(json.dumps({"report": os.path.join(str(report.get("run_dir")), "report.json")}))


if __name__ == "__main__":
    sys.exit(main())
