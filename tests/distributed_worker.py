"""One training step of a method through Lightning, on 1 process or on 2 CPU processes (DDP,
gloo), for tests/test_distributed.py. Each process trains on its contiguous slice of one fixed
global batch; for each run (a JSON list of override lists) the script writes the loss averaged
over processes and the parameter gradients after DDP's all-reduce (what the optimizer sees) to
OUT.<i>.

    python tests/distributed_worker.py OUT DEVICES '[["method.name=finetune"], ...]'
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipft.config import load_config  # noqa: E402
from clipft.data.datamodule import CollatePairs  # noqa: E402
from clipft.data.synthetic import SyntheticScenes  # noqa: E402
from clipft.methods import build_method  # noqa: E402

warnings.simplefilter("ignore")
GLOBAL_BATCH = 8


class Capture(L.Callback):
    """Gradients after backward (DDP has averaged them by then) and the mean loss."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.grads: dict[str, torch.Tensor] = {}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        if trainer.is_global_zero:
            torch.save({"loss": loss, "grads": self.grads}, self.out)


def one_step(out: str, devices: int, overrides: list[str]) -> None:
    cfg = load_config(None, ["model.pretrained=synthetic", "optim.lr=0", "optim.fused=false", *overrides])
    L.seed_everything(0, verbose=False)
    method = build_method(cfg)
    scenes = [SyntheticScenes(split="val", size=GLOBAL_BATCH, seed=0)[i] for i in range(GLOBAL_BATCH)]
    captions = [s["caption"] for s in scenes]
    images = torch.stack([torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255 for s in scenes])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_rank = GLOBAL_BATCH // devices
    pairs = [(image, caption, str(i)) for i, (image, caption) in enumerate(zip(images, captions))]
    batch = CollatePairs(method.tokenizer, cfg.data.negatives, seed=0)(pairs)  # with negatives if asked
    batch = batch.chunks(per_rank)[rank]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[Capture(out)],
    )
    trainer.fit(method, train_dataloaders=DataLoader([batch], batch_size=None))


def main() -> None:
    out, devices, runs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    for i, overrides in enumerate(runs):
        one_step(f"{out}.{i}", devices, overrides)


if __name__ == "__main__":
    main()
