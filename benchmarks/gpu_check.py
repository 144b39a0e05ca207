"""One check of a GPU machine: tests, throughput against open_clip and MFU, the paper recipes'
memory against ``clipft info``'s estimate. Run through ``benchmarks/gpu_check.sh`` (which
installs clipft and carried wheels first); about 7 minutes on one GPU.

Stages, each a row or a table of ``benchmarks/results/gpu_check_<gpu>.md``:

1. ``pytest -m gpu`` (tests/test_gpu.py).
2. Synthetic 224 px WebDataset shards (``clipft data write-shards synthetic``).
3. Training throughput of ViT-B/32 (random weights, bf16, batch 256) on those shards: clipft
   (``clipft fit``, the median step from report.json, data loading included) and open_clip's
   own training script (``python -m open_clip_train.main``, its logged samples/s; skipped when
   open_clip_train is not importable), and a compute-bound row: open_clip's model and loss
   on batches made on the GPU (no data loading): the ceiling for both.
4. MFU = samples/s × training FLOPs per sample / the GPU's dense bf16 peak (:data:`PEAK_TFLOPS`
   by device name, or ``GPU_PEAK_TFLOPS``). Training FLOPs = 3 × forward FLOPs (the backward
   costs two forwards: the "6 × parameters × tokens" rule), forward FLOPs of each transformer
   tower = per layer 2·P·s (P = 4h² + 2rh² weights of attention and MLP, s tokens) + 2·2·s²·h
   (attention scores and their weighted sum), plus the patch embedding and the projections
   (:func:`forward_flops`). ViT-B/32 at 224 px with 77 text tokens: 14.8 GFLOPs a forward.
5. Each paper recipe (recipes/*_vit*.yaml) for 20 steps at its real size and batch on one GPU
   (``clipft fit RECIPE --smoke trainer.accelerator=gpu trainer.max_steps=20 data.batch_size=B``,
   precision as the recipe): step time and peak ``torch.cuda.max_memory_allocated`` against
   ``clipft.memory.estimate``.

``--cpu-smoke`` runs every stage on the CPU at the smallest sizes (the tiny model, 2 steps,
tiny shards; no pytest -m gpu, no MFU peak) so that this script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOPS) from the vendors' data sheets, by a name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Sizes:
    """What each stage runs: the real sizes on a GPU, the smallest on a CPU (``--cpu-smoke``)."""

    model: str
    image_size: int
    batch: int
    steps: int  # measured steps of a throughput row (after 3 of warm-up for the compute-bound row)
    recipe_steps: int
    samples: int  # training shards
    workers: int
    accelerator: str
    precision: str

    @classmethod
    def for_mode(cls, cpu_smoke: bool) -> "Sizes":
        if cpu_smoke:
            return cls("clipft-tiny-vit", 32, 8, 3, 2, 64, 0, "cpu", "fp32")
        return cls("ViT-B-32", 224, 256, 40, 20, 256 * 50, 8, "gpu", "amp_bf16")


# ------------------------------------------------------------------ FLOPs and MFU


def _tower_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    weights = 4 * width**2 + 2 * mlp_ratio * width**2  # q, k, v, out + the two MLP matrices
    return layers * (2 * weights * tokens + 2 * 2 * tokens**2 * width)


def forward_flops(model_name: str) -> float:
    """Forward FLOPs of one image and one caption through an open_clip ViT model (module docstring)."""
    import open_clip

    import clipft.models  # noqa: F401  (clipft's shipped configs)

    config = open_clip.get_model_config(model_name)
    vision, text, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    size = vision["image_size"]
    patches = (size // vision["patch_size"]) ** 2
    image = _tower_flops(patches + 1, vision["width"], vision["layers"], vision.get("mlp_ratio", 4.0))
    image += 2 * 3 * vision["patch_size"] ** 2 * vision["width"] * patches + 2 * vision["width"] * embed
    context = text.get("context_length", 77)
    caption = _tower_flops(context, text["width"], text["layers"], text.get("mlp_ratio", 4.0))
    return image + caption + 2 * text["width"] * embed


def peak_tflops(device_name: str) -> Optional[float]:
    """The device's dense bf16 peak: ``GPU_PEAK_TFLOPS`` if set, else by name; None if unknown."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in device_name), None)


