"""The real CLI entry point: help, info, errors, a short fit that must learn, resume,
validate a checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clipft.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["validate", "--help"], ["info", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: clipft" in out and ("key=value" in out or "fit" in out)


def test_info_prints_config_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", QUICKSTART, "optim.lr=0.002", "model.lock_image=true"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.002" in out and "name: clipft-tiny-vit" in out
    assert "image  total       111,616  trainable             0" in out
    assert "total  total     3,379,969  trainable     3,268,353" in out


def test_bad_key_exits_2_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", QUICKSTART, "optim.lrate=1"]) == 2
    assert "unknown key 'optim.lrate'; did you mean optim.lr?" in capsys.readouterr().err


def val_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open() as f:
        return [r for r in csv.DictReader(f) if r.get("val/loss")]


def test_fit_learns_resumes_and_validates(fast_overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # 20 batches of 32 per epoch, validation after each epoch
    assert main(["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=60", "optim.warmup_fraction=0.1"]) == 0
    run_dirs = list(Path(fast_overrides[-1].split("=", 1)[1]).glob("quickstart/*"))
    assert len(run_dirs) == 1
    run = run_dirs[0]
    for name in ("config.yaml", "metrics.csv", "report.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 60 and report["method"] == "finetune"
    rows = val_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [19, 39, 59]
    first, last = rows[0], rows[-1]
    # it learns: the validation loss falls and retrieval improves
    assert float(last["val/loss"]) < float(first["val/loss"]) - 0.3
    assert float(last["val/retrieval/i2t_r1"]) > float(first["val/retrieval/i2t_r1"])
    assert report["metrics"]["val/retrieval/i2t_r1"] == pytest.approx(float(last["val/retrieval/i2t_r1"]))
    assert 0.0 <= report["metrics"]["val/zeroshot/shape/top1"] <= 1.0
    # checkpoints load with weights_only=True (plain hyper-parameters)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 60 and ckpt["hyper_parameters"]["config"]["optim"]["warmup_fraction"] == 0.1

    # an interrupted run (stopped at step 35, mid-epoch) resumes in the same folder
    assert main(["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=35", "run.name=interrupted"]) == 0
    interrupted = next(run.parent.parent.glob("interrupted/*"))
    assert torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 35
    assert main(["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=60", "run.name=interrupted", "run.resume=last"]) == 0
    assert list(interrupted.parent.iterdir()) == [interrupted]
    resumed = json.loads((interrupted / "report.json").read_text())
    assert resumed["steps"] == 60 and resumed["resumed_from"].endswith("last.ckpt")
    steps = [int(r["step"]) for r in val_rows(interrupted / "metrics.csv")]
    assert steps[:2] == [19, 35] and steps[-1] == 59  # history kept, new rows appended

    # validating the best checkpoint again reproduces its retrieval score
    # report.json gives checkpoint paths relative to the run folder
    assert (report["best_checkpoint"], report["last_checkpoint"]) == ("checkpoints/best.ckpt", "checkpoints/last.ckpt")
    best = str(run / report["best_checkpoint"])
    best_score = torch.load(best, weights_only=True)["callbacks"]
    capsys.readouterr()
    assert main(["validate", QUICKSTART, *fast_overrides, "--ckpt", best]) == 0
    validated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]
    metrics = json.loads(Path(validated).read_text())["metrics"]
    monitored = [v for k, v in best_score.items() if "val/retrieval/i2t_r1" in k][0]["best_model_score"]
    # the same weights give the same score; one query (1/96) of slack for a floating-point tie
    # that may rank differently between two runs
    assert metrics["val/retrieval/i2t_r1"] == pytest.approx(float(monitored), abs=1 / 96 + 1e-6)


def test_interrupted_checkpoint_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    from clipft.config import load_config
    from clipft.methods import build_method

    method = build_method(load_config(None, []))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(method)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_console_script_and_module_entry_point() -> None:
    import shutil
    import subprocess
    import sys

    script = shutil.which("clipft", path=str(Path(sys.executable).parent))
    commands = [[sys.executable, "-m", "clipft", "--help"]] + ([[script, "fit", "--help"]] if script else [])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage: clipft" in result.stdout


def test_two_process_ddp_fit_on_cpu(fast_overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Lightning re-runs the command for rank 1; both ranks share one run folder. Each rank
    evaluates its shard of the validation pairs and of the zero-shot images (97 and 65: the
    shards are uneven); gathered, every sample counts once, so the numbers equal a
    one-process evaluation of the same weights."""
    import subprocess
    import sys

    out = Path(fast_overrides[-1].split("=", 1)[1])
    sizes = ["data.synthetic.val_size=97", "eval.zeroshot=[{name: shape, task: shape, size: 65, ensemble: max}]"]
    command = [
        sys.executable, "-m", "clipft", "fit", QUICKSTART, *fast_overrides, *sizes,
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=12",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list(out.glob("quickstart/*"))
    assert len(runs) == 1
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["steps"] == 12 and 0 < report["metrics"]["val/loss"] < 10
    last = runs[0] / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 12
    two = report["metrics"]
    assert two["val/gap/n_pairs"] == 97 and two["val/retrieval/n_images"] == 97

    capsys.readouterr()
    assert main(["validate", QUICKSTART, *fast_overrides, *sizes, "--ckpt", str(last)]) == 0
    validated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]
    one = json.loads(Path(validated).read_text())["metrics"]
    for key in ("val/retrieval/i2t_r1", "val/retrieval/t2i_r5", "val/gap/centroid_distance", "val/zeroshot/shape/top1"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


def test_validate_writes_every_section(fast_overrides: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [*fast_overrides, "eval.compositional.size=40"]
    assert main(["validate", QUICKSTART, *overrides]) == 0  # the recipe's starting model
    report_path = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"])
    run = report_path.parent
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    for key in ("val/loss", "val/retrieval/i2t_r1", "val/zeroshot/shape/top1", "val/compositional/SWAP",
                "val/gap/centroid_distance", "val/gap/linear_separability", "val/gap/uniformity_union"):
        assert key in metrics, key
    # the values: each section's numbers agree with each other and with what they count
    m = {k.removeprefix("val/"): v for k, v in metrics.items()}
    assert m["retrieval/n_images"] == m["gap/n_images"] == m["gap/n_pairs"] == 96  # data.synthetic.val_size
    assert 0 < m["retrieval/n_texts"] <= 96  # distinct captions
    for direction in ("i2t", "t2i"):
        assert 0 <= m[f"retrieval/{direction}_r1"] <= m[f"retrieval/{direction}_r5"] <= m[f"retrieval/{direction}_r10"] <= 1
    assert m["retrieval/mean_r1"] == pytest.approx((m["retrieval/i2t_r1"] + m["retrieval/t2i_r1"]) / 2)
    assert m["retrieval/i2t_r10"] < 0.5  # the recipe starts from a random initialisation: near chance
    assert 0 <= m["zeroshot/shape/top1"] <= m["zeroshot/shape/top5"] <= 1
    assert 0 < m["zeroshot/shape/mean_per_class_recall"] <= 1
    from clipft.eval.compositional import GROUPS

    for group, members in GROUPS.items():
        assert m[f"compositional/{group}"] == pytest.approx(sum(m[f"compositional/{s}"] for s in members) / len(members))
    assert m["gap/centroid_mse"] == pytest.approx(m["gap/centroid_distance"] ** 2 / 64, rel=1e-5)  # D = 64
    assert 0 < m["gap/centroid_distance"] <= m["gap/mean_pair_distance"] <= 2  # ‖mean of Δ‖ <= mean of ‖Δ‖
    assert m["gap/alignment"] >= m["gap/mean_pair_distance"] ** 2 - 1e-6  # mean of ‖Δ‖² >= (mean of ‖Δ‖)²
    assert 0.5 <= m["gap/linear_separability"] <= 1 and -4 <= m["gap/uniformity_union"] <= 0
    assert m["loss"] > 0
    markdown = (run / "report.md").read_text()
    for title in ("## Retrieval", "## Zero-shot", "## Compositional", "## Modality gap", "![modality gap](gap.png)"):
        assert title in markdown, title
    assert (run / "gap.png").stat().st_size > 10_000
    assert not (run / "checkpoints").exists()  # validate writes no checkpoints


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    from clipft.config import load_config
    from clipft.runner import new_run_dir

    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    folders = [new_run_dir(cfg) for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)
