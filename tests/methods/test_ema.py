"""The EMA of the model (method.ema_momentum): its update equation, where it lives, that it
follows only optimizer steps that stepped, and that checkpoints keep it."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from clipft.config import load_config
from clipft.data.batch import Batch
from clipft.methods import Finetune, build_method
from clipft.models import EMA_KEY

MOMENTUM = 0.75


def _method() -> Finetune:
    torch.manual_seed(0)
    return build_method(load_config(None, ["model.name=clipft-tiny-vit", f"method.ema_momentum={MOMENTUM}", "optim.fused=false"]))


def test_ema_update_equation_placement_and_checkpoint() -> None:
    method = _method()
    assert method.ema is not None
    # outside the module tree: no gradients, not in the optimizer, the state dict or .to(dtype)
    assert not any(p.requires_grad for p in method.ema.parameters())
    assert not any(k.startswith("ema") or k.startswith("_ema") for k in method.state_dict())
    ema_ids = {id(p) for p in method.ema.parameters()}
    assert not ema_ids & {id(p) for p in method.parameters()}
    method.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in method.ema.parameters())
    method.to(torch.float32)

    start = {k: v.clone() for k, v in method.ema.state_dict().items()}
    with torch.no_grad():
        for param in method.model.parameters():
            param.add_(1.0)
        method.model.visual.proj.requires_grad_(False)  # a frozen parameter keeps its shadow
    method.update_ema()
    for name, value in method.ema.named_parameters():
        expected = start[name] if name == "visual.proj" else MOMENTUM * start[name] + (1 - MOMENTUM) * (start[name] + 1)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)

    checkpoint: dict = {}
    method.on_save_checkpoint(checkpoint)
    fresh = _method()
    fresh.on_load_checkpoint(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.state_dict().values(), checkpoint[EMA_KEY].values()))


class _OverflowAt(Finetune):
    """Fine-tuning whose loss is infinite at one batch: AMP's grad scaler skips that step."""

    overflow_batch = 1

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.overflow_batch else loss


class _Record(L.Callback):
    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.params.append({n: p.detach().float().clone() for n, p in pl_module.model.named_parameters()})
        optimizer = trainer.optimizers[0]
        self.steps.append(int(max(s["step"] for s in optimizer.state.values())) if optimizer.state else 0)


def test_ema_follows_the_steps_that_stepped_under_amp() -> None:
    """fp16 autocast with a grad scaler: the overflowing step is skipped by the scaler, and the
    EMA skips it too; every other step updates the fp32 shadow by its equation."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=clipft-tiny-vit", f"method.ema_momentum={MOMENTUM}", "optim.fused=false", "optim.lr=1e-3"])
    from clipft.config import to_dict

    method = _OverflowAt(to_dict(cfg))
    start = {n: p.detach().clone() for n, p in method.ema.named_parameters()}
    g = torch.Generator().manual_seed(0)
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "cyan") for s in ("circle", "square")]
    batch = Batch(torch.randn(8, 3, 32, 32, generator=g), method.tokenizer(captions), captions, [str(i) for i in range(8)])
    record = _Record()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
    )
    trainer.fit(method, train_dataloaders=DataLoader([batch] * 4, batch_size=None))
    assert record.steps == [1, 1, 2, 3]  # batch 1 overflowed: AdamW did not step
    expected = start
    for params, stepped in zip(record.params, [True, False, True, True]):
        if stepped:
            expected = {n: MOMENTUM * expected[n] + (1 - MOMENTUM) * params[n] for n in expected}
    trainable = [n for n, p in method.model.named_parameters() if p.requires_grad]
    for name in trainable:
        torch.testing.assert_close(method.ema.get_parameter(name), expected[name], rtol=0, atol=1e-6)
    assert not torch.equal(method.ema.get_parameter("visual.proj"), start["visual.proj"])
