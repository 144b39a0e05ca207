"""The models layer's error: a user-facing, one-line reason that says what to do."""


class ModelError(ValueError):
    """A model name, pretrained tag or weights file that cannot be used; says what to do."""
