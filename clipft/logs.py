"""A CSV logger that continues ``metrics.csv`` when a run resumes.

Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts, so a resumed run
would lose its history. This one keeps the rows of what the resumed run will not do again,
and appends the new ones, so that each (step, metric) appears once after a kill and a resume:

* rows of steps before the checkpoint's global step N. Rows are logged under the step that
  was trained (0-based), and Lightning writes a step's train row just *after* the checkpoint
  saved at the end of that step, so the row of step N-1 may come after checkpoint N; rows of
  step N and later were logged by a run that went on past the checkpoint, and the resumed
  run logs them again;
* every row logged before the checkpoint was written, whatever its step (a final validation
  at step N): each checkpoint records how many rows the file held then
  (:class:`LoggedRowsInCheckpoint`, which flushes the logger first).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

ROWS_KEY = "metrics_rows"


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_rows: Optional[int], keep_before_step: Optional[int]) -> None:
        self._keep_rows, self._keep_before_step = keep_rows, keep_before_step
        self.rows = 0  # data rows in metrics.csv
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self._keep_rows is None and self._keep_before_step is None:  # a new run in a used folder
            os.remove(path)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = list(reader)
        # rows of steps before the checkpoint's (a step's train row is logged just after the
        # checkpoint saved at its end), and every row logged before the checkpoint was written
        # (a final validation at its own step)
        step = self._keep_before_step if self._keep_before_step is not None else 0
        keep = self._keep_rows or 0
        rows = [r for i, r in enumerate(rows) if i < keep or (r.get("step") and int(float(r["step"])) < step)]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(keys)
        self.rows = len(rows)

    def save(self) -> None:
        pending = len(self.metrics)
        super().save()
        self.rows += pending


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger(save_dir=run_dir, name="", version="")`` that keeps history on resume: of
    an existing metrics.csv, the first ``keep_rows`` rows and the rows of steps before
    ``keep_before_step``; neither given: a new file."""

    def __init__(self, run_dir: str, keep_rows: Optional[int] = None, keep_before_step: Optional[int] = None) -> None:
        super().__init__(save_dir=run_dir, name="", version="")
        self._keep_rows, self._keep_before_step = keep_rows, keep_before_step

    @property
    @rank_zero_experiment  # other ranks get a dummy: only rank 0 touches metrics.csv
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_rows, self._keep_before_step)
        return self._experiment


class LoggedRowsInCheckpoint(L.Callback):
    """Records in every checkpoint how many rows metrics.csv holds when it is written (the
    logger is flushed first, so the file holds every row logged so far)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        logger = trainer.logger if trainer is not None else None
        if not isinstance(logger, ContinuingCSVLogger) or not trainer.is_global_zero:
            return {}
        logger.save()
        return {ROWS_KEY: logger.experiment.rows}


def logged_rows(training_state: dict[str, Any]) -> Optional[int]:
    """The metrics.csv row count a checkpoint recorded (None: not recorded)."""
    state = (training_state.get("callbacks") or {}).get(LoggedRowsInCheckpoint.__qualname__) or {}
    rows = state.get(ROWS_KEY)
    return int(rows) if rows is not None else None
