from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from PIL import Image

from clipft.config import ZeroShotTaskConfig, load_config
from clipft.data.batch import Batch
from clipft.data.datamodule import ImageTextDataModule
from clipft.data.transforms import ViaPIL, array_fast_path, array_transform
from clipft.eval.tasks import build_zeroshot_task
from clipft.models import build_model


@pytest.fixture(scope="module")
def bundle():
    cfg = load_config(None, [])
    return build_model(cfg.model)


def test_fast_path_equals_model_preprocess(bundle) -> None:
    fast = array_fast_path(bundle.preprocess_val, 32)
    assert fast is not None
    rng = np.random.default_rng(0)
    for _ in range(5):
        array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        torch.testing.assert_close(fast(array), bundle.preprocess_val(Image.fromarray(array)), rtol=0, atol=1e-6)
    # random crops, or another size, keep the exact PIL path
    assert array_fast_path(bundle.preprocess_train, 32) is None
    assert array_fast_path(bundle.preprocess_val, 48) is None
    assert isinstance(array_transform(bundle.preprocess_train, 32), ViaPIL)


def test_synthetic_batches(bundle) -> None:
    cfg = load_config(
        None, ["data.batch_size=8", "data.synthetic.train_size=20", "data.synthetic.val_size=10", "data.train_transform=val"]
    )
    dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=3)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2  # 20 samples, batch 8, drop_last
    batch = train[0]
    assert isinstance(batch, Batch)
    assert batch.images.shape == (8, 3, 32, 32) and batch.texts.shape == (8, 32)
    assert torch.equal(batch.texts, bundle.tokenizer(batch.captions))
    assert len(set(batch.image_ids)) == 8 and all(i.startswith("synthetic:train:") for i in batch.image_ids)
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [8, 2]  # validation keeps every sample, in order
    assert val[0].image_ids[0] == "synthetic:val:0"
    # the same seed gives the same batches
    again = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=3)
    first = next(iter(again.train_dataloader()))
    assert first.captions == batch.captions and torch.equal(first.images, batch.images)
    assert dm.summary() == {"source": "synthetic", "train_size": 20, "val_size": 10}


def test_a_batch_moves_its_own_tensors(bundle) -> None:
    """The data module's transfer hook: the batch itself when its tensors are on the device already
    (no copy on a CPU run), otherwise a copy with every tensor field moved and the rest kept."""
    cfg = load_config(None, ["data.batch_size=4", "data.synthetic.train_size=8", "data.negatives.count=2"])
    dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    meta = torch.device("meta")
    moved = dm.transfer_batch_to_device(batch, meta, 0)
    assert isinstance(moved, Batch) and moved is not batch and batch.images.device.type == "cpu"
    for name in ("images", "texts", "negative_texts", "negative_valid"):
        assert getattr(moved, name).device == meta and getattr(moved, name).shape == getattr(batch, name).shape
    assert moved.captions is batch.captions and moved.negative_captions is batch.negative_captions
    pairs = (torch.zeros(2, 3), torch.ones(2))  # any other batch: Lightning's own transfer
    assert all(t.device == meta for t in dm.transfer_batch_to_device(pairs, meta, 0))


def test_csv_source_and_zero_shot_table(tmp_path: Path, bundle) -> None:
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    rows = "".join(f"img/{i}.png,caption {i},{'dark' if i < 2 else 'bright'}\n" for i in range(4))
    (tmp_path / "pairs.csv").write_text("filepath,title,label\n" + rows + "img/9.png,missing,dark\n")
    cfg = load_config(
        None,
        ["data.source=csv", f"data.train={tmp_path}/pairs.csv", "data.batch_size=2", "data.on_bad_sample=skip",
         "run.monitor=train/loss"],
    )
    dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0].images.shape == (2, 3, 32, 32)  # resized to the model
    assert dm.val_dataloader() == []
    assert dm.summary()["train_skipped_rows"] == 1
    # evaluation tables are strict: the bad row is an error there
    (tmp_path / "labels.csv").write_text("filepath,title,label\n" + rows)
    task = build_zeroshot_task(
        ZeroShotTaskConfig(name="light", source="csv", data=str(tmp_path / "labels.csv"), templates=["a {} image"]),
        bundle.preprocess_val,
    )
    assert task.class_names == ["bright", "dark"]
    assert len(task.dataset) == 4 and [task.dataset[i][1] for i in range(4)] == [1, 1, 0, 0]


def test_scale_shift_augmentation(bundle) -> None:
    from clipft.data.datamodule import scale_shift

    torch.manual_seed(0)
    transform = scale_shift(bundle.preprocess_val, fill=255)
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))  # black square on a white border
    outputs = [transform(image) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outputs)
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])  # random
    white = bundle.preprocess_val(Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8)))[:, 0, 0]
    assert any(torch.allclose(o[:, 0, 0], white, atol=1e-4) or torch.allclose(o[:, -1, -1], white, atol=1e-4) for o in outputs)
    cfg = load_config(None, ["data.train_transform=scale_shift", "data.pad_fill=255"])
    dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    assert dm.preprocess_train.transforms[-1] is bundle.preprocess_val


