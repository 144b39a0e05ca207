"""A CSV logger that continues ``metrics.csv`` when a run resumes.

Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts, so a resumed run
would lose its history. This one keeps the rows up to the step of the checkpoint it resumes
from (rows logged after that checkpoint, by an interrupted run, are dropped: they are
trained again) and appends the new ones.
"""

from __future__ import annotations

import csv
import os
from typing import Optional

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_until_step: Optional[int]) -> None:
        self._keep_until_step = keep_until_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self._keep_until_step is None:  # a new run in a used folder: start afresh
            os.remove(path)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= self._keep_until_step]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(keys)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger(save_dir=run_dir, name="", version="")`` that keeps history on resume."""

    def __init__(self, run_dir: str, keep_until_step: Optional[int] = None) -> None:
        super().__init__(save_dir=run_dir, name="", version="")
        self._keep_until_step = keep_until_step

    @property
    @rank_zero_experiment  # other ranks get a dummy: only rank 0 touches metrics.csv
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_until_step)
        return self._experiment
