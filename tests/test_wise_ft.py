"""``clipft wise-ft RUN``: WiSE-FT's interpolations of a run, scored on its evaluation sets; α = 1
is the run's own model and α = 0 its start; a random start is refused; nothing is overwritten
without --force."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from clipft.cli import main
from clipft.config import load_config


def write_set(folder: Path, blue: tuple[int, int, int]) -> Path:
    """Red, green and blue images captioned by their colour, a label column, a split file."""
    folder.mkdir(parents=True)
    rows = []
    for name, rgb in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", blue)):
        Image.new("RGB", (4, 4), rgb).save(folder / f"{name}.png")
        rows.append({"filepath": f"{name}.png", "title": f"an emoji of {name}", "colour": name, "id": name})
    with (folder / "captions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "splits.json").write_text(json.dumps({"test": ["red", "green", "blue"]}))
    return folder / "captions.csv"


def sets_override(table: Path) -> str:
    return (f"eval.sets=[{{name: clean, data: {table}, split_file: splits.json, split_key: id, split: test, "
            "zeroshot: [{name: colour, label_key: colour}]}, "
            f"{{name: all, data: {table}, shifted: true, zeroshot: [{{name: colour, label_key: colour}}]}}]")


def test_wise_ft_sweeps_a_run_on_its_sets(tmp_path: Path, fast_overrides: list[str], capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from clipft.runner import fit, validate

    table = write_set(tmp_path / "clean", (0, 0, 255))
    common = [*fast_overrides, sets_override(table), "model.pretrained=synthetic", "optim.lr=3e-3",
              "trainer.max_steps=4", "trainer.val_check_interval=4"]
    trained = fit(load_config(None, common))
    start = validate(load_config(None, common))["metrics"]
    run = trained["run_dir"]
    import clipft.wise_ft as module

    seen: dict[float, float] = {}
    real = module.evaluate_sets

    def spy(encoder, *args, **kwargs):  # the sum of the evaluated model's image projection, per α
        seen[[0, 0.5, 1][len(seen)]] = float(encoder.model.visual.proj.detach().double().sum())
        return real(encoder, *args, **kwargs)

    monkeypatch.setattr(module, "evaluate_sets", spy)
    assert main(["wise-ft", run, "--alphas", "0", "0.5", "1"]) == 0
    monkeypatch.undo()
    result = json.loads((Path(run) / "wise_ft.json").read_text())
    assert result["metric"] == "zeroshot/colour/top1" and [r["alpha"] for r in result["rows"]] == [0, 0.5, 1]
    assert result["sets"] == {"clean": "in-domain", "all": "shifted"}
    by_alpha = {r["alpha"]: r["metrics"] for r in result["rows"]}
    # α = 1 is the fine-tuned model, α = 0 the start: their metrics are the run's and the start's
    for key in ("val/sets/clean/retrieval/t2i_r1", "val/sets/all/retrieval/i2t_r5", "val/sets/mean/zeroshot/colour/top1"):
        assert by_alpha[1][key] == pytest.approx(trained["metrics"][key], abs=1e-6)
        assert by_alpha[0][key] == pytest.approx(start[key], abs=1e-6)
    # the weights evaluated at α = 0.5 are the midpoint of the start and the fine-tuned ones
    assert seen[0.5] == pytest.approx((seen[0] + seen[1]) / 2, rel=1e-5) and seen[0] != pytest.approx(seen[1])
    best = max(result["rows"], key=lambda r: r["mean"])
    assert result["best_alpha"] == best["alpha"] and best["in_domain"] == best["metrics"]["val/sets/clean/zeroshot/colour/top1"]
    markdown = (Path(run) / "wise_ft.md").read_text()
    assert f"Best α by the mean over the sets: **{best['alpha']:g}**" in markdown and "| clean (in-domain) |" in markdown
    assert (Path(run) / "wise_ft.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert f"best alpha by the mean: {best['alpha']:g}" in out
    # an existing table is kept unless --force
    assert main(["wise-ft", run, "--alphas", "1"]) == 2
    assert "wise_ft.json, wise_ft.md, wise_ft.png exist from an earlier sweep; pass --force" in capsys.readouterr().err
    assert main(["wise-ft", run, "--alphas", "1", "--force"]) == 0
    assert [r["alpha"] for r in json.loads((Path(run) / "wise_ft.json").read_text())["rows"]] == [1]


def test_wise_ft_refuses_a_random_start(tmp_path: Path, fast_overrides: list[str], capsys: pytest.CaptureFixture) -> None:
    from clipft.runner import fit

    table = write_set(tmp_path / "clean", (0, 0, 255))
    run = fit(load_config(None, [*fast_overrides, sets_override(table), "trainer.max_steps=1",
                                 "trainer.val_check_interval=1"]))["run_dir"]
    assert main(["wise-ft", run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the run started from random weights (model.pretrained is null)" in err
    assert not (Path(run) / "wise_ft.json").exists()
