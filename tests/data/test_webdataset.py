"""WebDataset shards: write-shards (resumable), exactly-once epochs over ranks x workers, equal
batch counts with uneven shards, bad samples skipped and counted, resume mid-epoch, errors that
name the file, and a short `clipft fit` on shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from clipft.config import ConfigError, WebDatasetConfig, load_config
from clipft.data import shard_writer
from clipft.data.datamodule import CollatePairs
from clipft.data.shard_writer import open_source, write_shards
from clipft.data.shards import ShardStream, check_first_sample, epoch_length, expand_shards, index_shards
from clipft.data.table import DataError

ROOT = Path(__file__).resolve().parents[2]


def fake_tokenize(texts: list[str]) -> torch.Tensor:  # module level: DataLoader workers pickle it
    return torch.zeros(len(texts), 4, dtype=torch.long)


TO_TENSOR = T.ToTensor()


def synthetic_shards(out: Path, size: int, shard_size: int, seed: int = 0) -> Path:
    write_shards(open_source("synthetic", synthetic_size=size, synthetic_seed=seed), out, shard_size,
                 image_format="png", progress=False)
    return out


def stream(folder: Path, batch: int, world: int = 1, rank: int = 0, **settings) -> ShardStream:
    shards = expand_shards(str(folder))
    cfg = WebDatasetConfig(**{"shuffle_buffer": 16, **settings})
    return ShardStream(shards, cfg, epoch_length(shards, cfg), batch, TO_TENSOR, CollatePairs(fake_tokenize),
                       world=world, rank=rank, seed=3)


def keys(batch) -> list[str]:
    return [i.rsplit("/", 1)[1] for i in batch.image_ids]


def epochs(dataset: ShardStream, n: int, workers: int = 2) -> list[list[list[str]]]:
    """Keys of every batch of ``n`` epochs, through a DataLoader with persistent workers (as the
    data module builds it)."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return [[keys(b) for b in loader] for _ in range(n)]


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("even"), 128, 16)  # 8 shards of 16


