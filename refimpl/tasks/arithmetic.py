"""Multi-digit addition, where writing the column sums inside ``<think>`` helps a tiny model.

A small transformer cannot add two 3-digit numbers "in its head" in one step reliably: the carry
from the units column changes the hundreds digit. Writing the column sums from the right, carries
included, turns the task into a chain of one-digit additions, each of which is easy given the
previous one — the small-scale version of why chains of thought help (DeepSeek-R1 §2.2, §2.3).

Prompt ``"47+85="``, answer ``"132"``, reference trace ``"7+5=12,4+8+1=13"`` (one
``a+b[+carry]=s`` per column, least significant first; a missing digit is written 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import Example, check_rng

_PROMPT = re.compile(r"(\d+)\+(\d+)=")


@dataclass(frozen=True)
class AdditionTask:
    """Add two numbers of ``min_digits``..``max_digits`` digits (each length equally likely)."""

    min_digits: int = 1
    max_digits: int = 3
    name = "addition"

    def __post_init__(self):
        if not (isinstance(self.min_digits, int) and isinstance(self.max_digits, int)
                and 1 <= self.min_digits <= self.max_digits <= 9):
            raise ValueError(f"min_digits, max_digits: expected 1 <= min_digits <= max_digits <= 9, "
                             f"got {self.min_digits}, {self.max_digits}")

    def _operand(self, rng) -> int:
        d = int(rng.integers(self.min_digits, self.max_digits + 1))
        return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d))

    def sample(self, rng) -> Example:
        rng = check_rng(rng)
        a, b = self._operand(rng), self._operand(rng)
        return Example(f"{a}+{b}=", str(a + b))

    @staticmethod
    def _parse(prompt: str) -> tuple[str, str]:
        m = _PROMPT.fullmatch(prompt)
        if m is None:
            raise ValueError(f"prompt: expected 'a+b=' with decimal a, b, got {prompt!r}")
        return m.group(1), m.group(2)

    def solve(self, prompt: str) -> str:
        a, b = self._parse(prompt)
        return str(int(a) + int(b))

    def chain_of_thought(self, prompt: str) -> str:
        a, b = self._parse(prompt)
        width = max(len(a), len(b))
        a, b = a.zfill(width)[::-1], b.zfill(width)[::-1]
        steps, carry = [], 0
        for da, db in zip(a, b, strict=True):
            s = int(da) + int(db) + carry
            steps.append(f"{da}+{db}" + ("+1" if carry else "") + f"={s}")
            carry = s // 10
        return ",".join(steps)

    def check(self, pred: str, gold: str) -> bool:
        """Right iff ``pred`` is a decimal integer (surrounding spaces allowed) equal to ``gold``."""
        pred = pred.strip()
        if not re.fullmatch(r"\d+", pred):
            return False
        digits = pred.lstrip("0") or "0"     # int() refuses > 4300 digits; no such gold exists
        return len(digits) <= len(gold.strip()) and int(digits) == int(gold)
