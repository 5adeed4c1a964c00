"""Run a recipe from the shell: ``python -m refimpl <recipe> [--name value ...]``.

Recipes are the book's long experiments, as functions in :mod:`refimpl.recipes` with a small
default budget; the command line raises the budget, e.g.
``python -m refimpl tiny-v3 --steps 3000``. Values are parsed as Python literals
(``--steps 3000``, ``--modes "('none', 'bias')"``), falling back to strings.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import math
import os
import sys

#: recipe name -> (module, function)
RECIPES = {
    "distill": ("refimpl.recipes.distill", "distill_run"),
    "fp8-train": ("refimpl.recipes.fp8_train", "fp8_train_run"),
    "moe-balance": ("refimpl.recipes.moe_balance", "moe_balance_run"),
    "tiny-v3": ("refimpl.recipes.tiny_v3", "tiny_v3_run"),
    "r1-zero": ("refimpl.recipes.r1", "r1_zero_run"),
    "r1": ("refimpl.recipes.r1", "r1_run"),
    "dsa-pretrain": ("refimpl.recipes.dsa_pretrain", "dsa_pretrain_run"),
    "moe-rl-stability": ("refimpl.recipes.moe_rl_stability", "moe_rl_stability_run"),
    "cot-ablation": ("refimpl.recipes.cot", "cot_ablation_run"),
    "aha": ("refimpl.recipes.aha", "aha_run"),
    "r1-stages": ("refimpl.recipes.r1_stages", "r1_stages_run"),
    "language": ("refimpl.recipes.language", "language_seeds_run"),
}


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line of stderr (exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(name, text, param):
    """The value of ``--name text`` for a recipe parameter: a Python literal, checked against the
    type of the parameter's default (int, float, bool, str). Integers whose default is positive
    must be positive, other integers non-negative; floats must be finite. Raises ValueError."""
    value = _literal(text)
    default = None if param is None else param.default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"--{name}: expected True or False, got {text!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"--{name}: expected an integer, got {text!r}")
        low = 1 if default >= 1 else 0
        if value < low:
            raise ValueError(f"--{name}: expected an integer >= {low}, got {value}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"--{name}: expected a finite number, got {text!r}")
        value = float(value)
    elif isinstance(default, str):
        value = value if isinstance(value, str) else text
    return value


def _summary(result):
    if isinstance(result, dict):
        def flat(v):   # scalars, and dicts of scalars (e.g. an evaluation), are shown; the rest by type
            return isinstance(v, int | float | str) or (isinstance(v, dict) and all(map(flat, v.values())))
        return {k: (v if flat(v) else type(v).__name__) for k, v in result.items()}
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:             # python -m refimpl chat PATH: talk to a checkpoint (refimpl.chat)
        from .chat import chat_main
        return chat_main(argv[1:])
    parser = _Parser(prog="python -m refimpl", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=sorted(RECIPES), help="the experiment to run")
    parser.add_argument("--list-options", action="store_true", help="print the recipe's options and exit")
    args, rest = parser.parse_known_args(argv)
    module, name = RECIPES[args.recipe]
    fn = getattr(importlib.import_module(module), name)
    if args.list_options:
        print(f"{args.recipe}: {name}{inspect.signature(fn)}")
        print(inspect.getdoc(fn))
        return 0
    if len(rest) % 2 or not all(r.startswith("--") for r in rest[::2]):
        parser.error(f"options must come as --name value pairs, got {rest}")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [k[2:].replace("-", "_") for k in rest[::2]]
    unknown = [k for k in names if k not in params and not takes_any]
    if unknown:
        parser.error(f"unknown option(s) for {args.recipe}: {unknown}; see --list-options")
    try:
        kwargs = {k: _typed(k, v, params.get(k)) for k, v in zip(names, rest[1::2], strict=True)}
    except ValueError as e:
        parser.error(f"{args.recipe}: {e}")
    try:
        result = fn(**kwargs)
    except (ValueError, TypeError, OSError) as e:   # bad option values, reported by the recipe
        if os.environ.get("REFIMPL_TRACEBACK"):
            raise
        parser.error(f"{args.recipe}: {e}".splitlines()[0] + " (REFIMPL_TRACEBACK=1 shows the traceback)")
    print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
