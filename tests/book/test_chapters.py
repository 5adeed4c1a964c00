"""Every chapter in the book's table of contents is a chapter of one text (issue: the book as readers get it).

Checked on the jupytext sources, without executing anything: each chapter cites its sources,
cross-references another page or equation, draws at least one figure, and ends with an
``## Exercises`` section of 2-4 numbered exercises, each followed by a solution cell tagged
``hide-cell`` that asserts its answer (so the build checks the solutions). Equation labels are
unique across the book, and the labels other chapters rely on exist where they were agreed.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "book"


def toc_chapters() -> list[str]:
    """The notebooks/*.py chapters listed (not commented out) in book/_toc.yml, in order."""
    lines = (BOOK / "_toc.yml").read_text().splitlines()
    return [m.group(1) for line in lines if (m := re.match(r"\s*- file: notebooks/(\S+)", line))]


def cells(source: str) -> list[tuple[str, str]]:
    """(header, body) of each py:percent cell: header is the ``# %%`` line."""
    parts = re.split(r"^(# %%.*)$", source, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


CHAPTERS = toc_chapters()
# Pages in the toc that are about refimpl itself rather than a paper, so they need not cite one.
NO_CITATION_NEEDED = {"11_performance": "measures refimpl's own NumPy, Numba and torch code paths"}
ASSERTION = re.compile(r"^[ \t]*(?:assert\b|np\.testing\.assert_\w+\()", re.M)
AGREED_LABELS = {"eq-mla-cache": "03_mla", "eq-moe-dispatch": "04_moe", "eq-grpo-loss": "06_grpo",
                 "eq-gjsd": "08_distill"}


def test_toc_lists_existing_chapters():
    assert CHAPTERS, "no chapters found in book/_toc.yml"
    for name in CHAPTERS:
        assert (ROOT / "notebooks" / f"{name}.py").is_file(), f"{name} is in _toc.yml but has no notebooks/{name}.py"


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_is_part_of_the_text(name):
    source = (ROOT / "notebooks" / f"{name}.py").read_text()
    assert "{cite}`" in source or name in NO_CITATION_NEEDED, f"{name}: cites nothing"
    assert re.search(r"\{(doc|eq)\}`", source), f"{name}: no cross-reference to another chapter or equation"
    assert re.search(r"^[^#\n]*(plt\.show\(\)|\.savefig\(|display\(fig)", source, re.M), f"{name}: no figure (in code)"


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_ends_with_checked_exercises(name):
    source = (ROOT / "notebooks" / f"{name}.py").read_text()
    all_cells = cells(source)
    starts = [i for i, (head, body) in enumerate(all_cells)
              if "[markdown]" in head and re.search(r"^# ## Exercises\s*$", body, re.M)]
    assert len(starts) == 1, f"{name}: expected one '## Exercises' section, found {len(starts)}"
    tail = all_cells[starts[0]:]
    assert not any(re.search(r"^# ## ", body, re.M) for head, body in tail[1:] if "[markdown]" in head), (
        f"{name}: '## Exercises' must be the last section")
    numbered = [int(n) for head, body in tail if "[markdown]" in head for n in re.findall(r"^# (\d)\. ", body, re.M)]
    assert 2 <= len(numbered) <= 4 and numbered == list(range(1, len(numbered) + 1)), (
        f"{name}: expected 2-4 exercises numbered 1., 2., ...; found {numbered}")
    solutions = [body for head, body in tail if 'tags=["hide-cell"]' in head]
    assert len(solutions) == len(numbered), (
        f"{name}: {len(numbered)} exercises but {len(solutions)} hide-cell solutions")
    for k, body in enumerate(solutions, 1):  # an assert statement or np.testing call, not the word in a comment
        assert ASSERTION.search(body), f"{name}: solution {k} asserts nothing"
    # each exercise is followed by its own solution: markdown and hide-cell cells alternate (a last
    # plain code cell, such as a print of the chapter's run time, may follow)
    kinds = ["md" if "[markdown]" in head else "sol" if 'tags=["hide-cell"]' in head else "code" for head, _ in tail]
    while kinds and kinds[-1] == "code":
        kinds.pop()
    assert kinds == ["md", "sol"] * len(numbered), f"{name}: exercises and solutions should alternate, got {kinds}"


def test_equation_labels_are_unique_and_agreed_labels_exist():
    owners: dict[str, list[str]] = {}
    for path in sorted((ROOT / "notebooks").glob("*.py")) + sorted(BOOK.glob("*.md")):
        for label in re.findall(r"^#? ?\$\$ \((eq-[A-Za-z0-9_-]+)\)\s*$", path.read_text(), re.M):
            owners.setdefault(label, []).append(path.stem)
    duplicated = {k: v for k, v in owners.items() if len(v) > 1}
    assert not duplicated, f"equation labels defined twice: {duplicated}"
    for label, chapter in AGREED_LABELS.items():
        if chapter in CHAPTERS:
            assert owners.get(label) == [chapter], f"{label} should be defined in {chapter}, found {owners.get(label)}"
