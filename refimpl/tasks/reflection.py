r"""Traces that check themselves: the grammar of the "aha" miniature, its corpus, and detectors.

DeepSeek-R1-Zero learned, under RL with accuracy and format rewards only, to re-evaluate its
first approach ("Wait, wait. Wait. That's an aha moment I can flag here", R1 §2.2.4). Studies of
why it happens find that the base model must already show the behaviour, rarely: RL then makes it
common when it pays. The miniature writes that situation into a base corpus for addition.

A completion is ``<think>`` *first answer* [*check*] ``</think><answer>`` *final* ``</answer>``:

* **no check** (most documents): ``<think>122</think><answer>122</answer>`` — an answer "in the
  head", written by a careless writer who drops each carry with probability ``1 - p_carry``, so it
  is often wrong (``47+85`` has answer 132);
* **a check that passes**: ``<think>132. check 47+85: 7+5=12,4+8+1=13 so 132. ok</think><answer>132</answer>``
  — the writer verifies the first answer by restating the problem and recomputing it column by
  column, carries written;
* **a check that fails, then the fix**: ``<think>122. check 47+85: 7+5=12,4+8+1=13 so 132. wait, 132</think>``
  ``<answer>132</answer>`` — the recomputation disagrees, the writer says "wait" and takes the
  recomputed value.

:func:`parse_reflection` reads any completion back into its parts, whatever the policy wrote, and
:func:`reflection_stats` turns a list of completions into the rates the recipe reports.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .arithmetic import AdditionTask
from .base import Example, check_rng, format_completion

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CHECK = re.compile(r"check (.*?) so (\d+)\.")
_COLUMNS = AdditionTask()           # its chain_of_thought: the column sums of any a+b prompt


def careless_answer(a: int, b: int, rng, *, p_carry: float) -> str:
    """``a + b`` computed column by column, each carry into the next column kept with probability
    ``p_carry`` (else dropped); the last column's sum is written in full, as on paper."""
    rng = check_rng(rng)
    x, y = str(a)[::-1], str(b)[::-1]
    width = max(len(x), len(y))
    out, carry = "", 0
    for i in range(width):
        s = int(x[i] if i < len(x) else 0) + int(y[i] if i < len(y) else 0) + carry
        out = (str(s) if i == width - 1 else str(s % 10)) + out
        carry = (s // 10) if rng.random() < p_carry else 0
    return str(int(out))


def reflective_completion(example: Example, rng, *, p_check: float, p_carry: float) -> str:
    """One document of the base corpus (see the module docstring): a careless first answer, and with
    probability ``p_check`` a check by column-wise recomputation, with "wait" and the fix if it fails."""
    a, b = (int(s) for s in example.prompt[:-1].split("+"))
    first = careless_answer(a, b, rng, p_carry=p_carry)
    if rng.random() >= p_check:
        return format_completion(first, first)
    right = example.answer
    verdict = "ok" if first == right else f"wait, {right}"
    check = f"check {example.prompt[:-1]}: {_COLUMNS.chain_of_thought(example.prompt)} so {right}"
    return format_completion(f"{first}. {check}. {verdict}", right)


class Reflection(NamedTuple):
    """A completion read back (:func:`parse_reflection`). ``first``: the first answer written in
    ``<think>`` (None if none); ``checked``: a check was written; ``check_value``: the value it
    computed (None if none); ``waited``: a "wait" follows; ``final``: the ``<answer>`` (None if none)."""

    first: str | None
    checked: bool
    check_value: str | None
    waited: bool
    final: str | None


def parse_reflection(completion: str) -> Reflection:
    """Split a completion into first answer, check, "wait" and final answer (tolerant of any text)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected a str, got {type(completion).__name__}")
    think = _THINK.search(completion)
    body = think.group(1) if think else ""
    first = re.match(r"\s*(\d+)", body)
    check = _CHECK.search(body)
    answers = _ANSWER.findall(completion)
    return Reflection(first=first.group(1) if first else None, checked="check" in body,
                      check_value=check.group(2) if check else None, waited="wait" in body,
                      final=answers[-1].strip() if answers else None)


def is_self_correction(completion: str, gold: str) -> bool:
    """True iff the first answer is wrong, a check follows, and the final answer is right (whether or
    not the completion says "wait": RL keeps the fix and may drop the word, see the "aha" recipe)."""
    r = parse_reflection(completion)
    return r.checked and r.first is not None and r.first != gold and r.final == gold


def reflection_stats(completions, answers) -> dict:
    """Rates over a list of completions and their gold answers.

    ``reflection_rate``: completions that write a check; ``wait_rate``: that write "wait";
    ``self_correction_rate``: a wrong first answer turned into a right final one
    (:func:`is_self_correction`); ``first_accuracy`` / ``final_accuracy``: the first and final
    answers' accuracy; ``failed_check_unfixed``: a check that disagreed with a wrong first answer,
    yet the final answer is that wrong first answer.
    """
    if isinstance(completions, str) or len(completions) != len(answers) or not completions:
        raise ValueError(f"answers: expected one gold answer per completion (at least one), got {len(answers)} "
                         f"for {len(completions)}")
    rs = [parse_reflection(c) for c in completions]
    n = len(rs)

    def rate(flags):
        return float(np.sum(flags) / n)
    return {
        "reflection_rate": rate([r.checked for r in rs]),
        "wait_rate": rate([r.waited for r in rs]),
        "self_correction_rate": rate([is_self_correction(c, g) for c, g in zip(completions, answers, strict=True)]),
        "first_accuracy": rate([r.first == g for r, g in zip(rs, answers, strict=True)]),
        "final_accuracy": rate([r.final == g for r, g in zip(rs, answers, strict=True)]),
        "failed_check_unfixed": rate([r.checked and r.check_value is not None and r.check_value != r.first
                                      and r.first != g and r.final == r.first
                                      for r, g in zip(rs, answers, strict=True)]),
    }
