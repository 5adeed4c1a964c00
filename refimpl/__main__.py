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
import sys

#: recipe name -> (module, function)
RECIPES = {
    "distill": ("refimpl.recipes.distill", "distill_run"),
    "fp8-train": ("refimpl.recipes.fp8_train", "fp8_train_run"),
    "moe-balance": ("refimpl.recipes.moe_balance", "moe_balance_run"),
    "tiny-v3": ("refimpl.recipes.tiny_v3", "tiny_v3_run"),
    "r1-zero": ("refimpl.recipes.r1", "r1_zero_run"),
    "r1": ("refimpl.recipes.r1", "r1_run"),
    "cot-ablation": ("refimpl.recipes.cot", "cot_ablation_run"),
    "aha": ("refimpl.recipes.aha", "aha_run"),
}


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _summary(result):
    if isinstance(result, dict):
        def flat(v):   # scalars, and dicts of scalars (e.g. an evaluation), are shown; the rest by type
            return isinstance(v, int | float | str) or (isinstance(v, dict) and all(map(flat, v.values())))
        return {k: (v if flat(v) else type(v).__name__) for k, v in result.items()}
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m refimpl", description=__doc__.splitlines()[0])
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
    kwargs = {k[2:].replace("-", "_"): _literal(v) for k, v in zip(rest[::2], rest[1::2], strict=True)}
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        parser.error(f"unknown option(s) for {args.recipe}: {unknown}; see --list-options")
    result = fn(**kwargs)
    print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
