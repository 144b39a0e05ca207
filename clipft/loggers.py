"""The loggers of a run (``run.loggers``, docs/logging.md), all through Lightning's own classes
and all writing inside the run folder:

* csv: ``metrics.csv`` (:class:`clipft.logs.ContinuingCSVLogger`), always on: the curves, the
  report and a resume read it;
* tensorboard: ``<run>/tensorboard/``; a resumed run writes on in the same folder and hides
  what the interrupted run logged past its checkpoint (SummaryWriter's ``purge_step``), as
  metrics.csv drops those rows;
* mlflow: a SQLite store ``<run>/mlflow.db`` (artifacts in ``<run>/mlartifacts/``) unless
  ``MLFLOW_TRACKING_URI`` is set; a resumed run continues the same MLflow run;
* wandb: offline (``<run>/wandb/``, upload later with ``wandb sync``) unless this machine is
  logged in (``WANDB_API_KEY``, or a netrc entry from ``wandb login``) or ``WANDB_MODE`` says
  otherwise; a resumed run continues the same W&B run id.

The resolved recipe is logged once per run, as flat ``section.key`` hyper-parameters, and the
PNG plots (training curves, gap projection) as images at the end of a run.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from clipft.config import ConfigError, RunConfig, to_dict
from clipft.logs import ContinuingCSVLogger

log = logging.getLogger("clipft")

# name in run.loggers -> (module to import, what installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),  # a dependency of clipft itself
    "mlflow": ("mlflow", "pip install 'clipft[mlflow]'"),
    "wandb": ("wandb", "pip install 'clipft[wandb]'"),
}
MLFLOW_DB = "mlflow.db"
# the stores clipft chose: MLflow puts the URI it logs to into MLFLOW_TRACKING_URI (for its
# subprocesses), which is then not the user's choice for the next run in this process
_CHOSEN_URIS: set[str] = set()
TRACKING_STATE_KEY = "tracking_runs"


def check_installed(cfg: RunConfig) -> None:
    """Every logger ``run.loggers`` names can be imported: one line naming what to install
    otherwise, before anything else of the run starts."""
    for name in cfg.run.loggers:
        module, install = PACKAGES.get(name, (None, ""))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.loggers: {name} needs `{install}`")


def _launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, Lightning's own
    launcher), before Lightning's strategy knows it: the tracking stores are opened by the
    process of global rank 0 alone (the other ranks log nothing)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0) + int(os.environ.get("LOCAL_RANK") or 0)


def flat_recipe(cfg: RunConfig) -> dict[str, Any]:
    """The resolved recipe as ``{"optim.lr": 1e-3, "eval.zeroshot.0.name": "shape", ...}``:
    keys a command line overrides (MLflow allows no brackets). An empty list or mapping is the
    string ``[]``/``{}`` (the loggers' own flattening would drop it)."""

    def walk(tree: Any, key: str) -> dict[str, Any]:
        if isinstance(tree, dict) and tree:
            return {k: v for name, value in tree.items() for k, v in walk(value, f"{key}.{name}" if key else name).items()}
        if isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
            return {k: v for i, item in enumerate(tree) for k, v in walk(item, f"{key}.{i}").items()}
        return {key: str(tree) if isinstance(tree, (list, dict)) and not tree else tree}

    return walk(to_dict(cfg), "")


def build_loggers(
    cfg: RunConfig,
    run_dir: Path,
    continuing: bool,
    resume_state: dict[str, Any],
    keep_rows: Optional[int] = None,
    keep_before_step: Optional[int] = None,
) -> list[Logger]:
    """metrics.csv first (``trainer.logger`` is the CSV logger), then the others of
    ``run.loggers``. ``continuing``: a resumed run in its own run folder, whose checkpoint
    (``resume_state``) recorded the MLflow and W&B runs to continue."""
    names = set(cfg.run.loggers)
    loggers: list[Logger] = [ContinuingCSVLogger(str(run_dir), keep_rows=keep_rows, keep_before_step=keep_before_step)]
    step = int(resume_state.get("global_step") or 0)
    recorded = ((resume_state.get("callbacks") or {}).get(TrackingRunsInCheckpoint.__qualname__) or {}).get(TRACKING_STATE_KEY) or {}
    if not continuing:
        recorded = {}
    if "tensorboard" in names:
        # purge_step: TensorBoard hides the events of steps >= the checkpoint's that the
        # interrupted run wrote before it stopped (the resumed run logs them again)
        purge = {"purge_step": step} if continuing and step else {}
        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version="", default_hp_metric=False, **purge))
    if _launch_rank() != 0:
        return loggers
    if "mlflow" in names:
        loggers.append(_mlflow_logger(cfg, run_dir, recorded.get("mlflow")))
    if "wandb" in names:
        loggers.append(_wandb_logger(cfg, run_dir, recorded.get("wandb")))
    return loggers


