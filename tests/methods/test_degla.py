"""DeGLA: the EMA teacher's features, the four terms on the method's features, config checks
and a short run of the preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipft.config import ConfigError, load_config
from clipft.data.datamodule import CollatePairs
from clipft.losses import distillation_loss, image_grounded_contrast, text_grounded_contrast
from clipft.methods import build_method

CAPTIONS = ["a small red circle to the left of a large blue square", "a large green star",
            "a small cyan cross above a small yellow circle", "a large purple square below a small orange star"]


def test_terms_use_the_ema_teacher_and_each_samples_own_negatives() -> None:
    torch.manual_seed(0)
    method = build_method(load_config(None, ["method.name=degla", "model.pretrained=synthetic", "data.negatives.count=4"]))
    assert method.teacher is method.ema and method.cfg.method.ema_momentum == 0.9996
    batch = CollatePairs(method.tokenizer, method.cfg.data.negatives)(
        [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), c, str(i)) for i, c in enumerate(CAPTIONS)])
    features = method.batch_features(batch)
    terms = method.loss_terms(features, batch)
    assert terms["distill"].item() < 1e-10  # the EMA starts as the model
    with torch.no_grad():  # the student moves away from its teacher
        for param in method.model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    features = method.batch_features(batch)
    terms = method.loss_terms(features, batch)
    valid = batch.negative_valid
    torch.testing.assert_close(terms["igc"], image_grounded_contrast(features["image"], features["text"],
                                                                     features["negative_text"], valid, method.logit_scale))
    torch.testing.assert_close(terms["tgc"], text_grounded_contrast(features["text"], features["teacher_text"],
                                                                    features["negative_text"], valid))
    expected = distillation_loss([features["image"], features["text"], features["negative_text"].flatten(0, 1)],
                                 [features["teacher_image"], features["teacher_text"],
                                  features["teacher_negative_text"].flatten(0, 1)])
    torch.testing.assert_close(terms["distill"], expected)
    assert terms["distill"] > 0
    with pytest.raises(ConfigError, match="ema_momentum"):
        build_method(load_config(None, ["method.name=degla", "data.negatives.count=1", "method.ema_momentum=null"]))


def test_short_run_of_the_preset(tmp_path: Path) -> None:
    from clipft.models import read_state_dict
    from clipft.runner import fit

    report = fit(load_config("recipes/degla.yaml", [
        "trainer.max_steps=10", "trainer.val_check_interval=10", "data.batch_size=32", "data.num_workers=0",
        "data.synthetic.val_size=200", "eval.zeroshot=[]", "eval.compositional.size=100", "run.plot=false",
        "trainer.enable_progress_bar=false", f"run.out_dir={tmp_path}", "method.ema_momentum=0.5"]))
    assert report["steps"] == 10 and report["metrics"]["val/retrieval/mean_r1"] > 0.8
    ema = read_state_dict(report["last_checkpoint"], ema=True)  # the teacher is saved with the run
    live = read_state_dict(report["last_checkpoint"])
    assert ema.keys() == live.keys() and not torch.equal(ema["visual.proj"], live["visual.proj"])
