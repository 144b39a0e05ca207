"""Methods: one LightningModule per file, registered under its recipe name."""

from clipft.methods.base import METHODS, ContrastiveMethod, build_method, method_class, register_method
from clipft.methods.clip_refine import ClipRefine
from clipft.methods.degla import Degla
from clipft.methods.finetune import Finetune
from clipft.methods.mixup import Mixup
from clipft.methods.mmrl import MMRL
from clipft.methods.negclip import NegClip

__all__ = ["METHODS", "ClipRefine", "Degla", "ContrastiveMethod", "Finetune", "MMRL", "Mixup", "NegClip", "build_method", "method_class", "register_method"]
