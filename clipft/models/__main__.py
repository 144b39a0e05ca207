"""``python -m clipft.models CHECKPOINT [--model NAME] [--tag TAG]``: store a checkpoint's
model as weights shipped with clipft (see ``clipft/models/shipped.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from clipft.models.factory import read_state_dict
from clipft.models.shipped import SHIPPED, shipped_weights


def write_shipped_weights(checkpoint: str | Path, model_name: str = "clipft-tiny-vit", tag: str = "synthetic") -> Path:
    """Write the model weights of a clipft checkpoint as the package file of (model, tag)."""
    from safetensors.torch import save_file

    out = shipped_weights(model_name, tag)
    if out is None:
        raise ValueError(f"no shipped tag '{tag}' for {model_name} (known: {sorted(SHIPPED)})")
    state = {k: v.to(torch.float16).contiguous() for k, v in read_state_dict(checkpoint).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"source": Path(checkpoint).name, "rebuilt_by": SHIPPED[(model_name, tag)][1]})
    tmp.replace(out)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Store a checkpoint's model as weights shipped with clipft.")
    parser.add_argument("checkpoint")
    parser.add_argument("--model", default="clipft-tiny-vit")
    parser.add_argument("--tag", default="synthetic")
    args = parser.parse_args(argv)
    out = write_shipped_weights(args.checkpoint, args.model, args.tag)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
