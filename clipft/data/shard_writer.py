"""``clipft data write-shards SOURCE OUT_DIR --shard-size N``: any clipft source as WebDataset
tar shards plus ``sizes.json``, readable by clipft (``data.source: webdataset``),
open_clip_train and clip_benchmark.

SOURCE is a table (.csv/.tsv/.jsonl, as ``data.source: csv``), an image folder with one
sub-folder per class (the caption is the class name), or ``synthetic`` (the embedded set).
Sample i of the source goes to shard ``i // N`` as ``<i:09d>.<ext>`` (the image: the file's own
bytes, or re-encoded when resized or rendered), ``<i>.txt`` (the caption) and ``<i>.json``
(where it came from). Each shard is written to a temporary name and renamed when complete, so an
interrupted run leaves only whole shards; running the command again skips them and writes the
rest (a manifest in OUT_DIR makes sure it is the same source and shard size).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from clipft.data.shards import SIZES_FILE
from clipft.data.table import DataError, Table, read_image_folder, read_table

MANIFEST = ".write-shards.json"
COPIED_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}  # kept as they are


@dataclass
class Sample:
    image: bytes
    ext: str
    caption: str
    origin: str  # file path or synthetic id, for the .json member


@dataclass
class SampleSource:
    """``len`` samples, read one at a time by index; ``description`` identifies the source in
    the manifest (a resumed write must read the same one)."""

    description: dict[str, Any]
    size: int
    read: Callable[[int], tuple[Any, str, str]]  # index -> (path or uint8 array, caption, origin)

    def __len__(self) -> int:
        return self.size


def open_source(
    source: str,
    image_key: str = "filepath",
    caption_key: str = "title",
    separator: Optional[str] = None,
    on_bad_sample: str = "error",
    synthetic_size: int = 10_000,
    synthetic_seed: int = 0,
    synthetic_split: str = "train",
    synthetic_image_size: int = 32,
) -> SampleSource:
    if source == "synthetic":
        from clipft.data.synthetic import SyntheticScenes

        scenes = SyntheticScenes(synthetic_split, synthetic_size, synthetic_seed, synthetic_image_size)

        def read_scene(i: int) -> tuple[Any, str, str]:
            item = scenes[i]
            return item["image"], item["caption"], f"synthetic:{synthetic_split}:{i}"

        description = {"source": "synthetic", "split": synthetic_split, "size": synthetic_size,
                       "seed": synthetic_seed, "image_size": synthetic_image_size}
        return SampleSource(description, len(scenes), read_scene)
    path = Path(source)
    table: Table
    if path.is_dir():
        table = read_image_folder(path)
    else:
        table = read_table(path, image_key, caption_key, separator, on_bad_sample)
    description = {"source": str(path.resolve()), "rows": len(table)}

    def read_row(i: int) -> tuple[Any, str, str]:
        return table.images[i], table.texts[i], str(table.images[i])

    return SampleSource(description, len(table), read_row)


def encode(image: Any, resize: Optional[int], image_format: str, quality: int) -> tuple[bytes, str]:
    """(bytes, extension): a file's own bytes when it needs no change, else the image
    (resized so its shorter side is ``resize``) encoded as ``image_format``."""
    if isinstance(image, Path) and resize is None and image.suffix.lower() in COPIED_SUFFIXES:
        return image.read_bytes(), COPIED_SUFFIXES[image.suffix.lower()]
    if isinstance(image, np.ndarray):
        im = Image.fromarray(image)
    else:
        with Image.open(image) as opened:
            im = opened.convert("RGB")
    if resize is not None:
        scale = resize / min(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if image_format == "jpg":
        im.convert("RGB").save(out, format="JPEG", quality=quality)
    else:
        im.save(out, format="PNG")
    return out.getvalue(), image_format


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed headers: the same bytes on every run
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, source: SampleSource, start: int, stop: int, encode_image: Callable[[Any], tuple[bytes, str]],
                 advance: Callable[[int], None]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            image, caption, origin = source.read(i)
            data, ext = encode_image(image)
            key = f"{i:09d}"
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", caption.encode("utf-8"))
            _add(tar, f"{key}.json", json.dumps({"index": i, "origin": origin}).encode("utf-8"))
            advance(1)
    os.replace(partial, path)  # a shard under its final name is complete


def write_shards(
    source: SampleSource,
    out_dir: str | Path,
    shard_size: int,
    resize: Optional[int] = None,
    image_format: str = "jpg",
    quality: int = 95,
    progress: bool = True,
) -> dict[str, int]:
    """Write (or finish writing) ``source`` as shards of ``shard_size`` samples in ``out_dir``;
    returns ``sizes.json``'s content ({shard file name: samples})."""
    if shard_size <= 0:
        raise DataError(f"--shard-size must be > 0 (got {shard_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**source.description, "shard_size": shard_size, "resize": resize, "image_format": image_format,
                "quality": quality}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        before = json.loads(manifest_path.read_text())
        if before != manifest:
            changed = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
            raise DataError(
                f"{out} holds shards written with other settings ({', '.join(changed)} differ; see {manifest_path}); "
                "write to a new folder, or delete it to start over"
            )
    else:
        manifest_path.write_text(json.dumps(manifest, indent=1))
    total = len(source)
    count = -(-total // shard_size)
    sizes = {shard_name(s): min(shard_size, total - s * shard_size) for s in range(count)}
    todo = [s for s in range(count) if not (out / shard_name(s)).is_file()]
    done = total - sum(sizes[shard_name(s)] for s in todo)

    def encode_image(image: Any) -> tuple[bytes, str]:
        return encode(image, resize, image_format, quality)

    from tqdm.auto import tqdm

    with tqdm(total=total, initial=done, unit=" samples", desc=f"writing {out}", disable=not progress) as bar:
        for s in todo:
            start = s * shard_size
            _write_shard(out / shard_name(s), source, start, min(start + shard_size, total), encode_image, bar.update)
    tmp = out / f".{SIZES_FILE}.partial"
    tmp.write_text(json.dumps(sizes, indent=1))
    os.replace(tmp, out / SIZES_FILE)
    return sizes
