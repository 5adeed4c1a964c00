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


# ------------------------------------------------------------------------------------------------
# Issue 15 item 13: every bad command line is one line on stderr and exit status 2, never a traceback
# ------------------------------------------------------------------------------------------------

def _fails_with_one_line(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_rejects_bad_values_in_one_line(recipe, capsys):
    import importlib
    import inspect
    module, name = RECIPES[recipe]
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    ints = [k for k, p in params.items() if type(p.default) is int]
    floats = [k for k, p in params.items() if type(p.default) is float]
    assert ints, recipe
    _fails_with_one_line([recipe, f"--{ints[0]}", "abc"], capsys, f"--{ints[0]}: expected an integer")
    _fails_with_one_line([recipe, f"--{ints[0]}", "1.5"], capsys, f"--{ints[0]}: expected an integer")
    _fails_with_one_line([recipe, f"--{ints[0]}", "-1"], capsys, f"--{ints[0]}: expected an integer >=")
    if floats:
        _fails_with_one_line([recipe, f"--{floats[0]}", "nan"], capsys, f"--{floats[0]}: expected a finite")
    _fails_with_one_line([recipe, "--bogus", "1"], capsys, "bogus")
    _fails_with_one_line([recipe, "--steps"], capsys, "--name value pairs")


@pytest.mark.parametrize("argv, match", [
    (["tiny-v3", "--batch_size", "0"], "--batch_size: expected an integer >= 1"),
    (["tiny-v3", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["tiny-v3", "--steps", "-1"], "--steps: expected an integer >= 1"),
    (["fp8-train", "--lr", "nan"], "--lr: expected a finite number"),
    (["fp8-train", "--progress", "1"], "--progress: expected True or False"),
    (["nope"], "invalid choice"),
])
def test_issue_reproductions(argv, match, capsys):
    _fails_with_one_line(argv, capsys, match)


def test_readme_steps_option_exists_for_every_recipe_or_is_explained():
    import importlib
    import inspect
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for recipe, (module, name) in RECIPES.items():
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        # the README's `--steps N`, or (distill) the option it names instead
        stage_steps = [k for k in params if k.endswith("_steps")]
        assert ("steps" in params or ("budget" in params and f"({recipe}:\n" in readme.replace(" \n", "\n")
                                      and "`--budget x`" in readme)
                or (recipe in readme and stage_steps and all(f"`--{k}`" in readme for k in stage_steps))), recipe
