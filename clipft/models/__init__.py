"""open_clip models by name, with pretrained weights from a tag or a local file.

``build_model(ModelConfig)`` returns the model, its train/val image transforms and its
tokenizer. clipft ships tiny open_clip configs (``clipft-tiny-vit``, ``clipft-small-vit``)
so tests and the quickstart run in seconds on a CPU; they are registered with open_clip on
import, so ``open_clip.create_model("clipft-tiny-vit")`` works too once clipft is imported.
"""

from clipft.models.factory import (
    CONFIG_DIR,
    EMA_KEY,
    ModelBundle,
    ModelError,
    build_model,
    count_parameters,
    keep_in_eval,
    labelled,
    load_pretrained_file,
    read_module_state,
    read_state_dict,
    read_training_state,
)

__all__ = [
    "CONFIG_DIR",
    "EMA_KEY",
    "ModelBundle",
    "ModelError",
    "build_model",
    "count_parameters",
    "keep_in_eval",
    "labelled",
    "load_pretrained_file",
    "read_module_state",
    "read_state_dict",
    "read_training_state",
]
