"""Sorting a short list of digits, with a selection-sort trace as the chain of thought.

Prompt ``"sort 531="``, answer ``"135"``. The reference trace repeatedly takes the smallest
remaining digit and writes what is left, ``"1|53,3|5,5|"``, so each step is a small lookup the
model can check against the previous step instead of producing the whole permutation at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import Example, check_rng

_PROMPT = re.compile(r"sort (\d+)=")


@dataclass(frozen=True)
class SortingTask:
    """Sort ``min_len``..``max_len`` random decimal digits (repeats allowed) ascending."""

    min_len: int = 3
    max_len: int = 5
    name = "sorting"

    def __post_init__(self):
        if not (isinstance(self.min_len, int) and isinstance(self.max_len, int)
                and 1 <= self.min_len <= self.max_len <= 12):
            raise ValueError(f"min_len, max_len: expected 1 <= min_len <= max_len <= 12, "
                             f"got {self.min_len}, {self.max_len}")

    def sample(self, rng) -> Example:
        rng = check_rng(rng)
        n = int(rng.integers(self.min_len, self.max_len + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=n))
        return Example(f"sort {digits}=", "".join(sorted(digits)))

    @staticmethod
    def _parse(prompt: str) -> str:
        m = _PROMPT.fullmatch(prompt)
        if m is None:
            raise ValueError(f"prompt: expected 'sort <digits>=', got {prompt!r}")
        return m.group(1)

    def solve(self, prompt: str) -> str:
        return "".join(sorted(self._parse(prompt)))

    def chain_of_thought(self, prompt: str) -> str:
        rest, steps = self._parse(prompt), []
        while rest:
            k = rest.index(min(rest))
            low, rest = rest[k], rest[:k] + rest[k + 1:]
            steps.append(f"{low}|{rest}")
        return ",".join(steps)

    def check(self, pred: str, gold: str) -> bool:
        """Right iff ``pred`` equals ``gold`` exactly, apart from surrounding whitespace."""
        return pred.strip() == gold