def _mlflow_logger(cfg: RunConfig, run_dir: Path, run_id: Optional[str]) -> MLFlowLogger:
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if user_uri in _CHOSEN_URIS:
        user_uri = None
    uri = user_uri or f"sqlite:///{run_dir.resolve() / MLFLOW_DB}"
    if not user_uri:
        _CHOSEN_URIS.add(uri)
    return MLFlowLogger(
        experiment_name=cfg.run.name,
        run_name=run_dir.name if not user_uri else f"{cfg.run.name}/{run_dir.name}",
        tracking_uri=uri,
        tags={"clipft.run_dir": str(run_dir.resolve())},
        # the store's default artifact root is ./mlruns of the working directory
        artifact_location=None if user_uri else (run_dir.resolve() / "mlartifacts").as_uri(),
        run_id=run_id if run_id and _mlflow_run_exists(logger_uri=uri, run_id=run_id) else None,
    )


def _mlflow_run_exists(logger_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(logger_uri).get_run(run_id)
        return True
    except MlflowException:
        log.warning("run.loggers: MLflow run %s is not in %s; the resumed run starts a new MLflow run", run_id, logger_uri)
        return False


def wandb_logged_in() -> bool:
    """An API key for the W&B server this process would talk to: ``WANDB_API_KEY`` (or an
    identity token file), or an entry for its host in the netrc file ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _wandb_logger(cfg: RunConfig, run_dir: Path, run_id: Optional[str]) -> WandbLogger:
    offline = not os.environ.get("WANDB_MODE") and not wandb_logged_in()
    if offline:  # Lightning then sets WANDB_MODE=dryrun for this process (close() clears it)
        log.info("run.loggers: wandb logs offline to %s (not logged in; `wandb sync` uploads it later)", run_dir / "wandb")
    return WandbLogger(
        name=run_dir.name, project=os.environ.get("WANDB_PROJECT") or cfg.run.name, save_dir=str(run_dir),
        id=run_id, offline=offline,
    )


class RecipeAsHyperparameters(L.Callback):
    """Logs the resolved recipe to every logger once, when the run's first Trainer call sets
    up (rank 0; Lightning's own per-call hyper-parameter logging is off). A resumed run does
    not log it again: the run's hparams.yaml and trackers keep what it started with (the
    changes are in config.resumed.yaml)."""

    def __init__(self, cfg: RunConfig, log_now: bool) -> None:
        self.params = flat_recipe(cfg)
        self.monitor = cfg.run.monitor
        self.pending = log_now

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.pending:
            return
        self.pending = False
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.params)
                if isinstance(logger, TensorBoardLogger):
                    self._tensorboard_hparams(logger)
                logger.save()

    def _tensorboard_hparams(self, logger: TensorBoardLogger) -> None:
        """The HParams dashboard entry, with run.monitor as its metric (its values are the
        scalars logged under that name). Lightning writes this entry only together with a
        placeholder metric value (hp_metric), which would be a metric the run never measured."""
        from torch.utils.tensorboard.summary import hparams

        params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.params.items()}
        writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams does
        for summary in hparams(params, {self.monitor: None}):
            writer.add_summary(summary)


class TrackingRunsInCheckpoint(L.Callback):
    """Records in every checkpoint the MLflow run id and the W&B run id of this run, so that a
    resume continues them."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return {}
        runs: dict[str, str] = {}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                runs["mlflow"] = logger.run_id
            elif isinstance(logger, WandbLogger) and logger.version:
                runs["wandb"] = str(logger.version)
        return {TRACKING_STATE_KEY: runs} if runs else {}


def log_plots(trainer: L.Trainer, plots: dict[str, Path]) -> None:
    """The run's PNG plots to every logger that shows images (rank 0, at the end of a run):
    TensorBoard images, MLflow artifacts under plots/, W&B images."""
    if not trainer.is_global_zero:
        return
    plots = {k: Path(p) for k, p in plots.items() if p is not None and Path(p).is_file()}
    if not plots:
        return
    # the step of the run's last logged metrics (rows carry the 0-based step trained); a resume
    # from this run's last checkpoint hides nothing at or before it
    step = max(trainer.global_step - 1, 0)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            for key, path in plots.items():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                logger.experiment.add_image(f"plots/{key}", pixels, global_step=step, dataformats="HWC")
            logger.experiment.close()  # Lightning closed it once already; the images reopen it
        elif isinstance(logger, MLFlowLogger):
            for path in plots.values():
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="plots")
        elif isinstance(logger, WandbLogger):
            for key, path in plots.items():
                logger.log_image(key=f"plots/{key}", images=[str(path)], step=step)


