"""trainer.compile: the towers compiled in place train to the same loss as eager ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipft import runner
from clipft.cli import main
from clipft.config import load_config
from clipft.data.datamodule import ImageTextDataModule
from clipft.losses import clip_contrastive_loss
from clipft.models import build_model
from clipft.models.factory import compile_towers

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def test_compiling_keeps_the_state_dict_keys() -> None:
    model = build_model(load_config(QUICKSTART).model).model
    keys = list(model.state_dict())
    assert compile_towers(model) == ["visual", "transformer"]
    assert list(model.state_dict()) == keys  # checkpoints and export see the same names


def test_the_run_compiles_the_trained_model_when_asked(fast_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []
    monkeypatch.setattr(runner, "compile_towers", lambda model: compiled.append(model) or ["visual"])
    assert main(["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=1", "trainer.val_check_interval=1"]) == 0
    assert compiled == []
    assert main(["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=1", "trainer.val_check_interval=1",
                 "trainer.compile=true"]) == 0
    assert len(compiled) == 1 and hasattr(compiled[0], "encode_image")


def _two_steps(compile_model: bool) -> list[float]:
    cfg = load_config(QUICKSTART, ["data.batch_size=32"])
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    model = bundle.model.train()
    if compile_model:
        compile_towers(model)
    data = ImageTextDataModule(cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=0)
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        image = F.normalize(model.encode_image(batch.images), dim=-1)
        text = F.normalize(model.encode_text(batch.texts), dim=-1)
        loss = clip_contrastive_loss(image, text, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # compiling the tiny towers takes about a minute on 2 CPU cores
def test_compiled_and_eager_training_give_the_same_loss() -> None:
    torch._dynamo.reset()
    eager, compiled = _two_steps(False), _two_steps(True)
    assert abs(eager[1] - eager[0]) > 1e-3  # the second step follows a real update
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
