"""The build-time offline check of book/_ext/refimpl_book.py finds what a page would fetch from the network.

Runs without a browser or a built book; needs Sphinx (the ``book`` extra), else it is skipped.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "book" / "_ext"))
import refimpl_book  # noqa: E402


def test_remote_loads_finds_scripts_styles_images_and_inline_urls():
    page = """
    <link rel="stylesheet" href="https://cdn.example.org/theme.css">
    <link rel="preload" as="font" href="//fonts.example.org/a.woff2">
    <script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>
    <img src='http://example.org/figure.png'>
    <script>const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"</script>
    """
    assert refimpl_book.remote_loads(page) == [
        "https://cdn.example.org/theme.css", "//fonts.example.org/a.woff2",
        "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js", "http://example.org/figure.png",
        "https://unpkg.com/",
    ]


def test_remote_loads_allows_local_files_and_plain_links():
    page = """
    <link rel="stylesheet" href="_static/styles/theme.css">
    <script defer src="_static/mathjax/tex-svg.js"></script>
    <img src="../_images/figure.png">
    <a href="https://arxiv.org/abs/2405.04434">DeepSeek-V2</a>
    <script>window.MathJax = {"options": {"processHtmlClass": "math"}}</script>
    """
    assert refimpl_book.remote_loads(page) == []


def test_mathjax_is_bundled_with_the_svg_output():
    folder = refimpl_book.mathjax_source_dir()
    assert (folder / "tex-svg.js").is_file() and (folder / "input" / "tex" / "extensions").is_dir()


def test_module_names_walks_the_package():
    names = refimpl_book.module_names("refimpl", exclude=r"refimpl\.(kernels|__main__)(\..*)?|.*\._[a-z].*")
    assert names[0] == "refimpl" and "refimpl.core.rmsnorm" in names and "refimpl.attention.mla" in names
    assert not any(n.startswith("refimpl.kernels") or "._" in n for n in names)