def mfu(samples_per_s: Optional[float], model_name: str, peak: Optional[float]) -> str:
    if not samples_per_s or not peak:
        return "n/a"
    return f"{100 * samples_per_s * 3 * forward_flops(model_name) / (peak * 1e12):.1f} %"


# ------------------------------------------------------------------ stages


def _run(command: list[str], log: Path, timeout: float, cwd: Path = ROOT) -> tuple[int, str]:
    """Run a child process (stdout and stderr to ``log``); its exit code and output."""
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, log.read_text()


def _clipft(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipft", *args]


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or ["no output"])[-1][:160].replace("|", "/")


def pytest_gpu(work: Path) -> str:
    code, out = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                     work / "pytest.log", 300)
    return f"{'ok' if code == 0 else f'exit {code}'}: {_tail(out)}"


def write_shards(work: Path, sizes: Sizes) -> tuple[Path, Path]:
    """Training and validation shards of synthetic scenes at the model's image size."""
    folders = []
    for split, count in (("train", sizes.samples), ("val", 2 * sizes.batch)):
        folder = work / f"shards_{split}"
        code, out = _run(_clipft("data", "write-shards", "synthetic", str(folder), "--size", str(count),
                                 "--image-size", str(sizes.image_size), "--split", split, "--no-progress"),
                         work / f"shards_{split}.log", 600)
        if code != 0:
            raise RuntimeError(f"write-shards: {_tail(out)}")
        folders.append(folder)
    return folders[0], folders[1]


def clipft_throughput(work: Path, sizes: Sizes, train: Path, val: Path) -> dict:
    out_dir = work / "runs_throughput"
    code, out = _run(_clipft(
        "fit", str(ROOT / "recipes" / "finetune.yaml"), f"model.name={sizes.model}", "model.pretrained=null",
        "data.source=webdataset", f"data.train={train}", f"data.val={val}", f"data.batch_size={sizes.batch}",
        f"data.num_workers={sizes.workers}", f"trainer.accelerator={sizes.accelerator}", "trainer.devices=1",
        f"trainer.precision={sizes.precision}", f"trainer.max_steps={sizes.steps}", "trainer.max_epochs=null",
        "optim.warmup_steps=0", "eval.retrieval.enabled=false", "eval.gap=false", "run.monitor=val/loss",
        "run.monitor_mode=min", "run.plot=false", "trainer.enable_progress_bar=false", f"run.out_dir={out_dir}",
        f"run.checkpoint_every_n_steps={sizes.steps + 1}",
    ), work / "clipft_throughput.log", 600)
    reports = list(out_dir.glob("*/*/report.json"))
    if code != 0 or not reports:
        return {"row": "clipft fit (WebDataset shards)", "status": _tail(out)}
    report = json.loads(reports[0].read_text())
    step = report["step_time_s"]
    return {"row": "clipft fit (WebDataset shards)", "samples/s": sizes.batch / step, "step (s)": step, "status": "ok"}


