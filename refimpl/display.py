"""Helpers the book's chapters share for showing refimpl's own code.

Chapters never re-implement what refimpl has; to show code they render the real source.
"""

from __future__ import annotations

import inspect


def source_markdown(*objects) -> str:
    """The source of ``objects`` (functions, classes, modules) as one fenced Markdown code block."""
    if not objects:
        raise ValueError("objects: expected at least one function, class or module")
    src = "\n\n".join(inspect.getsource(obj).rstrip() for obj in objects)
    return f"```python\n{src}\n```"


def show_source(*objects) -> None:
    """Display :func:`source_markdown` in a notebook (IPython is imported only when called)."""
    from IPython.display import Markdown, display

    display(Markdown(source_markdown(*objects)))
