"""The framework's cost per training step: clipft's quickstart against a plain PyTorch loop.

    python benchmarks/overhead.py [--steps 120] [--rounds 3] [--threads 2] [--compile] [--profile]

Both arms train the quickstart's model (clipft-tiny-vit, from scratch) on the same synthetic
data loader (same batch, workers and seed), with the same threads, AdamW parameter groups
(no weight decay on biases, norms, embeddings and the logit scale), warm-up + cosine schedule
and logit-scale clamp; the plain loop is written here, in a dozen lines. Each arm runs in its
own process, interleaved A/B/A/B over ``--rounds`` rounds so that a change in the machine's load
hits both; each arm's figure is the median wall time between consecutive optimizer steps (data
wait included, the first 10 steps and evaluation left out: clipft's report.json ``timing``,
measured the same way in the loop), and the median CPU seconds this process spent per step (all
its threads, the loader's worker process not counted): on a shared machine the wall time moves
with the other jobs, while the CPU time counts the work each arm does. The table gives each
round's ratios and their median.

``--compile`` adds a third arm, clipft with ``trainer.compile=true`` (the towers under
torch.compile; the first step, which compiles, is not in the median), and its ratio to eager.

``--profile`` adds one clipft run under Lightning's SimpleProfiler and prints where its step time
goes (hooks, callbacks, optimizer, logging) next to the loop's forward/backward/step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
SKIP = 10  # warm-up steps left out of the median


def plain_loop(steps: int, threads: int) -> dict:
    """The loop a user would write: median seconds between optimizer steps."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    import clipft.methods  # noqa: F401  (every method registers its settings)
    from clipft.config import load_config
    from clipft.data.datamodule import ImageTextDataModule
    from clipft.losses import clip_contrastive_loss
    from clipft.methods.base import no_weight_decay, warmup_cosine
    from clipft.models import build_model

    torch.set_num_threads(threads)
    cfg = load_config(RECIPE, [f"trainer.max_steps={steps}"])
    torch.manual_seed(cfg.run.seed)
    bundle = build_model(cfg.model)
    model = bundle.model.train()
    data = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=cfg.run.seed)
    data.setup("fit")
    o = cfg.optim
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            (no_decay if no_weight_decay(module, full, param) else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=o.fused or None)
    warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_fraction * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, warmup, o.min_lr / o.lr, o.schedule))
    times, cpu, last, last_cpu = [], [], None, None
    batches = iter(data.train_dataloader())
    for _ in range(steps):
        batch = next(batches)
        image = F.normalize(model.encode_image(batch.images), dim=-1)
        text = F.normalize(model.encode_text(batch.texts), dim=-1)
        loss = clip_contrastive_loss(image, text, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(o.logit_scale_max))
        now, now_cpu = time.perf_counter(), time.process_time()
        if last is not None:
            times.append(now - last)
            cpu.append(now_cpu - last_cpu)
        last, last_cpu = now, now_cpu
    return {"step_s_median": statistics.median(times[SKIP:]), "cpu_s_median": statistics.median(cpu[SKIP:]),
            "loss": float(loss.detach())}


