"""Does the community evaluator clip_benchmark score a ``clipft export`` the way clipft does?

    python benchmarks/clip_benchmark_check.py                   # a 150-step quickstart run first
    python benchmarks/clip_benchmark_check.py --run runs/quickstart/<time>   # an existing synthetic run
    python benchmarks/clip_benchmark_check.py --cb-path /tmp/cbdeps --steps 300

It trains the quickstart recipe briefly (or takes ``--run``), exports the run with ``clipft
export`` (open_clip's local-dir layout), writes the run's validation pairs (the same synthetic
scenes, regenerated from the run's config, as PNG at their native size) as a clip_benchmark
WebDataset retrieval set, runs clip_benchmark's CLI on the export in a subprocess, and prints
clipft's R@1/R@5 next to clip_benchmark's, in both directions (clipft ``i2t`` = clip_benchmark
``text_retrieval``, ``t2i`` = ``image_retrieval``). The table also goes to
benchmarks/results/clip_benchmark_check.md with the command and the date.

clip_benchmark is not a clipft dependency. Install it beside the project, not into it::

    pip install --target /tmp/cbdeps --no-deps clip_benchmark braceexpand webdataset scikit-learn \\
        scipy joblib threadpoolctl pycocotools pycocoevalcap narwhals cloudpickle requests \\
        urllib3 idna certifi charset_normalizer

(it imports ``requests`` without declaring it). The script runs it as
``PYTHONPATH=<--cb-path> python -m clip_benchmark.cli eval --task zeroshot_retrieval --no_amp ...``;
``--no_amp`` because on a CPU clip_benchmark's autocast would encode in bfloat16, clipft's
validation in the run's precision (fp32 in the quickstart).

Where the two conventions differ, and how the comparison is made like for like:

* Same caption string on several images (templated captions: 1000 synthetic val scenes have
  about 650 distinct captions, since one-object scenes draw from 60 phrases). clipft
  (:func:`clipft.eval.metrics.relevance_from_pairs`) makes each distinct string one text,
  relevant to every image it describes: t2i has one query per distinct string, and an image
  ranks its caption once. clip_benchmark keeps one text per (image, caption) and counts only
  the image it came with as relevant: a shared caption is several identical gallery texts of
  which one is right for i2t (ties broken by ``torch.topk``), and several t2i queries each with
  one right image among images it equally describes. The two do not measure the same thing
  here, so the comparison that must agree is on the **val images whose captions no other val
  image has**: there both build the same relevance (each caption one text, one image) and
  clipft's number is its own ``validate`` of the run's checkpoint on exactly those PNG files
  (a csv table). The full val set is shown as well, clipft's report.json against
  clip_benchmark; that its gap is the convention and not the export is shown by scoring the
  export's own features (plain open_clip on the PNG files) with clipft's metric functions,
  which gives report.json's numbers.
* Ties: clipft ranks a relevant item behind every non-relevant one that scores the same
  (pessimistic); clip_benchmark lets ``torch.topk`` order them. Distinct images and distinct
  captions practically never tie exactly, so this matters only for the duplicates above.
* Several captions per image: both count an image query as a hit when any of its captions is
  in the top K; captions are grouped per image id as clipft does, repeats of one caption on
  one image written once (clipft would count them once).

Also checked and printed: clip_benchmark's transform (the export's preprocess_cfg, read by
open_clip) on the PNG files against clipft's validation transform on the arrays (the max
absolute difference of the preprocessed pixels), and clipft ``validate`` on the PNG copy of the
full val set against the run's report.json (PNG round trip and the csv path change nothing).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clipft.methods  # noqa: E402,F401  (every method registers its settings)
from clipft.config import RunConfig, load_config  # noqa: E402

# table label -> (clipft metric, clip_benchmark metric)
METRICS = {
    "image→text R@1": ("i2t_r1", "text_retrieval_recall@1"),
    "image→text R@5": ("i2t_r5", "text_retrieval_recall@5"),
    "text→image R@1": ("t2i_r1", "image_retrieval_recall@1"),
    "text→image R@5": ("t2i_r5", "image_retrieval_recall@5"),
}
RECALL_K = (1, 5, 10)  # the quickstart's eval.retrieval.ks; K must not exceed the number of images
QUIET = ["trainer.enable_progress_bar=false", "run.plot=false"]
INSTALL = ("pip install --target {path} --no-deps clip_benchmark braceexpand webdataset scikit-learn scipy joblib "
           "threadpoolctl pycocotools pycocoevalcap narwhals cloudpickle requests urllib3 idna certifi charset_normalizer")


@dataclass
class ImageCaptions:
    """One validation image (its clipft id and pixels) with its distinct captions, in order."""

    image_id: str
    image: np.ndarray  # uint8 HxWx3
    captions: list[str]


# ------------------------------------------------------------------ clipft side


def train(recipe: Path, steps: int, out: Path) -> Path:
    """A short run of ``recipe`` validated at its last step; returns its run folder."""
    from clipft.runner import fit

    overrides = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"run.out_dir={out}", *QUIET]
    return Path(fit(load_config(str(recipe), overrides))["run_dir"])


def run_config(run: Path) -> RunConfig:
    cfg = load_config(str(run / "config.yaml"))
    if cfg.data.source != "synthetic":
        raise SystemExit(f"{run}: data.source={cfg.data.source}; this check regenerates synthetic validation scenes")
    return cfg


def validation_images(cfg: RunConfig) -> list[ImageCaptions]:
    """The validation pairs exactly as the run's data module serves them, grouped per image id."""
    from clipft.data.datamodule import ImageTextDataModule

    def identity(x: Any) -> Any:
        return x

    data = ImageTextDataModule(cfg.data, identity, identity, identity, seed=cfg.run.seed)
    data.prepare_sources()
    fetch = data.val_fetch
    assert fetch is not None
    grouped: dict[str, ImageCaptions] = {}
    for index in range(len(fetch)):  # type: ignore[arg-type]
        image, caption, image_id = fetch(index)
        item = grouped.setdefault(image_id, ImageCaptions(image_id, np.asarray(image), []))
        if caption not in item.captions:
            item.captions.append(caption)
    return list(grouped.values())


