"""Images per second of clipft's training loaders (CSV table, WebDataset shards) against
open_clip_train's own CSV and WebDataset pipelines, on the same files, with the same transform
(open_clip's 224 px training preprocess) and tokenizer, the same batch size and worker count.

    python benchmarks/data_throughput.py [--workers 2] [--batch 64] [--epochs 2] [--out FILE]
        [--octrain /tmp/octrain]

Workloads (written once under --work, default /tmp/clipft-data-throughput):
  * twemoji224: the 1576 twemoji64 images (../shared/data/twemoji64) upscaled to 224 px JPEGs;
  * synthetic224: 3000 synthetic scenes rendered at 32 px and upscaled to 224 px JPEGs.
Each is a folder of JPEGs + a CSV, and shards written from that CSV by `clipft data
write-shards` (which copies the JPEG bytes as they are), so every loader decodes the same bytes.

open_clip_train needs pandas: to leave this environment's packages alone, install it elsewhere,
e.g. `pip install --target /tmp/octrain --no-deps pandas pytz tzdata`, and pass --octrain
(open_clip_train itself ships inside open_clip_torch; its webdataset pin <=0.2.86 is clipft's).

Each loader runs one warm-up epoch (worker start-up), then --epochs timed epochs; images/s is
images delivered / wall time of the timed epochs (per-epoch start-up and shuffle-buffer filling
included). Loaders run in --rounds interleaved rounds (every loader once per round, the order
reversed every other round), and each ratio is taken within a round, so that a change of the
machine's load hits both sides of it: the table gives the median ratio and its min–max.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TWEMOJI = ROOT.parent / "shared" / "data" / "twemoji64"


# ------------------------------------------------------------------ workloads


def write_jpegs(rows: Iterable[tuple[Any, str]], folder: Path, side: int) -> Path:
    """JPEGs of side ``side`` (upscaled, bicubic) + train.csv (filepath, title); skipped if done."""
    from PIL import Image

    table = folder / "train.csv"
    if table.is_file():
        return table
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(rows):
        im = Image.fromarray(image) if not isinstance(image, (str, Path)) else Image.open(image).convert("RGB")
        path = folder / "images" / f"{i:06d}.jpg"
        im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(path, quality=95)
        lines.append((str(path), caption))
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(lines)
    return table


def workloads(work: Path, synthetic_size: int) -> dict[str, tuple[Path, Path]]:
    """name -> (CSV, shard folder)."""
    from clipft.data.shard_writer import open_source, write_shards
    from clipft.data.synthetic import SyntheticScenes

    out = {}
    if (TWEMOJI / "captions.csv").is_file():
        with (TWEMOJI / "captions.csv").open(newline="", encoding="utf-8") as f:
            rows = [(TWEMOJI / r["image"], r["caption"]) for r in csv.DictReader(f)]
        out["twemoji224"] = write_jpegs(rows, work / "twemoji224", 224)
    scenes = SyntheticScenes("train", synthetic_size, 0, 32)
    # one folder per size: a folder written for another --synthetic-size is not reused
    out["synthetic224"] = write_jpegs(((s["image"], s["caption"]) for s in scenes), work / f"synthetic224_n{synthetic_size}", 224)
    result = {}
    for name, table in out.items():
        rows = sum(1 for _ in table.open()) - 1
        shards = table.parent / "shards"
        write_shards(open_source(str(table)), shards, shard_size=-(-rows // 8), progress=False)  # 8 shards
        result[name] = (table, shards)
    return result


# ------------------------------------------------------------------ loaders


def clipft_loader(source: str, path: str, transform: Callable, tokenizer: Callable, workers: int, batch: int) -> Any:
    from clipft.config import DataConfig
    from clipft.data.datamodule import ImageTextDataModule

    cfg = DataConfig(source=source, train=path, batch_size=batch, num_workers=workers, pin_memory=False)
    data = ImageTextDataModule(cfg, transform, transform, tokenizer)
    data.prepare_sources()
    return data.train_dataloader()


def octrain_loaders(octrain: Optional[str]) -> tuple[Optional[Callable], Optional[Callable], str]:
    """open_clip_train's CSV and WebDataset loader factories, or the reason they are missing."""
    if octrain:
        sys.path.append(octrain)  # after this environment's packages: only what is missing comes from there
    try:
        from open_clip_train import data as octrain_data
    except ImportError as err:
        return None, None, f"open_clip_train not importable ({err}); see the docstring"

    def args(path: str, workers: int, batch: int) -> SimpleNamespace:
        return SimpleNamespace(
            train_data=path, val_data=None, train_num_samples=None, dataset_resampled=False,
            train_data_upsampling_factors=None, seed=0, batch_size=batch, workers=workers, world_size=1,
            distributed=False, csv_img_key="filepath", csv_caption_key="title", csv_separator=",",
        )

    def csv_loader(path: str, transform: Callable, tokenizer: Callable, workers: int, batch: int) -> Any:
        return octrain_data.get_csv_dataset(args(path, workers, batch), transform, True, tokenizer=tokenizer)

    def wds_loader(path: str, transform: Callable, tokenizer: Callable, workers: int, batch: int) -> Any:
        return octrain_data.get_wds_dataset(args(path, workers, batch), transform, True, tokenizer=tokenizer)

    return csv_loader, wds_loader, ""


