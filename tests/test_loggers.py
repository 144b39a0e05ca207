"""run.loggers: TensorBoard and MLflow hold what metrics.csv holds (same metrics, steps and
values), the recipe is logged once as hyper-parameters, the plots as images; a resume continues
the same TensorBoard folder and MLflow run; bad or uninstalled loggers fail in one line before a
run starts; Lightning's tips stay quiet."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipft import loggers as clipft_loggers
from clipft import runner
from clipft.cli import main
from clipft.config import ConfigError, load_config
from clipft.models import read_training_state
from conftest import FAST_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
# 6 steps, validated after steps 3 and 6, every step logged; a resume goes on to 9
RUN = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "eval.compositional.source=null",
       "run.plot=true", "data.synthetic.val_size=64"]
LOGGERS = "run.loggers=[csv,tensorboard,mlflow]" if HAVE_MLFLOW else "run.loggers=[csv,tensorboard]"


def csv_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of metrics.csv, epoch included (the loggers get it too)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with (run_dir / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value:
                    series[key].append((int(row["step"]), float(value)))
    return dict(series)


def tensorboard(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def tensorboard_hparams(run_dir: Path) -> list[dict[str, Any]]:
    """Every HParams session-start record in the event files (one per logging of the recipe)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    found.append({k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()})
    return found


def mlflow_run(run_dir: Path) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per run folder, resumed or not"
    return client, runs[0]


