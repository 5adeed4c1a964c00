"""`python -m refimpl <recipe>`: the recipes' command line."""

import pytest

from refimpl.__main__ import RECIPES, main


def test_every_recipe_resolves():
    import importlib
    for module, name in RECIPES.values():
        assert callable(getattr(importlib.import_module(module), name))


def test_runs_a_recipe_with_literal_options(capsys):
    assert main(["moe-balance", "--steps", "2", "--progress", "False", "--modes", "('none',)"]) == 0
    assert "runs" in capsys.readouterr().out


def test_list_options(capsys):
    assert main(["tiny-v3", "--list-options"]) == 0
    assert "steps" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["nope"], ["moe-balance", "--steps"], ["moe-balance", "--bogus", "1"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit):
        main(argv)