def batch_images(batch: Any) -> int:
    return len(batch.images) if hasattr(batch, "images") else len(batch[0])


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its ended (joined) child processes."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def images_per_second(make: Callable[[], Any], epochs: int) -> tuple[float, float]:
    """(images/s of the timed epochs, CPU ms per image over the loader's whole life): the CPU
    time of this process and of the loader's workers, from its creation to their exit, warm-up
    epoch included, over every image it delivered. On a shared machine the wall time moves with
    the other jobs; the CPU time counts the work each loader does."""
    cpu_start = cpu_seconds()
    made = make()
    info = made if hasattr(made, "dataloader") else None  # open_clip_train's DataInfo
    loader = info.dataloader if info is not None else made
    delivered = 0
    for epoch in range(epochs + 1):
        if info is not None:
            info.set_epoch(epoch)
        if epoch == 1:
            start, images = time.perf_counter(), 0
        for batch in loader:
            delivered += batch_images(batch)
            if epoch >= 1:
                images += batch_images(batch)
    rate = images / (time.perf_counter() - start)
    del made, info, loader, batch  # the workers exit and are joined: their CPU time is counted
    gc.collect()
    return rate, 1000 * (cpu_seconds() - cpu_start) / delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every loader")
    parser.add_argument("--synthetic-size", type=int, default=3000)
    parser.add_argument("--work", default="/tmp/clipft-data-throughput")
    parser.add_argument("--octrain", help="extra path with open_clip_train's missing dependencies (pandas)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args()

    import open_clip
    import torch

    torch.set_num_threads(1)
    transform = open_clip.image_transform(224, is_train=True)  # open_clip's training preprocess
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    csv_oc, wds_oc, missing = octrain_loaders(args.octrain)
    lines = [
        f"Images/s of training loaders: {args.workers} DataLoader workers, batch {args.batch}, open_clip's 224 px "
        f"training preprocess and ViT-B-32 tokenizer, {args.epochs} timed epochs after a warm-up epoch; "
        f"{args.rounds} interleaved rounds (each round runs every loader once, the order reversed every other "
        f"round); the ratios are per round (clipft and open_clip_train of the same round), min / median / max; "
        f"{os.cpu_count()} CPU cores.",
        "",
        "| workload | images | clipft CSV | open_clip_train CSV | clipft / open_clip_train CSV | clipft shards | "
        "open_clip_train wds | clipft / open_clip_train shards |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    cpu_lines: list[str] = []
    for name, (table, shards) in workloads(Path(args.work), args.synthetic_size).items():
        shard_spec = f"{shards}/shard-{{000000..000007}}.tar"
        runs: dict[str, Callable[[], Any]] = {
            "clipft CSV": lambda: clipft_loader("csv", str(table), transform, tokenizer, args.workers, args.batch),
            "clipft shards": lambda: clipft_loader("webdataset", shard_spec, transform, tokenizer, args.workers, args.batch),
        }
        if csv_oc is not None and wds_oc is not None:
            runs["open_clip_train CSV"] = lambda: csv_oc(str(table), transform, tokenizer, args.workers, args.batch)
            runs["open_clip_train wds"] = lambda: wds_oc(shard_spec, transform, tokenizer, args.workers, args.batch)
        rates: dict[str, list[float]] = {key: [] for key in runs}
        cpu: dict[str, list[float]] = {key: [] for key in runs}
        for r in range(args.rounds):
            for key in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                rate, ms = images_per_second(runs[key], args.epochs)
                rates[key].append(rate)
                cpu[key].append(ms)
                print(f"  {name} round {r} {key}: {rate:.0f} images/s, {ms:.2f} CPU ms/image", file=sys.stderr, flush=True)
        images = sum(1 for _ in table.open()) - 1

        def cell(key: str) -> str:
            return f"{statistics.median(rates[key]):.0f}" if key in rates else "n/a"

        def ratio(ours: str, theirs: str) -> str:
            if theirs not in rates:
                return "n/a"
            per_round = [a / b for a, b in zip(rates[ours], rates[theirs])]
            return f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}–{max(per_round):.2f})"

        def cpu_ratio(ours: str, theirs: str) -> str:  # CPU per image: theirs / ours = how much more we deliver
            if theirs not in cpu:
                return "n/a"
            per_round = [b / a for a, b in zip(cpu[ours], cpu[theirs])]
            return f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}–{max(per_round):.2f})"

        lines.append(
            f"| {name} | {images} | {cell('clipft CSV')} | {cell('open_clip_train CSV')} | "
            f"{ratio('clipft CSV', 'open_clip_train CSV')} | {cell('clipft shards')} | {cell('open_clip_train wds')} | "
            f"{ratio('clipft shards', 'open_clip_train wds')} |"
        )
        cpu_lines.append(
            f"| {name} | {statistics.median(cpu['clipft CSV']):.2f} | "
            + (f"{statistics.median(cpu['open_clip_train CSV']):.2f}" if "open_clip_train CSV" in cpu else "n/a")
            + f" | {cpu_ratio('clipft CSV', 'open_clip_train CSV')} | {statistics.median(cpu['clipft shards']):.2f} | "
            + (f"{statistics.median(cpu['open_clip_train wds']):.2f}" if "open_clip_train wds" in cpu else "n/a")
            + f" | {cpu_ratio('clipft shards', 'open_clip_train wds')} |"
        )
    lines += ["", "Images/s: the median over the rounds. CPU ms per image (the loader's process and workers, "
              "from its creation to its workers' exit, warm-up included; median over the rounds), and the ratio "
              "open_clip_train / clipft per round (> 1: clipft does less work per image):", "",
              "| workload | clipft CSV | open_clip_train CSV | CSV ratio | clipft shards | open_clip_train wds | shards ratio |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", *cpu_lines, "",
              f"Load average at the end: {os.getloadavg()[0]:.1f}."]
    if missing:
        lines += ["", f"open_clip_train: {missing}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
