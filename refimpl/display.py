"""Helpers the book's chapters share: showing refimpl's own code, and tables of computed numbers.

Chapters never re-implement what refimpl has; to show code they render the real source, trimmed
to the part the text discusses: without the input checks of a function (``checks=False``), without
its docstring (``docstring=False``), or a range of its lines (``lines=(first, last)``).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

#: The line that stands in for the statements ``checks=False`` leaves out.
CHECKS_OMITTED = "# ... input checks omitted (see the full source) ..."


def _is_check(node: ast.stmt) -> bool:
    """A statement that only validates: ``if ...: raise``, a loop of those, or a call of ``*check*``/``*validate*``."""
    if isinstance(node, ast.Raise):
        return True
    if isinstance(node, ast.If):
        return all(_is_check(s) for s in node.body) and all(_is_check(s) for s in node.orelse)
    if isinstance(node, ast.For):
        return not node.orelse and all(_is_check(s) for s in node.body)
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        f = node.value.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        return "check" in name.lower() or "validate" in name.lower()
    return False


def trimmed_source(obj, *, checks: bool = True, docstring: bool = True, lines: tuple[int, int] | None = None) -> str:
    """The source of one function, class or module, optionally trimmed.

    ``checks=False`` replaces each run of validation statements at the top level of a function's
    body (see :data:`CHECKS_OMITTED`) with one comment line; ``docstring=False`` drops the
    function's docstring; ``lines=(first, last)`` keeps those lines of the source (1-based, both
    included, counted from the ``def`` or decorator line), applied last.
    """
    src = textwrap.dedent(inspect.getsource(obj)).rstrip()
    out = src.splitlines()
    if not (checks and docstring):
        tree = ast.parse(src)
        fn = tree.body[0] if tree.body else None
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            raise ValueError(f"checks, docstring: trimming needs a function, got {type(obj).__name__}")
        body = fn.body
        doc_lines, check_lines = set(), set()                 # 0-based line numbers to leave out
        if not docstring and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc_lines.update(range(body[0].lineno - 1, body[0].end_lineno))
        if not checks:
            for s in body:
                if _is_check(s):
                    check_lines.update(range(s.lineno - 1, s.end_lineno))
        keep = []
        for i, line in enumerate(out):
            if i in check_lines and i - 1 not in check_lines:   # the first line of a run of checks
                keep.append(line[: len(line) - len(line.lstrip())] + CHECKS_OMITTED)
            if i not in doc_lines and i not in check_lines:
                keep.append(line)
        out = keep
    if lines is not None:
        first, last = lines
        if not (1 <= first <= last <= len(out)):
            raise ValueError(f"lines: expected 1 <= first <= last <= {len(out)}, got {lines!r}")
        out = out[first - 1: last]
    return "\n".join(out)


def source_markdown(*objects, checks: bool = True, docstring: bool = True, lines: tuple[int, int] | None = None) -> str:
    """The source of ``objects`` (functions, classes, modules) as one fenced Markdown code block.

    ``checks``, ``docstring`` and ``lines`` trim each object's source as :func:`trimmed_source` does
    (``lines`` needs exactly one object).
    """
    if not objects:
        raise ValueError("objects: expected at least one function, class or module")
    if lines is not None and len(objects) != 1:
        raise ValueError(f"lines: a line range needs exactly one object, got {len(objects)}")
    src = "\n\n".join(trimmed_source(obj, checks=checks, docstring=docstring, lines=lines) for obj in objects)
    return f"```python\n{src}\n```"


def show_source(*objects, checks: bool = True, docstring: bool = True, lines: tuple[int, int] | None = None) -> None:
    """Display :func:`source_markdown` in a notebook (IPython is imported only when called)."""
    from IPython.display import Markdown, display

    display(Markdown(source_markdown(*objects, checks=checks, docstring=docstring, lines=lines)))


def _cell(value) -> str:
    """One table cell: ``str(value)`` on one line, with ``|`` escaped so it cannot split the row."""
    return " ".join(str(value).split("\n")).replace("|", "\\|")


def table_markdown(header, rows) -> str:
    """A Markdown (GFM) table from a header and rows of already-formatted cells.

    Every cell is ``str(cell)`` with ``|`` escaped as ``\\|`` (Markdown renders it as ``|``, in code
    spans too) and line breaks turned into spaces, so a cell cannot break the table. Each row must
    have as many cells as the header (``ValueError`` naming the row otherwise).
    """
    header = list(header)
    if not header:
        raise ValueError("header: expected at least one column")
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"rows[{i}]: expected {len(header)} cells like the header, got {len(row)}")
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    return "\n".join(lines)


def table(header, rows) -> None:
    """Display :func:`table_markdown` in a notebook (IPython is imported only when called)."""
    from IPython.display import Markdown, display

    display(Markdown(table_markdown(header, rows)))
