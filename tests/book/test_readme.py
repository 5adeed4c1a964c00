"""What README.md and the book's introduction tell a reader to run exists and works.

The oracle example of the README is executed; the recipes, make targets, make variables and
hypothesis profiles it names are checked against the CLI, the Makefile and tests/conftest.py.
"""

import importlib.util
import re
from pathlib import Path

import pytest
from hypothesis import settings

from refimpl.__main__ import RECIPES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
INTRO = (ROOT / "book" / "intro.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def test_oracle_example_runs(capsys):
    block = re.search(r"^```python\n(.*?)^```", README, re.S | re.M).group(1)
    assert "check_grad" in block, "the first python block of the README should be the oracle example"
    exec(compile(block, "README.md", "exec"), {})  # the block asserts its own gradient check
    assert capsys.readouterr().out.split() == ["576"]


def test_recipe_list_is_the_cli_list():
    listed = re.search(r"<recipe> one of ([a-z0-9, -]+)", README).group(1)
    assert sorted(s.strip() for s in listed.split(",")) == sorted(RECIPES)


@pytest.mark.parametrize("text", [README, INTRO], ids=["README", "intro"])
def test_named_make_targets_and_variables_exist(text):
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", text))
    assert {"test", "book"} <= named and named <= targets, named - targets
    for var in re.findall(r"\bmake [a-z-]+ ([A-Z]+)=", text):
        assert re.search(rf"^{var} \?=", MAKEFILE, re.M), f"make variable {var} is not in the Makefile"


def test_named_modules_and_profiles_exist():
    for module in re.findall(r"python -m ([a-z_.]+)", README):
        assert importlib.util.find_spec(module) is not None, module
    profiles = re.search(r"HYPOTHESIS_PROFILE=([a-z|]+)", README).group(1).split("|")
    for name in profiles:
        settings.get_profile(name)  # raises InvalidArgument for a profile tests/conftest.py does not register