@pytest.mark.parametrize("world", [1, 2])
def test_every_sample_exactly_once_per_epoch(even_shards: Path, world: int) -> None:
    per_rank = [epochs(stream(even_shards, 8, world, rank), 2) for rank in range(world)]
    for epoch in range(2):
        batches = [b for rank in range(world) for b in per_rank[rank][epoch]]
        assert all(len(b) == 128 // (world * 8) for b in (per_rank[r][epoch] for r in range(world)))
        seen = Counter(k for b in batches for k in b)
        assert sorted(seen) == [f"{i:09d}" for i in range(128)] and set(seen.values()) == {1}
    # a new order every epoch, the same on a rerun (seeded)
    assert per_rank[0][0] != per_rank[0][1]
    assert epochs(stream(even_shards, 8, world, 0), 1)[0] == per_rank[0][0]


def test_equal_batch_counts_per_rank_with_uneven_shards(tmp_path: Path) -> None:
    folder = synthetic_shards(tmp_path, 73, 10)  # 7 shards of 10 and one of 3
    world, batch = 2, 4
    runs = [epochs(stream(folder, batch, world, rank), 2) for rank in range(world)]
    for epoch in range(2):
        lengths = [len(runs[rank][epoch]) for rank in range(world)]
        assert lengths == [73 // (world * batch)] * world  # 9 on each: DDP never waits for a rank
        assert all(len(b) == batch for r in runs for b in r[epoch])
        seen = Counter(k for r in runs for b in r[epoch] for k in b)
        assert sum(seen.values()) == 72 and len(seen) >= 60  # 1 of 73 left for a later epoch; few repeats


def test_resume_mid_epoch_continues_the_same_stream(even_shards: Path) -> None:
    full = epochs(stream(even_shards, 8), 2)
    resumed = stream(even_shards, 8)
    resumed.start_at(5)  # 5 batches trained before the interruption
    assert epochs(resumed, 2) == [full[0][5:], full[1]]


def test_resampled_sources_weighted(tmp_path: Path) -> None:
    a = synthetic_shards(tmp_path / "a", 100, 10, seed=1)
    b = synthetic_shards(tmp_path / "b", 100, 10, seed=2)
    shards = expand_shards(f"{a}::{b}")
    cfg = WebDatasetConfig(resampled=True, weights=[1.0, 3.0], epoch_samples=400, shuffle_buffer=0)
    data = ShardStream(shards, cfg, 400, 10, TO_TENSOR, CollatePairs(fake_tokenize), seed=3)
    loader = DataLoader(data, batch_size=None, num_workers=2, persistent_workers=True)
    for _ in range(2):
        ids = [i for batch in loader for i in batch.image_ids]
        assert len(ids) == 400
        from_b = sum(i.startswith(str(b)) for i in ids) / len(ids)
        assert 0.6 < from_b < 0.9  # 3:1 per shard, equal shard counts: 0.75 expected


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png(value: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = [{"__key__": f"g{i}", "png": png(i), "txt": b"a caption"} for i in range(8)]
    bad = [{"__key__": "broken", "jpg": b"not an image", "txt": b"x"}, {"__key__": "nocaption", "png": png(9)}]
    write_tar(tmp_path / "s0.tar", good[:4] + bad + good[4:])
    (tmp_path / "sizes.json").write_text(json.dumps({"s0.tar": 8}))
    batches = epochs(stream(tmp_path, 4), 1, workers=0)[0]
    assert sorted(k for b in batches for k in b) == sorted(f"g{i}" for i in range(8))
    data = stream(tmp_path, 4, shuffle_buffer=0)
    assert sum(b.skipped_samples for b in data) == 2
    data = stream(tmp_path, 4, shuffle_buffer=0)
    data.on_bad_sample = "error"
    with pytest.raises(DataError, match=r"s0\.tar', sample 'broken': image 'jpg' cannot be read"):
        list(data)
    index = index_shards(str(tmp_path), WebDatasetConfig())  # validation: indexed, missing members skipped
    assert len(index) == 9 and "sample 'nocaption'" in index.skipped[0]


def test_bad_input_fails_naming_the_file(tmp_path: Path, even_shards: Path) -> None:
    with pytest.raises(DataError, match=r"2 of 2 shards not found \(.*/x-0\.tar"):
        expand_shards(f"{tmp_path}/x-{{0..1}}.tar")
    write_tar(tmp_path / "s.tar", [{"__key__": "a", "jpg": png(1), "caption": b"c"}])
    with pytest.raises(DataError, match=r"s\.tar', sample 'a': .* caption member 'txt', found: caption, jpg"):
        check_first_sample(expand_shards(str(tmp_path / "s.tar")), WebDatasetConfig())
    with pytest.raises(DataError, match=r"s\.tar': no entry in a sizes\.json .* data\.webdataset\.epoch_samples"):
        epoch_length(expand_shards(str(tmp_path / "s.tar")), WebDatasetConfig())
    with pytest.raises(DataError, match="1 shards for 2 devices"):
        ShardStream(expand_shards(str(tmp_path / "s.tar")), WebDatasetConfig(epoch_samples=10), 10, 1, TO_TENSOR,
                    CollatePairs(fake_tokenize), world=2)
    with pytest.raises(ConfigError, match="weights need data.webdataset.resampled"):
        load_config(None, ["data.source=webdataset", f"data.train={even_shards}", "data.webdataset.weights=[1]",
                           "run.monitor=train/loss"])


def test_write_shards_resumes_without_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_source("synthetic", synthetic_size=50)
    write = shard_writer._write_shard
    calls = []

    def interrupted(path, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped while writing the third shard
        calls.append(path.name)
        write(path, *args)

    monkeypatch.setattr(shard_writer, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(source, tmp_path, 12, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    monkeypatch.setattr(shard_writer, "_write_shard", write)
    written = []
    monkeypatch.setattr(shard_writer, "_write_shard", lambda path, *args: (written.append(path.name), write(path, *args)))
    sizes = write_shards(source, tmp_path, 12, progress=False)
    assert written == ["shard-000002.tar", "shard-000003.tar", "shard-000004.tar"]  # finished ones skipped
    assert {p: tmp_path.joinpath(p).stat().st_mtime_ns for p in stamps} == stamps
    assert sizes == json.loads((tmp_path / "sizes.json").read_text()) and list(sizes.values()) == [12, 12, 12, 12, 2]
    names = [m for p in sorted(tmp_path.glob("*.tar")) for m in tarfile.open(p).getnames()]
    assert len(names) == len(set(names)) == 150 and not list(tmp_path.glob(".*.partial"))
    with pytest.raises(DataError, match="shard_size differ"):
        write_shards(source, tmp_path, 10, progress=False)


def test_fit_on_shards(tmp_path: Path, fast_overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from clipft.cli import main

    assert main(["data", "write-shards", "synthetic", str(tmp_path / "train"), "--shard-size", "64", "--size", "256",
                 "--image-format", "png", "--no-progress"]) == 0
    assert main(["data", "write-shards", "synthetic", str(tmp_path / "val"), "--shard-size", "64", "--size", "64",
                 "--split", "val", "--no-progress"]) == 0
    overrides = [*fast_overrides, "data.source=webdataset", f"data.train={tmp_path}/train/shard-{{000000..000003}}.tar",
                 f"data.val={tmp_path}/val", "data.num_workers=2", "trainer.max_steps=10", "trainer.val_check_interval=10",
                 "eval.zeroshot=[]", "eval.compositional.source=null", "run.monitor=val/loss", "run.monitor_mode=min"]
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    overrides += ["trainer.log_every_n_steps=1", "optim.schedule=constant", "optim.warmup_fraction=0"]  # lr: not by max_steps
    assert main(["fit", recipe, *overrides]) == 0
    report = json.loads(Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]).read_text())
    assert report["steps"] == 10 and report["epoch"] == 1  # 8 batches an epoch: the second epoch's stream went on
    assert report["data"] == {"source": "webdataset", "train_size": 256, "val_size": 64, "train_shards": 4,
                              "val_skipped_samples": 0, "train_skipped_samples": 0}
    assert report["metrics"]["val/retrieval/n_images"] == 64

    # stopped mid-epoch at step 5 and resumed: steps 6-10 train on the uninterrupted run's batches
    stopped = [*overrides, "run.name=stopped"]
    assert main(["fit", recipe, *stopped[:-1], "trainer.max_steps=5", "run.name=stopped"]) == 0
    assert main(["fit", recipe, *stopped, "run.resume=last"]) == 0
    full, resumed = (train_losses(Path(report["run_dir"]).parent.parent / name) for name in ("quickstart", "stopped"))
    assert sorted(resumed) == list(range(10)) and resumed == pytest.approx(full, abs=1e-5)


def train_losses(runs: Path) -> dict[int, float]:
    import csv

    rows = csv.DictReader((next(runs.glob("*")) / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
