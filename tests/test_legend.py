"""Every shape symbol the code uses is defined, once, in the legend (book/notation.md and the package
docstring): a reader who meets ``# (B, Hk, Gq*T, Dk)`` can look every letter up.

A shape comment is a comment that starts with a tuple of sizes: ``# (B, T, D)``, ``# (N,), (N, K)``.
Capitalised names in it are legend symbols; a lowercase name is a variable of the function
(``n_devices``) and a CamelCase name a type, neither looked up.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections import Counter
from pathlib import Path

import refimpl

ROOT = Path(__file__).resolve().parents[1]
_GROUP = re.compile(r"\((?:[^()]|\([^()]*\))*\)")
_TERM = r"(?:\.\.\.|[A-Za-z_]\w*|\d+)"
_ITEM = re.compile(rf"\s*{_TERM}(?:\s*[-+*/]\s*{_TERM})*\s*")
_SYMBOL = re.compile(r"[A-Z][A-Za-z]*\b")


def shape_tuples(comment: str) -> list[str]:
    """The size tuples a comment starts with: ``"# (B, T, D), (B, T) ids"`` -> ``["B, T, D", "B, T"]``."""
    body, found = comment.lstrip("#").lstrip(), []
    while body.startswith("("):
        m = _GROUP.match(body)
        if not m:
            break
        inner = m.group(0)[1:-1]
        items = inner.replace("(", " ").replace(")", " ").split(",")
        if len(items) > 1 and not items[-1].strip():
            items.pop()                                  # (N,)
        if not all(_ITEM.fullmatch(i) for i in items):
            break                                        # prose in parentheses
        found.append(inner)
        body = body[m.end():].lstrip().lstrip(",").lstrip()
    return found


def shape_symbols() -> dict[str, list[str]]:
    """Legend-style symbols of every shape comment in refimpl/: ``{symbol: ["path:line", ...]}``."""
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / "refimpl").rglob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if tok.type != tokenize.COMMENT:
                continue
            for inner in shape_tuples(tok.string):
                for sym in re.findall(r"[A-Za-z_]\w*", inner):
                    if _SYMBOL.fullmatch(sym) and not re.search(r"[a-z][A-Z]", sym):
                        where.setdefault(sym, []).append(f"{path.relative_to(ROOT)}:{tok.start[0]}")
    return where


def notation_symbols() -> list[str]:
    """The symbols of book/notation.md's tables (first column, one or more ``code`` names)."""
    text = (ROOT / "book" / "notation.md").read_text(encoding="utf-8")
    return [s for line in text.splitlines() if line.startswith("| `")
            for s in re.findall(r"`([^`]+)`", line.split("|")[1])]


def test_shape_comment_parser():
    assert shape_tuples("# (B, T, D)") == ["B, T, D"]
    assert shape_tuples("# (N,), (N, K) ids, sorted") == ["N,", "N, K"]
    assert shape_tuples("# (B, Hk, Gq*T, Dn+Dr) queries") == ["B, Hk, Gq*T, Dn+Dr"]
    assert shape_tuples("# (..., D)") == ["..., D"]
    assert shape_tuples("# (the forward's output)") == []
    assert shape_tuples("# y = x (B, T)") == []


def test_legend_has_one_entry_per_symbol():
    symbols = notation_symbols()
    assert {"B", "T", "D", "Hk", "Dk", "Tc"} <= set(symbols)
    assert [s for s, n in Counter(symbols).items() if n > 1] == []


def test_every_shape_symbol_is_in_the_legend():
    legend = set(notation_symbols())
    used = shape_symbols()
    assert {"B", "T", "D", "Hk"} <= set(used)                # the scan sees the code
    missing = {s: w[:3] for s, w in used.items() if s not in legend}
    assert not missing, f"shape symbols missing from book/notation.md: {missing}"


def test_package_docstring_has_the_legend():
    words = set(re.findall(r"[A-Za-z]+", refimpl.__doc__))
    assert [s for s in notation_symbols() if s not in words] == []
