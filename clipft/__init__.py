"""clipft: adapt CLIP-like (open_clip) models after pre-training, with PyTorch Lightning."""

__version__ = "0.1.0"
