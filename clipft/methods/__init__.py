"""Methods: one LightningModule per file, registered under its recipe name.

Importing the package imports every module in it, so a new method is one new file: its
``@register_method`` runs on ``import clipft.methods`` (which the CLI and the runner do before a
recipe is composed), and its class is exported here by name (``from clipft.methods import
Finetune``). tests/test_imports.py counts these discovered imports as edges of the package.
"""

import importlib
import pkgutil

from clipft.methods.base import METHODS, ContrastiveMethod, build_method, method_class, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for cls in METHODS.values()})

__all__ = ["METHODS", "ContrastiveMethod", "build_method", "method_class", "register_method"]
__all__ += sorted({cls.__name__ for cls in METHODS.values()} - set(__all__))