@pytest.mark.parametrize("size,world", [(97, 2), (5, 4), (3, 4), (8, 2)])
def test_shards_cover_every_sample_once_with_equal_lengths(size: int, world: int) -> None:
    from clipft.data.datamodule import ShardSampler

    shards = [list(ShardSampler(size, world, rank)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
    valid = ShardSampler.valid(size, world)
    real = [i for shard, n in zip(shards, valid) for i in shard[:n]]
    assert real == list(range(size))


def test_training_samples_split_across_ranks_without_duplicates() -> None:
    from types import SimpleNamespace

    cfg = load_config(None, ["data.synthetic.train_size=101", "data.batch_size=10", "data.num_workers=0"])
    bundle = build_model(cfg.model)
    seen = []
    for rank in range(2):
        dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, global_step=0, accumulate_grad_batches=1)  # type: ignore[assignment]
        loader = dm.train_dataloader()
        seen.append(list(loader.sampler))
    assert len(seen[0]) == len(seen[1]) == 50 and not set(seen[0]) & set(seen[1])


def test_training_order_resumes_where_the_run_stopped() -> None:
    """The stream of batches after a resume at batch n is the uninterrupted stream from batch
    n on, on every rank; epochs are fresh permutations shared by the ranks, split without
    overlap."""
    from clipft.data.datamodule import TrainingOrder

    def batches(rank: int, start: int, epochs: int) -> list[list[int]]:
        order = TrainingOrder(size=103, world=2, rank=rank, seed=7, batch_size=8)  # 51 per rank: 6 batches
        order.start_at(start)
        loader = DataLoader(range(103), batch_size=8, sampler=order, drop_last=True)
        return [b.tolist() for _ in range(epochs) for b in loader]

    for rank in range(2):
        whole = batches(rank, 0, 3)
        assert len(whole) == 18
        for start in (4, 6, 11):  # mid-epoch, an epoch boundary, mid second epoch
            assert batches(rank, start, 2) == whole[start:][: len(batches(rank, start, 2))], (rank, start)
            assert batches(rank, start, 1) == whole[start:(start // 6 + 1) * 6]  # the rest of that epoch
    first, second = TrainingOrder(103, 2, 0, 7, 8), TrainingOrder(103, 2, 1, 7, 8)
    assert len(set(first)) == len(set(second)) == 51 and not set(first) & set(second)
    assert batches(0, 0, 2)[6:] != batches(0, 0, 1)  # the next epoch is another permutation
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainingOrder(size=10, world=2, rank=0, seed=0, batch_size=8)


def test_training_order_resumes_on_another_number_of_devices() -> None:
    """The stream's place is counted in samples: 3 batches of 8 on 2 ranks (48 samples of the
    epoch's permutation) resumed on 1 rank (or 1 -> 2) skips exactly those 48, and the resumed
    run then sees the rest of the epoch once, in the permutation's order."""
    from clipft.data.datamodule import TrainingOrder

    def seen(world: int, batches: int, batch_size: int = 8, start: tuple[int, int] = (0, 0)) -> list[int]:
        out: list[int] = []
        for rank in range(world):
            order = TrainingOrder(size=103, world=world, rank=rank, seed=7, batch_size=batch_size)
            order.start_at(0, *start)
            out += list(order)[: batches * batch_size]
        return out

    epoch = torch.randperm(103, generator=torch.Generator().manual_seed(7)).tolist()
    for before, after in ((2, 1), (1, 2)):
        first = seen(before, 3)
        assert sorted(first) == sorted(epoch[: 24 * before])
        order = TrainingOrder(size=103, world=before, rank=0, seed=7, batch_size=8)
        position = order.advance(0, 0, 3)  # what the datamodule saves in the checkpoint
        assert position == (0, 24 * before)
        rest = seen(after, (103 - 24 * before) // (8 * after), start=position)
        assert not set(first) & set(rest)  # nothing seen twice
        assert sorted(first + rest) == sorted(epoch[: 24 * before + len(rest)])
    # past the end of an epoch: the next epoch, from its start
    assert TrainingOrder(103, 2, 0, 7, 8).advance(0, 0, 6) == (1, 0)
    assert TrainingOrder(103, 1, 0, 7, 8).advance(0, 96, 0) == (1, 0)  # 7 left: less than a batch
    assert TrainingOrder(103, 1, 0, 7, 8).advance(0, 48, 7) == (1, 8)  # 6 batches to the end, 1 into epoch 1


def test_training_batches_carry_each_pairs_own_negatives() -> None:
    """data.negatives.count = K: row i of a shuffled training batch holds K negatives made from
    caption i (an object added after it, or at most two words changed in place), tokenized in
    place, with a validity mask; validation batches carry none."""

    cfg = load_config(None, ["data.synthetic.train_size=64", "data.batch_size=16", "data.num_workers=0",
                             "data.negatives.count=3"])
    bundle = build_model(cfg.model)
    dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.negative_texts.shape[:2] == (16, 3) and batch.negative_valid.shape == (16, 3)
    for i, (caption, row) in enumerate(zip(batch.captions, batch.negative_captions)):
        assert 1 <= len(row) <= 3 and batch.negative_valid[i].tolist() == [k < len(row) for k in range(3)]
        for k, negative in enumerate(row):
            assert negative != caption
            words, original = negative.split(), caption.split()
            changed = len(words) == len(original) and sum(a != b for a, b in zip(words, original)) <= 2
            assert changed or negative.startswith(caption + " "), (caption, negative)
            assert torch.equal(batch.negative_texts[i, k], bundle.tokenizer([negative])[0])
    again = next(iter(dm.train_dataloader()))
    assert again.negative_captions == batch.negative_captions  # seeded by the pair, not the draw
    assert next(iter(dm.val_dataloader())).negative_texts is None
    half = batch.chunks(10)[1]  # micro-batches slice the negatives with their pairs
    assert half.negative_captions == batch.negative_captions[10:] and torch.equal(half.negative_valid, batch.negative_valid[10:])


def test_negclip_tsv_negatives_load_unchanged(tmp_path: Path, bundle) -> None:
    """NegCLIP's published TSV layout (title, filepath, neg_caption as a Python list literal,
    neg_image): data.negatives.column reads each row's own list; a malformed cell is an
    error naming the file and line."""
    from clipft.data.table import DataError

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    lists = [["a dog riding a man", "a man riding a cat"], ['the "wrong" caption'], ["x y z", "z y x"], ["b a"]]
    rows = "".join(f"\t{i}\tcaption {i}\timg/{i}.png\t{lists[i]!r}\t[1, 2, 3]\n" for i in range(4))
    (tmp_path / "train.tsv").write_text("\tid\ttitle\tfilepath\tneg_caption\tneg_image\n" + rows)
    overrides = ["data.source=csv", f"data.train={tmp_path}/train.tsv", "data.batch_size=4", "data.caption_key=title",
                 "data.negatives.count=1", "data.negatives.column=neg_caption", "run.monitor=train/loss"]
    dm = ImageTextDataModule(load_config(None, overrides).data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    for caption, negatives in zip(batch.captions, batch.negative_captions):
        assert len(negatives) == 1 and negatives[0] in lists[int(caption.split()[-1])]
    assert batch.negative_valid.all()
    (tmp_path / "bad.tsv").write_text("title\tfilepath\tneg_caption\ncaption 0\timg/0.png\tnot a list\n")
    dm = ImageTextDataModule(load_config(None, [*overrides, f"data.train={tmp_path}/bad.tsv"]).data,
                             bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    with pytest.raises(DataError, match=r"bad.tsv, line 2: 'neg_caption' is not a list of captions"):
        dm.prepare_sources()


def test_style_augmentation_changes_looks_but_not_hue(bundle) -> None:
    """data.train_transform=style: random brightness, contrast, saturation, blur, grayscale and
    scale, but a red shape never turns green or blue (hue carries meaning in emoji)."""
    from clipft.data.transforms import style_augment

    torch.manual_seed(0)
    array = np.full((32, 32, 3), 255, dtype=np.uint8)
    array[8:24, 8:24] = (220, 30, 30)  # a red square on white
    transform = style_augment(bundle.preprocess_val, fill=255)
    mean = torch.tensor(bundle.preprocess_val.transforms[-1].mean).view(3, 1, 1)
    std = torch.tensor(bundle.preprocess_val.transforms[-1].std).view(3, 1, 1)
    centres = torch.stack([(transform(Image.fromarray(array)) * std + mean)[:, 16, 16] for _ in range(200)])  # [200, RGB]
    red, green, blue = centres.unbind(dim=1)
    assert bool((red >= green - 1e-3).all() and (red >= blue - 1e-3).all())  # never another hue
    grey = (red - green).abs() < 1e-3
    assert 5 <= int(grey.sum()) <= 45  # grayscale p = 0.1 of 200 draws (binomial: 20 ± 4.2)
    assert float(red[~grey].std()) > 0.02 and float((red - green)[~grey].min()) > 0.1  # jittered, still red
    cfg = load_config(None, ["data.train_transform=style", "data.pad_fill=255"])
    dm = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    assert dm.preprocess_train.transforms[-1] is bundle.preprocess_val


def test_stroke_width_thickens_or_thins_dark_lines() -> None:
    import random

    from clipft.data.transforms import StrokeWidth

    array = np.full((32, 32, 3), 255, dtype=np.uint8)
    array[:, 15] = 0  # a one-pixel dark vertical line
    random.seed(0)
    dark = {int((np.asarray(StrokeWidth()(Image.fromarray(array)))[..., 0] < 128).sum()) for _ in range(20)}
    assert dark == {0, 3 * 32}  # max filter: the line is gone; min filter: three pixels wide
