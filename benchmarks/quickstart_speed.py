"""Seconds per training step of the quickstart: a plain PyTorch loop vs clipft's Lightning
run, with the same model, data and batch, for several thread / worker settings.

    python benchmarks/quickstart_speed.py [--steps 150]

Prints a table. The plain loop is the floor that the framework must match
(../shared/research/feasibility.md measured 0.17-0.18 s/step on an idle 2-core machine).
Run it on an otherwise idle machine: another busy process can make a step 10x slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "quickstart.yaml")


def plain_loop(steps: int, threads: int) -> float:
    """Median s/step of a hand-written loop (data on the main thread, as feasibility.md)."""
    import torch
    import torch.nn.functional as F

    import clipft.methods  # noqa: F401  (every method registers its settings)
    from clipft.config import load_config
    from clipft.data.datamodule import ImageTextDataModule
    from clipft.losses import clip_contrastive_loss
    from clipft.models import build_model

    torch.set_num_threads(threads)
    cfg = load_config(RECIPE, [])
    bundle = build_model(cfg.model)
    data = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    model = bundle.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, fused=True)
    times = []
    batches = iter(data.train_dataloader())
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        image = F.normalize(model.encode_image(batch.images), dim=-1)
        text = F.normalize(model.encode_text(batch.texts), dim=-1)
        loss = clip_contrastive_loss(image, text, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])


def clipft_run(steps: int, threads: int, workers: int, out_dir: str, progress_bar: bool = False) -> float:
    """s/step of `clipft fit` (training only: validation off), from its report."""
    import json

    cmd = [
        sys.executable, "-m", "clipft", "fit", RECIPE, f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
        "eval.zeroshot=[]", "eval.retrieval.enabled=false", f"run.threads={threads}", f"data.num_workers={workers}",
        f"trainer.enable_progress_bar={str(progress_bar).lower()}", "run.plot=false", f"run.out_dir={out_dir}", "run.checkpoint_every_n_steps=100000",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    report_path = json.loads(out.strip().splitlines()[-1])["report"]
    with open(report_path) as f:
        report = json.load(f)
    return report["train_time_s"] / report["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out-dir", default="/tmp/clipft-bench")
    args = parser.parse_args()
    rows = []
    for threads in (2, 1):
        rows.append((f"plain PyTorch loop, {threads} thread(s), data in main thread", plain_loop(args.steps, threads)))
    for threads, workers, bar in ((2, 0, False), (2, 0, True), (2, 1, False), (1, 1, False)):
        label = f"clipft fit, {threads} thread(s), {workers} data worker(s), progress bar {'on' if bar else 'off'}"
        rows.append((label, clipft_run(args.steps, threads, workers, args.out_dir, bar)))
    width = max(len(label) for label, _ in rows)
    print(f"\nquickstart model, batch 128, {args.steps} steps, load average {os.getloadavg()[0]:.2f}")
    print(f"{'setting':{width}s}  s/step  1000 steps")
    for label, seconds in rows:
        print(f"{label:{width}s}  {seconds:6.3f}  {seconds * 1000 / 60:5.1f} min")


if __name__ == "__main__":
    main()
