"""Longer additions mixed with multiplication by one digit: a task on which R1's stages can be told apart.

The addition task of :mod:`refimpl.tasks.arithmetic` is solved by R1-Zero in a few steps, so the
R1 chapter could not show what the cold start and the later stages add. This task is harder in
two ways: additions have up to 4 digits (more carries), and half the problems multiply a 2- or
3-digit number by one digit, where a carry is any of 0..8 instead of 0 or 1.

Prompts ``"4738+985="`` or ``"347*6="``. The reference trace works column by column, least
significant first, carries written, in one grammar for both operations:

* addition ``"8+5=13,3+8+1=12,7+9+1=17,4+0+1=5"`` (a missing digit is written 0, as in
  :class:`~refimpl.tasks.AdditionTask`);
* multiplication ``"7*6=42,4*6+4=28,3*6+2=20"``: digit times multiplier plus the carry.

In both the answer reads off the written sums: the last one in full, then the units digits of the
others, right to left (``20``, ``8``, ``2`` → ``2082``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import Example, check_rng

_PROMPT = re.compile(r"(\d+)([+*])(\d+)=")


def column_steps(a: str, op: str, b: str, keep_carry=None) -> tuple[list[str], str]:
    """The column steps of ``a op b`` (``op`` ``"+"`` or ``"*"``; for ``"*"`` ``b`` is one digit) and
    the answer read off them. ``keep_carry(column) -> bool`` decides whether a carry into a column is
    written (None: always, the correct trace); a dropped carry changes that column and, consistently,
    everything read off it.
    """
    if op == "+":
        width = max(len(a), len(b))
        cols = list(zip(a.zfill(width)[::-1], b.zfill(width)[::-1], strict=True))
    else:
        cols = [(d, b) for d in a[::-1]]
    steps, sums, carry = [], [], 0
    for i, (x, y) in enumerate(cols):
        written = carry if carry and (keep_carry is None or keep_carry(i)) else 0
        s = (int(x) + int(y) if op == "+" else int(x) * int(y)) + written
        steps.append(f"{x}{op}{y}" + (f"+{written}" if written else "") + f"={s}")
        sums.append(s)
        carry = s // 10
    answer = str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1]))
    return steps, str(int(answer))


@dataclass(frozen=True)
class MixedArithmeticTask:
    """Addition of two numbers of ``add_min``..``add_max`` digits, or (probability ``p_mul``) a number
    of ``mul_min``..``mul_max`` digits times one digit 2..9."""

    add_min: int = 2
    add_max: int = 4
    mul_min: int = 2
    mul_max: int = 3
    p_mul: float = 0.5
    name = "mixed-arithmetic"

    def __post_init__(self):
        for lo, hi in (("add_min", "add_max"), ("mul_min", "mul_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not (isinstance(a, int) and isinstance(b, int) and 1 <= a <= b <= 6):
                raise ValueError(f"{lo}, {hi}: expected 1 <= {lo} <= {hi} <= 6, got {a}, {b}")
        if not (isinstance(self.p_mul, int | float) and 0.0 <= self.p_mul <= 1.0):
            raise ValueError(f"p_mul: expected a probability in [0, 1], got {self.p_mul!r}")

    @staticmethod
    def _number(rng, lo, hi) -> int:
        d = int(rng.integers(lo, hi + 1))
        return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d))

    def sample(self, rng) -> Example:
        rng = check_rng(rng)
        if rng.random() < self.p_mul:
            a, b = self._number(rng, self.mul_min, self.mul_max), int(rng.integers(2, 10))
            return Example(f"{a}*{b}=", str(a * b))
        a, b = self._number(rng, self.add_min, self.add_max), self._number(rng, self.add_min, self.add_max)
        return Example(f"{a}+{b}=", str(a + b))

    @staticmethod
    def parse(prompt: str) -> tuple[str, str, str]:
        """``(a, op, b)`` of a prompt ``"a+b="`` or ``"a*b="`` (``b`` one digit for ``*``)."""
        m = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
        if m is None or (m.group(2) == "*" and len(m.group(3)) != 1):
            raise ValueError(f"prompt: expected 'a+b=' or 'a*d=' with decimal a, b and one digit d, got {prompt!r}")
        return m.group(1), m.group(2), m.group(3)

    def solve(self, prompt: str) -> str:
        a, op, b = self.parse(prompt)
        return str(int(a) + int(b) if op == "+" else int(a) * int(b))

    def chain_of_thought(self, prompt: str) -> str:
        return ",".join(column_steps(*self.parse(prompt))[0])

    def check(self, pred: str, gold: str) -> bool:
        """Right iff ``pred`` is a decimal integer (surrounding spaces allowed) equal to ``gold``."""
        pred = pred.strip()
        if not re.fullmatch(r"\d+", pred):
            return False
        digits = pred.lstrip("0") or "0"
        return len(digits) <= len(gold.strip()) and int(digits) == int(gold)