def with_unique_captions(images: list[ImageCaptions]) -> list[ImageCaptions]:
    """The images none of whose captions describes another image: there every caption has one
    relevant image, so clipft's and clip_benchmark's relevance are the same."""
    owners: dict[str, set[str]] = {}
    for item in images:
        for caption in item.captions:
            owners.setdefault(caption, set()).add(item.image_id)
    return [item for item in images if all(len(owners[c]) == 1 for c in item.captions)]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(images: list[ImageCaptions], folder: Path) -> dict[str, Path]:
    """Each image once as ``<n>.png``; returns image id -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for n, item in enumerate(images):
        files[item.image_id] = folder / f"{n:06d}.png"
        files[item.image_id].write_bytes(png_bytes(item.image))
    return files


def write_table(images: list[ImageCaptions], files: dict[str, Path], path: Path) -> Path:
    """A clipft csv table (``filepath``, ``title``) with one row per (image, caption) pair."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for item in images:
            writer.writerows([os.path.relpath(files[item.image_id], path.parent), c] for c in item.captions)
    return path


def clipft_validate(run: Path, table: Path, out: Path) -> dict[str, float]:
    """clipft's own evaluation (``clipft validate`` of the run's last checkpoint) of the pairs
    in ``table``: retrieval only; ``val/retrieval/`` is stripped from the keys."""
    from clipft.runner import validate

    overrides = [
        "data.source=csv", f"data.train={table}", f"data.val={table}", "data.image_key=filepath",
        "data.caption_key=title", "data.num_workers=0", "eval.zeroshot=[]", "eval.compositional.source=null",
        "eval.gap=false", f"eval.retrieval.ks=[{','.join(map(str, RECALL_K))}]", f"run.out_dir={out}", *QUIET,
    ]
    report = validate(load_config(str(run / "config.yaml"), overrides), str(run / "checkpoints" / "last.ckpt"))
    return retrieval_metrics(report["metrics"])


