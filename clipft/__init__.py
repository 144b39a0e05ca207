"""clipft: adapt CLIP-like (open_clip) models after pre-training, with PyTorch Lightning."""

__version__ = "0.1.0"


def load_exported(folder, device: str = "cpu"):  # type: ignore[no-untyped-def]
    """(model, preprocess, tokenizer) of a folder written by ``clipft export`` (see
    :func:`clipft.export.load_exported`)."""
    from clipft.export import load_exported as load

    return load(folder, device)