def open_clip_train_throughput(work: Path, sizes: Sizes, train: Path) -> dict:
    row = "open_clip_train.main (same shards)"
    code, out = _run([sys.executable, "-c", "import open_clip_train.main"], work / "open_clip_train_import.log", 120)
    if code != 0:  # absent, or present without its own dependencies (pandas, ...)
        return {"row": row, "status": f"skipped: open_clip_train.main does not import ({_tail(out)}); carry its wheels: --wheels DIR"}
    shards = sorted(p.name for p in train.glob("shard-*.tar"))
    pattern = f"{train}/shard-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"
    # open_clip_train knows open_clip's own model configs; clipft's (the CPU smoke's tiny model)
    # are added first, the one step it lacks
    start = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
             "from open_clip_train.main import main; main(sys.argv[2:])")
    code, out = _run([
        sys.executable, "-c", start, str(ROOT / "clipft" / "models" / "configs"), "--train-data", pattern, "--train-num-samples",
        str(sizes.samples), "--dataset-type", "webdataset", "--model", sizes.model, "--precision", sizes.precision,
        "--batch-size", str(sizes.batch), "--epochs", "1", "--workers", str(sizes.workers), "--lr", "1e-5",
        "--warmup", "0", "--log-every-n-steps", "1", "--report-to", "", "--name", "gpu_check",
        "--device", "cuda" if sizes.accelerator == "gpu" else "cpu",
        "--logs", "none",  # no checkpoint (its log folder none/gpu_check/ lands in the work folder)
    ], work / "open_clip_train.log", 600, cwd=work)
    rates = [float(v) for v in re.findall(r"([0-9.]+)/s/gpu", out)]
    if code != 0 or not rates:
        return {"row": row, "status": _tail(out)}
    rate = statistics.median(rates[len(rates) // 2:])  # the second half: past the warm-up
    return {"row": row, "samples/s": rate, "step (s)": sizes.batch / rate, "status": "ok"}


def compute_bound(sizes: Sizes) -> dict:
    """open_clip's model and contrastive loss on batches made on the device: no data loading."""
    try:
        return _compute_bound(sizes)
    except Exception as err:  # the report still gets written, with the row's error
        return {"row": "compute-bound (batches on the device)", "status": f"{type(err).__name__}: {str(err).splitlines()[0]}"[:160]}


def _compute_bound(sizes: Sizes) -> dict:
    import open_clip
    import torch

    import clipft.models  # noqa: F401

    device = "cuda" if sizes.accelerator == "gpu" else "cpu"
    model = open_clip.create_model(sizes.model, device=device)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    images = torch.randn(sizes.batch, 3, sizes.image_size, sizes.image_size, device=device)
    texts = open_clip.get_tokenizer(sizes.model)(["a photo of a thing"] * sizes.batch).to(device)  # its context length
    dtype = torch.bfloat16 if "bf16" in sizes.precision else torch.float32
    times = []
    for step in range(3 + sizes.steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            image_features, text_features, logit_scale = model(images, texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"row": "compute-bound (batches on the device)", "samples/s": sizes.batch / step, "step (s)": step, "status": "ok"}


def recipe_memory(work: Path, sizes: Sizes, recipe: str) -> dict:
    """A paper recipe at its real size and batch for a few steps; peak memory vs the estimate."""
    import clipft.methods  # noqa: F401  (the recipes' method settings register before they are composed)
    from clipft.config import load_config
    from clipft.memory import GiB, estimate
    from clipft.smoke import smoke_config

    name = Path(recipe).stem
    recipe_cfg = load_config(recipe, check_data=False)
    batch = sizes.batch if sizes.accelerator == "cpu" else recipe_cfg.data.batch_size
    out_dir = work / f"runs_{name}"
    overrides = [f"trainer.accelerator={sizes.accelerator}", f"trainer.max_steps={sizes.recipe_steps}",
                 f"data.batch_size={batch}", f"data.num_workers={sizes.workers}", f"run.out_dir={out_dir}",
                 "trainer.enable_progress_bar=false", "run.plot=false"]
    if sizes.accelerator == "cpu":  # the tiny model; MMRL's first token layer as its default for that depth
        overrides += [f"model.name={sizes.model}"] + ["method.first_layer=null"] * hasattr(recipe_cfg.method, "first_layer")
    row = {"recipe": name, "batch": batch}
    try:
        _, cfg = smoke_config(recipe, overrides)
        row["estimate (GiB)"] = estimate(cfg).total / GiB
        code, out = _run(_clipft("fit", recipe, "--smoke", *overrides), work / f"{name}.log", 600)
        reports = list(out_dir.glob("*/*/report.json"))
        if code != 0 or not reports:
            return row | {"status": _tail(out)}
        report = json.loads(reports[0].read_text())
        peak = report.get("peak_gpu_memory_bytes")
        row |= {"step (s)": report["step_time_s"], "status": "ok" if report["steps"] == sizes.recipe_steps else "steps?"}
        if peak is not None:
            row |= {"peak (GiB)": peak / GiB, "peak / estimate": peak / GiB / row["estimate (GiB)"]}
    except Exception as err:
        row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"[:160]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


# ------------------------------------------------------------------ report

THROUGHPUT_COLUMNS = ("row", "samples/s", "step (s)", "MFU", "status")
RECIPE_COLUMNS = ("recipe", "batch", "step (s)", "peak (GiB)", "estimate (GiB)", "peak / estimate", "status")


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows])


def device_name(sizes: Sizes) -> str:
    import torch

    return torch.cuda.get_device_name(0) if sizes.accelerator == "gpu" else "cpu-smoke"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage on the CPU at the smallest sizes")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where the table goes")
    parser.add_argument("--recipes", nargs="*", default=sorted(glob.glob(str(ROOT / "recipes" / "*_vit*.yaml"))))
    args = parser.parse_args(argv)
    sizes = Sizes.for_mode(args.cpu_smoke)
    name = device_name(sizes)
    peak = None if args.cpu_smoke else peak_tflops(name)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.perf_counter()

    tests = "skipped (--cpu-smoke)" if args.cpu_smoke else pytest_gpu(work)
    print(f"pytest -m gpu: {tests}", flush=True)
    train, val = write_shards(work, sizes)
    rows = [clipft_throughput(work, sizes, train, val), open_clip_train_throughput(work, sizes, train), compute_bound(sizes)]
    for row in rows:
        row["MFU"] = mfu(row.get("samples/s"), sizes.model, peak)
        print(markdown_table([row], THROUGHPUT_COLUMNS).splitlines()[-1], flush=True)
    recipes = []
    for recipe in args.recipes:
        recipes.append(recipe_memory(work, sizes, recipe))
        print(markdown_table(recipes[-1:], RECIPE_COLUMNS).splitlines()[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)

    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    path = Path(args.out_dir) / f"gpu_check_{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# GPU check: {name}\n\n`benchmarks/gpu_check.sh{' --cpu-smoke' if args.cpu_smoke else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - started:.0f} s.\n\n"
        f"pytest -m gpu: {tests}\n\n"
        f"## Training throughput, {sizes.model}, random weights, {sizes.precision}, batch {sizes.batch}, "
        f"{sizes.image_size} px\n\nMFU: training FLOPs 3 x {forward_flops(sizes.model) / 1e9:.2f} GFLOPs a sample "
        f"(benchmarks/gpu_check.py, forward_flops) over a dense bf16 peak of {peak or 'n/a'} TFLOPS.\n\n"
        + markdown_table(rows, THROUGHPUT_COLUMNS)
        + f"\n\n## Paper recipes, {sizes.recipe_steps} steps "
        + (f"with {sizes.model} at batch {sizes.batch}" if args.cpu_smoke else "at real size and batch") + ", one device\n\n"
        "peak: torch.cuda.max_memory_allocated while training (report.json); estimate: `clipft info`'s total "
        "(clipft.memory.estimate, without CUDA context and allocator slack).\n\n"
        + markdown_table(recipes, RECIPE_COLUMNS) + "\n"
    )
    print(f"wrote {path}")
    failed = [r for r in rows + recipes if r.get("status") != "ok" and not str(r.get("status")).startswith("skipped")]
    return 1 if failed or not tests.startswith(("ok", "skipped")) else 0


if __name__ == "__main__":
    sys.exit(main())