def retrieval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    prefix = "val/retrieval/"
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def load_export(export_dir: Path) -> tuple[Any, Any, Any]:
    """(model, preprocess, tokenizer) of the export, by plain open_clip as clip_benchmark loads it."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{export_dir}")


def preprocess_difference(cfg: RunConfig, export_preprocess: Any, images: list[ImageCaptions]) -> float:
    """Max |clipft's validation transform of the arrays − the export's transform of the PNG
    files| over ``images`` (what clip_benchmark feeds the model against what clipft does)."""
    from clipft.data.transforms import array_transform
    from clipft.models import build_model

    clipft_transform = array_transform(build_model(cfg.model).preprocess_val, cfg.data.synthetic.image_size)
    worst = 0.0
    for item in images:
        png = Image.open(io.BytesIO(png_bytes(item.image)))
        worst = max(worst, (clipft_transform(item.image) - export_preprocess(png)).abs().max().item())
    return worst


def export_recall_clipft_convention(export: tuple[Any, Any, Any], images: list[ImageCaptions], batch: int = 256) -> dict[str, float]:
    """clipft's retrieval metrics (:mod:`clipft.eval.metrics`) on the export's features, encoded by
    plain open_clip from the PNG files: the export scored under clipft's convention."""
    import torch
    import torch.nn.functional as F

    from clipft.eval.metrics import relevance_from_pairs, retrieval_recall

    model, preprocess, tokenizer = export
    rows = [(item.image_id, caption) for item in images for caption in item.captions]
    relevance, _, text_rows = relevance_from_pairs([i for i, _ in rows], [c for _, c in rows])
    texts = [rows[r][1] for r in text_rows]
    pngs = [Image.open(io.BytesIO(png_bytes(item.image))) for item in images]

    def encode(encoder: Any, inputs: list[Any], prepare: Any) -> torch.Tensor:
        with torch.no_grad():
            parts = [encoder(prepare(inputs[s:s + batch])) for s in range(0, len(inputs), batch)]
        return F.normalize(torch.cat(parts).float(), dim=-1)

    # relevance's rows are the images in first-occurrence order, i.e. ``images``' order
    image_features = encode(model.encode_image, pngs, lambda b: torch.stack([preprocess(p) for p in b]))
    text_features = encode(model.encode_text, texts, tokenizer)
    return retrieval_recall(image_features, text_features, relevance, RECALL_K)


# ------------------------------------------------------------------ clip_benchmark side


