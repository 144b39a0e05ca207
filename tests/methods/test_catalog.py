"""``clipft info --methods``: every registered method describes itself from its declarations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from clipft.cli import main
from clipft.config import _METHOD_CONFIGS, MethodConfig, setting_help
from clipft.methods import METHODS
from clipft.methods.catalog import describe


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_says_what_it_is_and_documents_every_setting(name: str) -> None:
    info = describe(name)
    assert info["summary"] and info["paper"] and info["terms"] == list(METHODS[name].loss_term_names)
    settings = _METHOD_CONFIGS.get(name, MethodConfig)
    expected = {f"method.{f.name}" for f in dataclasses.fields(settings)} - {"method.name"}
    assert set(info["settings"]) == expected
    undocumented = [key for key, s in info["settings"].items() if not s["help"]]
    assert undocumented == [], f"settings of {name} without a comment beside them"
    defaults = settings(name=name)
    for key, setting in info["settings"].items():
        assert setting["default"] == getattr(defaults, key.split(".", 1)[1])


def test_help_is_read_from_the_comments_above_and_beside_a_field() -> None:
    @dataclass
    class Example(MethodConfig):
        # two lines
        # above
        width: int = 3  # and one beside
        plain: int = 1
        hashed: str = "#not a comment"  # the real one

    help_of = setting_help(Example)
    assert help_of["width"] == "two lines above and one beside"
    assert "plain" not in help_of and help_of["hashed"] == "the real one"
    assert help_of["ema_momentum"].startswith("Keep an exponential moving average")  # inherited


def test_info_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name}: " in f"\n{out}"
    assert "method.rafa_prior = null" in out and "method.num_tokens = 5" in out
