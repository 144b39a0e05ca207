"""``clipft info --methods``: every registered method described from its own declarations
(its ``summary`` and ``paper``, its settings dataclass with defaults and the comments beside
each field), so the list cannot drift from the code."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from clipft.config import MethodConfig, _METHOD_CONFIGS, setting_help
from clipft.methods.base import METHODS


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def describe(name: str) -> dict[str, Any]:
    """A method's summary, paper, loss terms and settings (key -> default, help)."""
    method, settings = METHODS[name], _METHOD_CONFIGS.get(name, MethodConfig)
    help_of = setting_help(settings)
    return {
        "name": name,
        "summary": method.summary,
        "paper": method.paper,
        "terms": list(method.loss_term_names),
        "settings": {f"method.{f.name}": {"default": _default(f), "help": help_of.get(f.name, "")}
                     for f in dataclasses.fields(settings) if f.name != "name"},
    }


def render() -> str:
    """The text ``clipft info --methods`` prints."""
    lines = []
    for name in sorted(METHODS):
        info = describe(name)
        lines += [f"{name}: {info['summary']}", f"  paper: {info['paper']}", f"  loss terms: {', '.join(info['terms'])}"]
        for key, setting in info["settings"].items():
            lines.append(f"  {key} = {json.dumps(setting['default'])}")
            if setting["help"]:
                lines.append(f"      {setting['help']}")
        lines.append("")
    return "\n".join(lines)
