"""refimpl.display: the real source, trimmed to what the text discusses."""

import pytest

from refimpl.display import CHECKS_OMITTED, source_markdown, table, table_markdown, trimmed_source


def scaled(x, k, *, eps=1e-6):
    """Docstring line one.

    More docstring.
    """
    check_positive("k", k)
    if eps <= 0:
        raise ValueError("eps: expected > 0")
    for name, v in (("x", x), ("k", k)):
        if v is None:
            raise ValueError(f"{name}: expected a value")
    y = x * k          # the part the text discusses
    if y > 10:         # not a check: its body does more than raise
        y = 10
    return y + eps


def check_positive(name, v):
    if v <= 0:
        raise ValueError(name)


def test_full_source_is_unchanged():
    import inspect
    assert trimmed_source(scaled) == inspect.getsource(scaled).rstrip()


def test_checks_and_docstring_are_left_out():
    src = trimmed_source(scaled, checks=False, docstring=False)
    assert src.splitlines() == [
        "def scaled(x, k, *, eps=1e-6):",
        "    " + CHECKS_OMITTED,
        "    y = x * k          # the part the text discusses",
        "    if y > 10:         # not a check: its body does more than raise",
        "        y = 10",
        "    return y + eps",
    ]
    assert "Docstring" in trimmed_source(scaled, checks=False)


def test_line_range_and_its_errors():
    line = trimmed_source(scaled, checks=False, docstring=False, lines=(3, 3))
    assert line == "    y = x * k          # the part the text discusses"
    with pytest.raises(ValueError, match="^lines"):
        trimmed_source(scaled, lines=(0, 2))
    with pytest.raises(ValueError, match="^lines"):
        source_markdown(scaled, check_positive, lines=(1, 2))


def test_trimming_needs_a_function():
    import refimpl.display as module
    with pytest.raises(ValueError, match="^checks, docstring"):
        trimmed_source(module, checks=False)


def test_markdown_block_of_a_real_function():
    from refimpl.rl.rollout import rejection_sample
    md = source_markdown(rejection_sample, checks=False, docstring=False)
    assert md.startswith("```python\ndef rejection_sample(") and md.endswith("\n```")
    assert CHECKS_OMITTED in md and "raise ValueError" not in md and "_check_policy" not in md
    assert "return kept" in md


def test_trimmed_real_functions_still_parse():
    import ast

    from refimpl.accounting import gpu_hours
    from refimpl.attention import mla_infer
    from refimpl.core import linear_forward, rope_inv_freq
    from refimpl.moe import gate_forward
    for f in (mla_infer, gate_forward, gpu_hours, linear_forward, rope_inv_freq):
        src = trimmed_source(f, checks=False)
        body = ast.parse(src).body[0].body
        assert CHECKS_OMITTED in src and not any(isinstance(s, ast.Raise) for s in body), f.__name__


def test_table_markdown_escapes_pipes_and_keeps_columns():
    md = table_markdown(["|x|", "a | b"], [("`p | q`", 1.5), ("two\nlines", None)])
    assert md.splitlines() == ["| \\|x\\| | a \\| b |", "|---|---|", "| `p \\| q` | 1.5 |", "| two lines | None |"]
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    assert html.count("<th>") == 2 and html.count("<td>") == 4      # no cell split the table
    assert "<th>|x|</th>" in html and "<code>p | q</code>" in html


def test_table_markdown_errors():
    with pytest.raises(ValueError, match="header"):
        table_markdown([], [])
    with pytest.raises(ValueError, match=r"rows\[1\]: expected 2 cells"):
        table_markdown(["a", "b"], [(1, 2), (1, 2, 3)])


def test_table_displays_markdown(monkeypatch):
    display = pytest.importorskip("IPython.display")
    shown = []
    monkeypatch.setattr(display, "display", shown.append)
    table(["a"], [[1]])
    assert [m.data for m in shown] == ["| a |\n|---|\n| 1 |"]
