"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE=1 for the whole session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

import torch  # noqa: E402

import clipft.methods  # noqa: E402,F401  (every method registers its settings, as the CLI does)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small enough for seconds-long runs: 16 px would starve the ViT, so keep 32 px but few samples.
FAST_OVERRIDES = [
    "data.batch_size=32",
    "data.synthetic.train_size=640",
    "data.synthetic.val_size=96",
    "eval.zeroshot=[{name: shape, task: shape, size: 64, ensemble: max}]",
    "trainer.enable_progress_bar=false",
    "run.plot=false",
    "trainer.val_check_interval=20",
    "data.num_workers=0",
]


@pytest.fixture
def fast_overrides(tmp_path: pytest.TempPathFactory) -> list[str]:
    return [*FAST_OVERRIDES, f"run.out_dir={tmp_path}/runs"]
