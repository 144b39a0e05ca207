"""Memory and time of one training step with trainer.micro_batch_size (the whole batch's
negatives, encoded a micro-batch at a time) against the batch encoded at once.

Each setting runs in a fresh process: build the model and a batch, then one forward +
backward of the CLIP loss through ``ContrastiveMethod.training_step`` (twice; the second is
timed). Peak memory is the high-water mark of the process above what it held before the first
step: on a GPU ``torch.cuda.max_memory_allocated``, on a CPU the resident set size (ru_maxrss).
Gradients of every parameter are part of it, the same in every row.

    python benchmarks/micro_batches.py                      # ViT-B-32, batch 32, CPU
    python benchmarks/micro_batches.py --batch 256 --micro 64 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_setting(model: str, batch: int, micro: int, device: str) -> dict:
    import torch

    from clipft.config import load_config
    from clipft.data.batch import Batch
    from clipft.methods import build_method

    torch.manual_seed(0)
    overrides = [f"model.name={model}", f"data.batch_size={batch}"]
    if micro:
        overrides.append(f"trainer.micro_batch_size={micro}")
    method = build_method(load_config(None, overrides)).to(device).train()
    size = method.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    captions = [f"a photo of thing number {i}" for i in range(batch)]
    pairs = Batch(torch.randn(batch, 3, size, size, device=device), method.tokenizer(captions).to(device), captions,
                  [str(i) for i in range(batch)])

    def peak() -> float:
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB

    def step() -> float:
        method.zero_grad(set_to_none=False)
        loss = method.training_step(pairs, 0)
        loss.backward()
        return loss.item()

    for param in method.parameters():  # gradients allocated before the baseline
        param.grad = torch.zeros_like(param)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"micro": micro or batch, "loss": loss, "seconds": time.perf_counter() - start, "peak_mib": peak() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one setting
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_setting(args.model, args.batch, args.one, args.device)))
        return
    rows = []
    for micro in [0, *args.micro]:
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--device", args.device,
                   "--one", str(micro)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    whole = rows[0]
    print(f"{args.model}, batch {args.batch}, {args.device}: one training step (forward + backward, CLIP loss)\n")
    print("| encoded | loss | step time (s) | × whole | peak memory above start (MiB) | × whole |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        label = "whole batch" if row["micro"] == args.batch else f"micro-batches of {row['micro']}"
        print(f"| {label} | {row['loss']:.6f} | {row['seconds']:.2f} | {row['seconds'] / whole['seconds']:.2f} | "
              f"{row['peak_mib']:.0f} | {row['peak_mib'] / whole['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
