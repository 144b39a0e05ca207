"""Contrastive fine-tuning, FLYP style (Goyal et al., "Finetune like you pretrain", CVPR 2023).

FLYP fine-tunes both towers with exactly the pre-training objective: the symmetric CLIP
loss (Radford et al. 2021, Fig. 3) with the model's learned logit scale, over image-caption
pairs (for a labelled data set, one caption per image written from a prompt template).
Duplicate classes in a batch are not masked; they count as negatives, as in FLYP.
Defaults of the paper (ImageNet, ViT-B/16): AdamW lr 1e-5, weight decay 0.1, batch 512,
10 epochs, 500 warm-up steps then cosine to 0 (``recipes/finetune.yaml``).

For a SigLIP model (one with a logit bias) the pre-training objective is SigLIP's sigmoid
loss (Zhai et al., ICCV 2023), and that is what it fine-tunes with. The base class already
implements both, so the method is the base itself under its recipe name; methods that add
terms override ``loss_terms``.
"""

from __future__ import annotations

from clipft.methods.base import ContrastiveMethod, register_method


@register_method("finetune")
class Finetune(ContrastiveMethod):
    """FLYP: the CLIP contrastive loss on both towers (see the module docstring)."""

    summary = "fine-tune both towers with the pre-training loss (CLIP's, or SigLIP's for a SigLIP model)"
    paper = 'Goyal et al., "Finetune like you pretrain: improved finetuning of zero-shot vision models", CVPR 2023'