class _ClipftBar:
    """Lightning's progress bar (Rich or tqdm, as Lightning chooses) without "v_num" (the
    logger's version: the last characters of an MLflow or W&B run id; the run folder names the
    run) and with the training throughput when the run measures it."""

    rate: Optional[Callable[[], Optional[float]]] = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        value = self.rate() if self.rate is not None else None
        if value is not None and trainer.training:
            items["samples/s"] = f"{value:.0f}"
        return items


class RichBar(_ClipftBar, RichProgressBar):
    pass


class TQDMBar(_ClipftBar, TQDMProgressBar):
    pass


def progress_bar(cfg: RunConfig, rate: Optional[Callable[[], Optional[float]]] = None) -> list[L.Callback]:
    """The run's progress bar (none with trainer.enable_progress_bar=false); ``rate``: samples/s."""
    if not cfg.trainer.enable_progress_bar:
        return []
    rich = importlib.util.find_spec("rich") is not None  # Lightning's own choice of bar
    bar = RichBar() if rich else TQDMBar()
    bar.rate = rate
    return [bar]


def close(trainer: L.Trainer) -> None:
    """Ends the W&B run of this process and MLflow's pointer to this run's store, so that the
    next run in the same process (a notebook, a test) starts its own (Lightning closes the
    MLflow run and the TensorBoard files)."""
    if not trainer.is_global_zero:
        return
    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if wandb_loggers:
        import wandb

        wandb.finish()
        if any(lg._offline for lg in wandb_loggers) and os.environ.get("WANDB_MODE") == "dryrun":
            del os.environ["WANDB_MODE"]  # set by Lightning's WandbLogger for its offline run
    if os.environ.get("MLFLOW_TRACKING_URI") in _CHOSEN_URIS:
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # also clears the variable


class _DropLightningNoise(logging.Filter):
    """Lines a clipft user did not ask for: Lightning's advertisement tips, the TPU line on
    machines without one, the note on counting batches, and the notices of MLflow creating
    the experiment and the tables of a new store in the run folder."""

    NOISE = (
        "💡 Tip:",
        "TPU available: False",
        "Loading `train_dataloader` to estimate number of stepping batches.",
        "Experiment with name ",
        "Creating initial MLflow database tables",
        "Updating database tables",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(self.NOISE)


def quiet_lightning() -> None:
    """Installs the filter once on the loggers those lines come from."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.loggers.mlflow", "mlflow.store.db.utils"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningNoise) for f in target.filters):
            target.addFilter(_DropLightningNoise())