def assert_same_series(got: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]], who: str) -> None:
    assert sorted(got) == sorted(expected), f"{who}: other metrics than metrics.csv's"
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], f"{who}: {key} steps"
        # TensorBoard keeps float32
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), f"{who}: {key}"


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit with the loggers (the expensive part, shared; tests only read its folder)."""
    out = tmp_path_factory.mktemp("loggers")
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    overrides = [*FAST_OVERRIDES, *RUN, LOGGERS, f"run.out_dir={out}"]
    cfg = load_config(QUICKSTART, overrides)
    run_dir = Path(runner.fit(cfg)["run_dir"])
    assert os.environ.get("MLFLOW_TRACKING_URI") == user_uri  # MLflow's pointer to the run's store is gone
    return {"cfg": cfg, "run_dir": run_dir, "overrides": overrides}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard(run_dir)
    return {k: [(e.step, e.value) for e in events.Scalars(k)] for k in events.Tags()["scalars"]}


def mlflow_series(client: Any, run: Any) -> dict[str, list[tuple[int, float]]]:
    return {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))]
        for key in run.data.metrics
    }


def test_tensorboard_holds_the_values_of_metrics_csv(first: dict[str, Any]) -> None:
    expected = csv_series(first["run_dir"])
    assert max(s for s, _ in expected["train/loss"]) == 5 and len(expected["val/retrieval/i2t_r1"]) == 2  # steps 0..5
    assert_same_series(scalars(first["run_dir"]), expected, "tensorboard")


@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow not installed (the dev extra installs it)")
def test_mlflow_holds_the_values_of_metrics_csv(first: dict[str, Any]) -> None:
    client, run = mlflow_run(first["run_dir"])
    assert run.info.run_name == first["run_dir"].name and run.info.status == "FINISHED"
    assert_same_series(mlflow_series(client, run), csv_series(first["run_dir"]), "mlflow")
    assert sorted(p.path for p in client.list_artifacts(run.info.run_id, "plots")) == ["plots/curves.png", "plots/gap.png"]
    assert (first["run_dir"] / "mlartifacts").is_dir()  # artifacts inside the run folder, not ./mlruns


def test_the_recipe_is_logged_once_as_flat_hyperparameters(first: dict[str, Any]) -> None:
    params = clipft_loggers.flat_recipe(first["cfg"])
    assert params["optim.lr"] == 1e-3 and params["eval.zeroshot.0.name"] == "shape" and params["run.resume"] is None
    sessions = tensorboard_hparams(first["run_dir"])
    assert len(sessions) == 1, "hyper-parameters logged once, not per Trainer call"
    assert sessions[0]["optim.lr"] == pytest.approx(1e-3) and sessions[0]["data.batch_size"] == 32
    assert set(sessions[0]) == set(params)
    assert yaml.safe_load((first["run_dir"] / "hparams.yaml").read_text()) == params
    if HAVE_MLFLOW:
        _, run = mlflow_run(first["run_dir"])
        assert run.data.params == {k: str(v)[:250] for k, v in params.items()}  # Lightning's MLflow limit


def test_plots_are_tensorboard_images(first: dict[str, Any]) -> None:
    events = tensorboard(first["run_dir"])
    assert sorted(events.Tags()["images"]) == ["plots/curves", "plots/gap"]
    curves = events.Images("plots/curves")
    assert [c.step for c in curves] == [5]  # at the end of the run, at its last logged step
    assert curves[0].width > 100 and curves[0].encoded_image_string.startswith(b"\x89PNG")


def test_a_resume_continues_the_same_tensorboard_folder_and_mlflow_run(first: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "moved"  # a copy: the other tests read the original
    shutil.copytree(first["run_dir"], run_dir)
    run_id = mlflow_run(run_dir)[1].info.run_id if HAVE_MLFLOW else None
    runner.fit(load_config(QUICKSTART, [*first["overrides"], "trainer.max_steps=9", f"run.resume={run_dir}"]))
    expected = csv_series(run_dir)
    assert max(s for s, _ in expected["train/loss"]) == 8
    assert_same_series(scalars(run_dir), expected, "tensorboard after resume")
    assert len(tensorboard_hparams(run_dir)) == 1  # not logged again
    assert [c.step for c in tensorboard(run_dir).Images("plots/curves")] == [5, 8]
    if HAVE_MLFLOW:
        client, run = mlflow_run(run_dir)  # still one run in the store, the same one
        assert run.info.run_id == run_id
        assert_same_series(mlflow_series(client, run), expected, "mlflow after resume")


def test_unknown_logger_is_one_line_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["run.loggers=[csv,mlfow]"])
    assert str(err.value) == "run.loggers='mlfow' is not one of: csv, tensorboard, mlflow, wandb; did you mean mlflow?"


@pytest.mark.parametrize("name, extra", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_optional_package_is_one_line_before_the_run(
    name: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(clipft_loggers.importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    code = main(["fit", QUICKSTART, f"run.loggers=[csv,{name}]", f"run.out_dir={tmp_path}"])
    assert code == 2
    assert capsys.readouterr().err == f"clipft: error: run.loggers: {name} needs `pip install 'clipft[{extra}]'`\n"
    assert list(tmp_path.iterdir()) == []  # no run folder, no model built


def test_mlflow_tracking_uri_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    cfg = load_config(QUICKSTART, ["run.loggers=[mlflow]"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a tracking server (not contacted here)
    (tmp_path / "run").mkdir()
    built = clipft_loggers.build_loggers(cfg, tmp_path / "run", continuing=False, resume_state={})
    assert [type(lg) for lg in built][1:] == [MLFlowLogger]  # after metrics.csv's, always on
    assert built[1]._tracking_uri == "http://127.0.0.1:5000" and list((tmp_path / "run").iterdir()) == []


def test_wandb_is_offline_unless_logged_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not clipft_loggers.wandb_logged_in()  # no netrc file
    netrc.write_text("machine example.org login user password secret\n")
    assert not clipft_loggers.wandb_logged_in()
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert clipft_loggers.wandb_logged_in()  # what `wandb login` writes
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not clipft_loggers.wandb_logged_in()  # a key for another server
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert clipft_loggers.wandb_logged_in()


def test_lightning_tips_are_silenced_and_its_other_lines_kept(caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
    rank_zero_info("TPU available: False, using: 0 TPU cores")
    rank_zero_info("Loading `train_dataloader` to estimate number of stepping batches.")
    rank_zero_info("GPU available: True (cuda), used: True")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: True (cuda), used: True"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install 'clipft[wandb]')")
def test_wandb_logs_offline_into_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:


    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(QUICKSTART, [*FAST_OVERRIDES, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                   "eval.compositional.source=null", "eval.zeroshot=[]", "run.loggers=[wandb]",
                                   f"run.out_dir={tmp_path}/runs", "data.synthetic.val_size=32"])
    run_dir = Path(runner.fit(cfg)["run_dir"])
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    assert "WANDB_MODE" not in os.environ  # the next run decides afresh
    # the checkpoint records the W&B run id, which a resume continues
    state = read_training_state(run_dir / "checkpoints" / "last.ckpt")["callbacks"]["TrackingRunsInCheckpoint"]
    assert offline[0].name.endswith("-" + state["tracking_runs"]["wandb"])


def test_the_progress_bar_shows_samples_per_second_and_no_run_id() -> None:
    from types import SimpleNamespace

    assert clipft_loggers.progress_bar(load_config(QUICKSTART, ["trainer.enable_progress_bar=false"])) == []
    (bar,) = clipft_loggers.progress_bar(load_config(QUICKSTART, ["run.loggers=[csv,mlflow]"]), rate=lambda: 123.4)
    trainer = SimpleNamespace(loggers=[SimpleNamespace(version=""), SimpleNamespace(version="0123456789abcdef")],
                              progress_bar_metrics={"train/loss": 1.5}, training=True)
    # Lightning's bar would show v_num: cdef
    assert bar.get_metrics(trainer, None) == {"train/loss": 1.5, "samples/s": "123"}
    trainer.training = False  # validating: no training throughput
    assert bar.get_metrics(trainer, None) == {"train/loss": 1.5}
