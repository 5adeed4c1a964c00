"""The built HTML reads cleanly: no broken math and no noise in cell outputs (issue: the book for its reader).

Runs on the book built by ``make book`` (``book/_build/html``, or ``REFIMPL_BOOK_HTML``) and is
skipped when there is no build. Every page of the build is checked, so chapters added later are
covered without listing them here:

* **math**: a math span (Sphinx's ``.math`` elements, from ``$...$``, ``$$...$$`` and ``{math}``)
  holds no ordinary English words outside ``\\text{...}``-like groups (the sign of a dollar amount
  read as math: ``$5.576M at an assumed $2`` becomes the span ``5.576M at an assumed``), and no
  unbalanced markup (braces, ``\\left``/``\\right``, ``\\begin``/``\\end``, Markdown ``**`` or
  backticks, a stray ``$``);
* **outputs**: what a cell printed or displayed holds no warning (``TqdmWarning``, ``Warning:``), no
  traceback, no path of the machine that built the book (``/tmp/``, ``/home/``, ``.venv``,
  ``/work/``, ``site-packages``) and no NumPy scalar repr (``np.float64(0.95)``).

The detectors are tested on small examples below, so a check that cannot fail is noticed.
"""

from __future__ import annotations

import html.parser
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("REFIMPL_BOOK_HTML", ROOT / "book" / "_build" / "html"))
# Sphinx's own pages (their text is not the book's; search.html has no content at build time).
NOT_TEXT = {"genindex.html", "search.html", "py-modindex.html", "index.html"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def book_pages() -> list[str]:
    """Every HTML page of the build, relative to its root; empty when there is no build."""
    if not (HTML / "intro.html").is_file():
        return []
    return sorted(rel for p in HTML.rglob("*.html")
                  if not (rel := p.relative_to(HTML).as_posix()).startswith(("_static/", "_sources/", "_images/"))
                  and rel not in NOT_TEXT)


def is_shown_code(classes: list[str]) -> bool:
    """A code block a cell displays on purpose (``highlight-python``: refimpl.display's source), not
    printed text (``highlight-myst-ansi``) or a traceback (``highlight-ipythontb``)."""
    return any(c.startswith("highlight-") and c not in ("highlight-myst-ansi", "highlight-ipythontb",
                                                          "highlight-none", "highlight-default")
               for c in classes)


class Regions(html.parser.HTMLParser):
    """The text of every math element and of every cell output of one page (shown source excluded)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []   # (tag, kind of region it opens or None)
        self.open: dict[str, list[str]] = {}            # kind -> text pieces of the innermost open region
        self.math: list[str] = []
        self.outputs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        kind = None
        if "math" in classes and "math" not in self.open:
            kind = "math"
        elif "cell_output" in classes and "output" not in self.open:
            kind = "output"
        elif "output" in self.open and "code" not in self.open and is_shown_code(classes):
            kind = "code"
        if kind:
            self.open[kind] = []
        self.stack.append((tag, kind))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        while self.stack:
            open_tag, kind = self.stack.pop()
            if kind:
                text = "".join(self.open.pop(kind))
                if kind != "code":
                    (self.math if kind == "math" else self.outputs).append(text)
            if open_tag == tag:
                break

    def handle_data(self, data):
        for kind, pieces in self.open.items():
            if kind == "code" or "code" not in self.open:
                pieces.append(data)


def regions(path: Path) -> Regions:
    parser = Regions()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser


# ---------------------------------------------------------------------------- detectors

# groups whose argument is text, not math
TEXT_GROUP = re.compile(r"\\(?:text\w*|mathrm|mathit|mathsf|mathtt|mathbf|mathcal|operatorname\*?|mbox|label|tag"
                        r"|begin|end)\s*\{[^{}]*\}")
COMMAND = re.compile(r"\\[A-Za-z]+")
SCRIPT_GROUP = re.compile(r"[_^]\s*\{[^{}]*\}")          # L_{cache}, x^{max}: labels, not prose
WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
# Prose read as math shows English: a function word ("at an assumed", "of the") or three words in a
# row. Math uses one-letter symbols, commands, \text{...} and names such as dlogp or Hk.
FUNCTION_WORDS = {"the", "of", "and", "at", "an", "to", "is", "are", "for", "per", "with", "from", "by", "on",
                  "or", "as", "that", "this", "it", "be", "its", "was", "were", "than", "then", "which"}


def _balanced_braces(tex: str) -> bool:
    depth = 0
    for ch in re.sub(r"\\[{}\\]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def math_problems(span: str) -> list[str]:
    """What is wrong with the TeX source of one math span ('' when nothing is)."""
    tex = span.strip()
    for left, right in ((r"\(", r"\)"), (r"\[", r"\]")):
        if tex.startswith(left) and tex.endswith(right):
            tex = tex[len(left):-len(right)]
    problems = []
    if not _balanced_braces(tex):
        problems.append("unbalanced braces")
    if len(re.findall(r"\\left\b", tex)) != len(re.findall(r"\\right\b", tex)):
        problems.append(r"unbalanced \left/\right")
    if len(re.findall(r"\\begin\{", tex)) != len(re.findall(r"\\end\{", tex)):
        problems.append(r"unbalanced \begin/\end")
    if "**" in tex or "`" in tex or re.search(r"(?<!\\)\$", tex):
        problems.append("Markdown or a dollar sign inside math")
    bare = tex
    while (stripped := SCRIPT_GROUP.sub(" ", TEXT_GROUP.sub(" ", bare))) != bare:
        bare = stripped
    bare = COMMAND.sub(" ", bare)
    words = [m.group(0) for m in WORD.finditer(bare)]
    english = [w for w in words if w.lower() in FUNCTION_WORDS]
    runs = re.findall(r"(?<![A-Za-z])[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){2,}(?![A-Za-z])", bare)
    if english or runs:
        problems.append(f"ordinary words {(english + runs)[:3]}")
    return problems


OUTPUT_NOISE = {
    "a warning": re.compile(r"\b[A-Z]\w*Warning\b|\bWarning:|\bwarnings\.warn\b"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)|^\s*File \"[^\"]+\", line \d+", re.M),
    "a machine path": re.compile(r"/tmp/|/home/|\.venv\b|/work/|site-packages"),
    "a NumPy scalar repr": re.compile(r"\bnp\.(?:float|int|uint|bool|complex|str)\w*\("),
}


def output_problems(text: str) -> list[str]:
    """What an output shows that a reader should not see: each kind of noise with its first line."""
    found = []
    for what, pattern in OUTPUT_NOISE.items():
        m = pattern.search(text)
        if m:
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            found.append(f"{what}: {text[start:end if end >= 0 else None].strip()[:120]!r}")
    return found


# ---------------------------------------------------------------------------- the detectors can fail


@pytest.mark.parametrize("span", [
    r"\(5.576M at an assumed \)",                        # dollars read as math
    r"\(2 per GPU-hour, the H800's FP8 peak \)",
    r"\(5.576M.** DeepSeek-V3 gives 2.664M H800 GPU-hours \)",
])
def test_math_detector_flags_prose_read_as_math(span):
    assert math_problems(span), span


@pytest.mark.parametrize("span, problem", [
    (r"\(\frac{a}{b \)", "unbalanced braces"),
    (r"\(\left( x \)", r"unbalanced \left/\right"),
    (r"\(**The \)", "Markdown or a dollar sign inside math"),
    (r"\[\begin{aligned} a &= b \]", r"unbalanced \begin/\end"),
])
def test_math_detector_flags_unbalanced_markup(span, problem):
    assert problem in math_problems(span)


@pytest.mark.parametrize("span", [
    r"\(\mathrm{softmax}(z)_i = e^{z_i} / \sum_j e^{z_j}\)",
    r"\[ r = \frac{3600 \cdot \text{peak} \cdot \text{MFU}}{\text{forward FLOPs per token}}. \]",
    r"\(\operatorname{silu}'(g) = 0\)",
    r"\(\lVert \hat x - x \rVert / \lVert x \rVert\)",
    r"\(2 H_k D_h L b\)",
    r"\(\{0, 1\}\)",
    r"\[\begin{aligned} \mathcal{L}_{\text{aux}} &= \alpha \sum_i f_i P_i \end{aligned}\]",
    r"\(dx = dlogp - p \sum_j dlogp_j\)",                # names of arrays, not prose
    r"\(W_{i,t} = m_{i,t} / \max(N_{items},1)\)",
    r"\(0 & |y| \le L_{max} - L_{cache}\)",
])
def test_math_detector_passes_real_math(span):
    assert math_problems(span) == [], span


def test_output_detector_flags_each_kind_of_noise():
    text = ("loss 0.1\n/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: "
            "TqdmWarning: IProgress not found\nWarning: machine busy\n"
            "Traceback (most recent call last):\nnp.float64(0.952)\n")
    kinds = [p.split(":")[0] for p in output_problems(text)]
    assert kinds == ["a warning", "a traceback", "a machine path", "a NumPy scalar repr"], kinds
    assert output_problems("loss 0.952, 12.3% of 83.5 GFLOP\n| a | b |") == []


def test_parser_finds_math_and_outputs():
    page = ('<p>cost <span class="math notranslate nohighlight">\\(x_{i}\\)</span> and <br>'
            '<div class="cell_output docutils container"><div class="output stream"><pre>np.float64(1.0)</pre></div>'
            '<img src="a.png"></div><p>after</p>')
    r = Regions()
    r.feed(page)
    assert r.math == ["\\(x_{i}\\)"] and r.outputs == ["np.float64(1.0)"]
    shown = ('<div class="cell_output docutils container"><div class="highlight-python notranslate">'
             '<pre>one = np.float32(1.0)</pre></div><pre>printed</pre></div>')
    r = Regions()
    r.feed(shown)
    assert r.outputs == ["printed"]                 # source shown by show_source is code, not output


# ---------------------------------------------------------------------------- the build


@pytest.mark.parametrize("page", book_pages() or ["(no build)"])
def test_page_has_clean_math_and_outputs(page):
    if page == "(no build)":
        pytest.skip(f"no built book at {HTML}: run `make book` first")
    found = regions(HTML / page)
    bad_math = [f"{span.strip()[:90]!r}: {', '.join(p)}" for span in found.math if (p := math_problems(span))]
    bad_out = [p for text in found.outputs for p in output_problems(text)]
    assert not bad_math and not bad_out, f"{page}:\n" + "\n".join(f"  math {m}" for m in bad_math) + "\n" + \
        "\n".join(f"  output with {o}" for o in bad_out)


FIGURE = re.compile(r'<(figure|div)[^>]*\bid="(diagram-[\w-]+)"[^>]*>(.*?)</\1>', re.S)


def test_every_diagram_is_in_the_book_with_alt_text():
    """Each diagram of refimpl.diagrams is a figure ``diagram-<name>`` whose image exists and has an alt text."""
    pytest.importorskip("matplotlib")
    from refimpl.diagrams import DIAGRAMS

    pages = book_pages()
    if not pages:
        pytest.skip(f"no built book at {HTML}: run `make book` first")
    found = {}
    for page in pages:
        for _, fig_id, body in FIGURE.findall((HTML / page).read_text(encoding="utf-8", errors="replace")):
            img = re.search(r"<img\b[^>]*>", body)
            alt = re.search(r'\balt="([^"]*)"', img.group(0)) if img else None
            src = re.search(r'\bsrc="([^"]+)"', img.group(0)) if img else None
            found[fig_id] = (page, alt.group(1) if alt else "", src.group(1) if src else None)
    expected = {"diagram-" + name.replace("_", "-") for name in DIAGRAMS}
    assert expected <= set(found), f"diagrams missing from the book: {sorted(expected - set(found))}"
    for fig_id, (page, alt, src) in found.items():
        assert len(alt.split()) >= 8, f"{page}: {fig_id} has no alt text of a sentence or more: {alt!r}"
        assert src and ((HTML / page).parent / src).is_file(), f"{page}: {fig_id} image {src!r} is not in the build"