def clipft_fit(steps: int, threads: int, out_dir: str, profile: bool = False, compile: bool = False) -> dict:
    """``clipft fit`` of the quickstart, training only: its report's timing."""
    sys.path.insert(0, str(ROOT))
    import lightning as L

    import clipft.methods  # noqa: F401
    from clipft.config import load_config
    from clipft.runner import fit

    class CpuClock(L.Callback):
        """This process's CPU seconds per optimizer step (all its threads; not the loader's workers)."""

        def __init__(self) -> None:
            self.cpu: list[float] = []
            self.last: Optional[float] = None

        def on_train_batch_end(self, *args: Any) -> None:
            now = time.process_time()
            if self.last is not None:
                self.cpu.append(now - self.last)
            self.last = now

        def on_validation_start(self, *args: Any) -> None:
            self.last = None  # evaluation is not a step

    clock = CpuClock()
    trainer_init = L.Trainer.__init__

    def instrumented(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock]
        if profile:  # Lightning's own per-hook timing
            kwargs["profiler"] = L.pytorch.profilers.SimpleProfiler(dirpath=out_dir, filename="profile")
        trainer_init(self, *args, **kwargs)

    L.Trainer.__init__ = instrumented  # type: ignore[method-assign]
    cfg = load_config(RECIPE, [
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "eval.zeroshot=[]",
        "eval.retrieval.enabled=false", "eval.compositional.source=null", "eval.gap=false", f"run.threads={threads}",
        "trainer.enable_progress_bar=false", "run.plot=false", f"run.out_dir={out_dir}", "run.monitor=val/loss", "run.monitor_mode=min",
        f"run.checkpoint_every_n_steps={steps}", f"trainer.compile={str(compile).lower()}",
    ])
    report = fit(cfg)
    return {"step_s_median": report["timing"]["step_s_median"], "cpu_s_median": statistics.median(clock.cpu[SKIP:]),
            "timing": report["timing"]}


def _in_process(arm: str, steps: int, threads: int, out_dir: str, profile: bool = False) -> dict:
    """One arm ("loop", "clipft" or "compiled") in a fresh process: its result dict."""
    job = json.dumps({"arm": arm, "steps": steps, "threads": threads, "out": out_dir, "profile": profile})
    done = subprocess.run([sys.executable, __file__, "--job", job], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add clipft with trainer.compile=true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        if job["arm"] == "loop":
            result = plain_loop(job["steps"], job["threads"])
        else:
            result = clipft_fit(job["steps"], job["threads"], job["out"], job["profile"], job["arm"] == "compiled")
        print(json.dumps(result))
        return
    out = tempfile.mkdtemp(prefix="overhead_")
    arms = ["loop", "clipft"] + (["compiled"] if args.compile else [])
    rows = []  # per round: {arm: result}
    for r in range(args.rounds):
        row = {arm: _in_process(arm, args.steps, args.threads, f"{out}/r{r}_{arm}") for arm in arms}
        rows.append(row)
        print(f"round {r}: " + ", ".join(f"{arm} {row[arm]['step_s_median']:.4f} s ({row[arm]['cpu_s_median']:.4f} CPU s)"
                                         for arm in arms), flush=True)
    pairs = [("clipft", "loop")] + ([("clipft", "compiled")] if args.compile else [])
    columns = [(f"{arm} {kind}", arm, key) for arm in arms for kind, key in (("s/step", "step_s_median"), ("CPU s/step", "cpu_s_median"))]
    ratios = {f"{a} / {b} {kind}": [row[a][key] / row[b][key] for row in rows]
              for a, b in pairs for kind, key in (("wall", "step_s_median"), ("CPU", "cpu_s_median"))}
    print(f"\nquickstart model, batch 128, {args.steps} steps per arm, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| round | " + " | ".join(name for name, _, _ in columns) + " | " + " | ".join(ratios) + " |")
    print("|---" * (1 + len(columns) + len(ratios)) + "|")
    for r, row in enumerate(rows):
        print(f"| {r} | " + " | ".join(f"{row[arm][key]:.4f}" for _, arm, key in columns) + " | "
              + " | ".join(f"{values[r]:.3f}" for values in ratios.values()) + " |")
    print("| median | " + " | ".join(f"{statistics.median(row[arm][key] for row in rows):.4f}" for _, arm, key in columns)
          + " | " + " | ".join(f"{statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f})" for v in ratios.values()) + " |")
    if args.profile:
        _in_process("clipft", args.steps, args.threads, f"{out}/profile", profile=True)
        text = next(Path(f"{out}/profile").rglob("*profile*.txt")).read_text()
        print("\nclipft under Lightning's SimpleProfiler (per-hook totals):\n")
        print("\n".join(text.splitlines()[:40]))


if __name__ == "__main__":
    main()