def clip_benchmark_env(cb_path: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(cb_path), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def clip_benchmark_version(cb_path: Path) -> str | None:
    """clip_benchmark's version when its CLI imports with ``cb_path`` on the path, else None."""
    code = "import clip_benchmark.cli, importlib.metadata as m; print(m.version('clip_benchmark'))"
    done = subprocess.run([sys.executable, "-c", code], env=clip_benchmark_env(cb_path), capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def write_wds(images: list[ImageCaptions], root: Path) -> Path:
    """clip_benchmark's offline WebDataset retrieval layout: ``root/dataset_type.txt``
    (``retrieval``), ``root/test/nshards.txt`` and ``root/test/0.tar`` holding ``<key>.png``
    and ``<key>.txt`` (the image's captions, one a line) per image."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for n, item in enumerate(images):
            for suffix, payload in (("png", png_bytes(item.image)), ("txt", "\n".join(item.captions).encode())):
                info = tarfile.TarInfo(f"{n:06d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return root


def clip_benchmark_retrieval(export_dir: Path, data: Path, names: list[str], cb_path: Path, out: Path) -> dict[str, dict]:
    """Run clip_benchmark's CLI on ``data/<name>`` for each name; returns name -> its metrics."""
    command = [
        sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", f"local-dir:{export_dir}",
        "--dataset", *[f"wds/{n}" for n in names], "--dataset_root", f"{data}/{{dataset}}",
        "--task", "zeroshot_retrieval", "--recall_k", *map(str, RECALL_K), "--no_amp", "--num_workers", "0",
        "--output", f"{out}/{{dataset}}.json",
    ]
    print("$", shlex.join(command), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, env=clip_benchmark_env(cb_path), check=True)
    return {n: json.loads((out / f"{n}.json").read_text())["metrics"] for n in names}


# ------------------------------------------------------------------ report


def table(title: str, clipft: dict[str, float], bench: dict[str, float]) -> tuple[str, float]:
    """A markdown table of the four recalls and the largest |difference|."""
    lines = [f"#### {title}", "", "| metric | clipft | clip_benchmark | difference |", "|---|---|---|---|"]
    worst = 0.0
    for label, (ours, theirs) in METRICS.items():
        diff = bench[theirs] - clipft[ours]
        worst = max(worst, abs(diff))
        lines.append(f"| {label} | {clipft[ours]:.4f} | {bench[theirs]:.4f} | {diff:+.4f} |")
    return "\n".join(lines), worst


def render(
    version: str, run: Path, run_report: dict[str, Any], sets: dict[str, list[ImageCaptions]],
    bench: dict[str, dict], unique: dict[str, float], report: dict[str, float], png_all: dict[str, float],
    export_all: dict[str, float], pixels: float,
) -> str:
    """The result: the like-for-like table, the full-set table with why it differs, the checks."""
    n_images = {name: len(s) for name, s in sets.items()}
    n_captions = {name: sum(len(i.captions) for i in s) for name, s in sets.items()}
    same, worst = table(
        f"val images whose captions no other val image has ({n_images['unique']} images, "
        f"{n_captions['unique']} captions): the same retrieval problem for both", unique, bench["unique"],
    )
    full, _ = table(
        f"all val pairs ({n_images['all']} images, {n_captions['all']} captions, {int(report['n_texts'])} distinct): "
        "clipft's report.json; the conventions differ", report, bench["all"],
    )

    def gap(metrics: dict[str, float]) -> float:
        return max(abs(metrics[k] - report[k]) for k, _ in METRICS.values())

    shared = n_images["all"] - n_images["unique"]
    return "\n".join([
        f"### clip_benchmark {version} on `clipft export` of {run} (step {run_report.get('global_step')})", "",
        same, "", f"Largest |difference|: {worst:.2e}.", "", full, "",
        (f"On the full set {shared} images share their caption with another image. clipft makes each distinct "
         "caption one text relevant to every image it describes (t2i: one query per distinct caption); "
         "clip_benchmark keeps one text per pair with only its own image relevant, so the identical captions "
         "of other images compete as wrong answers (exact ties, ordered by torch.topk). The export's own "
         "features (plain open_clip, PNG files) scored with clipft's metric functions give report.json's "
         f"numbers (largest |difference| {gap(export_all):.2e}): the gap is the convention, not the export."), "",
        (f"Checks: clipft validate on the PNG copy of all pairs against report.json, largest |difference| "
         f"{gap(png_all):.2e}; preprocessed pixels, clipft's val transform (arrays) against the export's open_clip "
         f"transform (PNG), all {n_images['all']} images, largest |difference| {pixels:.2e}."),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="an existing run folder on synthetic data (default: train one)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=150, help="training steps when no --run is given")
    parser.add_argument("--cb-path", type=Path, default=Path("/tmp/cbdeps"), help="where clip_benchmark is installed")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary folder)")
    parser.add_argument("--save", type=lambda v: Path(v) if v else None,
                        default=ROOT / "benchmarks" / "results" / "clip_benchmark_check.md", help="'' to not save")
    args = parser.parse_args()
    version = clip_benchmark_version(args.cb_path)
    if version is None:
        print(f"clip_benchmark does not import from {args.cb_path}; install it there (not into the project):\n"
              f"  {INSTALL.format(path=args.cb_path)}\nthen rerun with --cb-path {args.cb_path}. Nothing checked.")
        return
    start = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="clip_benchmark_check_"))
    run = args.run or train(args.recipe, args.steps, out / "runs")
    cfg = run_config(run)

    from clipft.export import export

    export_dir = export(run, out / "export")[0]
    images = validation_images(cfg)
    sets = {"all": images, "unique": with_unique_captions(images)}
    files = write_pngs(images, out / "png")
    for name, subset in sets.items():
        write_wds(subset, out / "wds" / name)
        write_table(subset, files, out / "tables" / f"{name}.csv")
    bench = clip_benchmark_retrieval(export_dir, out / "wds", list(sets), args.cb_path, out / "clip_benchmark")
    run_report = json.loads((run / "report.json").read_text())
    report = retrieval_metrics(run_report["metrics"])
    png_all = clipft_validate(run, out / "tables" / "all.csv", out / "validate")
    unique = clipft_validate(run, out / "tables" / "unique.csv", out / "validate")
    export_model = load_export(export_dir)
    pixels = preprocess_difference(cfg, export_model[1], images)
    export_all = export_recall_clipft_convention(export_model, images)

    text = render(version, run, run_report, sets, bench, unique, report, png_all, export_all, pixels)
    print(text)
    print(f"\n{time.perf_counter() - start:.0f} s; working folder: {out}")
    if args.save:
        python = Path(sys.executable)
        python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
        command = shlex.join([str(python), *sys.argv])
        stamp = datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(f"`{command}` ({stamp}, {time.perf_counter() - start:.0f} s)\n\n{text}\n")


if __name__ == "__main__":
    main()
