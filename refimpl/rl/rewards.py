r"""Rule-based rewards for reasoning RL (DeepSeek-R1 §2.2.2, §2.3; DAPO §3.4).

DeepSeek-R1-Zero was trained with two deterministic rewards only — no neural reward model, to avoid
reward hacking and retraining (R1 §2.2.2):

* **accuracy**: is the final answer right? The answer must appear in a fixed place — here between
  ``<answer>`` and ``</answer>`` — so a rule can check it;
* **format**: is the reasoning enclosed in ``<think>`` … ``</think>`` (followed by the answer)?

R1 (§2.3) adds a **language-consistency** reward, the proportion of target-language words in the
chain of thought, to stop language mixing; DAPO (§3.4, eq. 13) adds a soft **overlong** penalty
instead of punishing every truncated sample equally. The total reward is a weighted sum of the
reward functions, as TRL's ``reward_weights``.

Every function here is pure and deterministic, takes a list of completion strings (decoded text,
tags included) and returns a float64 array of shape (B,).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from .._validate import check_integer

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_BODY = r"(?:(?!</?(?:think|answer)>).)*"          # any text that contains no tag
_FORMAT = re.compile(rf"<think>{_BODY}</think><answer>{_BODY}</answer>", re.DOTALL)
_FORMAT_NL = re.compile(rf"<think>\n{_BODY}\n</think>\n<answer>\n{_BODY}\n</answer>", re.DOTALL)


def _check_completions(completions) -> list[str]:
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise TypeError(f"completions: expected a list of str, got {type(completions).__name__}")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"completions: expected str items, item {i} is {type(c).__name__}")
    return list(completions)


def _blocks(text: str, open_tag: str, close_tag: str):
    """The contents of the non-overlapping ``open_tag…close_tag`` pairs, left to right (what
    ``re.findall(open(.*?)close, DOTALL)`` finds), in time linear in ``len(text)``: a lazy regex
    rescans the rest of the text from every unclosed opening tag, quadratic on model samples
    such as ``"<answer>" * 16000``."""
    pos = 0
    while True:
        i = text.find(open_tag, pos)
        if i < 0:
            return
        j = text.find(close_tag, i + len(open_tag))
        if j < 0:          # no closing tag after this opening one, so none after any later one
            return
        yield text[i + len(open_tag):j]
        pos = j + len(close_tag)


def extract_answer(text: str) -> str | None:
    """The stripped content of the *last* ``<answer>…</answer>`` pair in ``text``, or None.

    Linear in ``len(text)`` (rewards run on arbitrary model samples)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    last = None
    for last in _blocks(text, "<answer>", "</answer>"):  # noqa: B007 - the last one is wanted
        pass
    return None if last is None else last.strip()


def exact_match(pred: str, gold: str) -> bool:
    """Default answer check: equal strings after stripping surrounding whitespace."""
    return pred.strip() == gold.strip()


def accuracy_reward(completions, answers, *, check: Callable[[str, str], bool] | None = None,
                    correct=1.0, incorrect=0.0) -> np.ndarray:
    r"""1 if the completion's final answer is right, else 0 (R1 §2.2.2 "accuracy rewards").

    The answer is :func:`extract_answer` of the completion; no ``<answer>`` block counts as wrong.
    ``check(pred, gold)`` is the task's exact checker (default :func:`exact_match`; each task in
    :mod:`refimpl.tasks` has one). DAPO/verl score ±1: pass ``incorrect=-1.0``.

    Shapes: completions list[str] (B), answers list[str] (B) -> (B,) float64.
    """
    completions = _check_completions(completions)
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) != len(completions):
        raise ValueError(f"answers: expected a list of {len(completions)} gold answers (one per completion), "
                         f"got {answers!r:.80}")
    check = exact_match if check is None else check
    out = np.empty(len(completions))                                    # (B,)
    for i, (c, gold) in enumerate(zip(completions, answers, strict=True)):
        pred = extract_answer(c)
        out[i] = correct if pred is not None and check(pred, str(gold)) else incorrect
    return out


def format_reward(completions, *, newlines=False) -> np.ndarray:
    r"""1 iff the whole completion is ``<think>…</think><answer>…</answer>`` (R1 §2.2.2, Table 1).

    Strict: the completion must *fully* match, each tag must appear exactly once and in that order,
    and nothing may follow ``</answer>``. ``newlines=True`` requires open-r1's layout, a newline
    after each opening and around each closing tag (``<think>\n…\n</think>\n<answer>\n…\n</answer>``).

    Differs from open-r1's ``format_reward`` in two ways, both stricter: open-r1 matches with
    ``re.MULTILINE``, so its trailing ``$`` accepts text after ``</answer>`` once a newline
    separates it, and its ``.*?`` lets tags appear inside the blocks. refimpl's default layout has
    no newlines because the tiny models here have contexts of ~64 characters.

    Shapes: completions list[str] (B) -> (B,) float64 in {0, 1}.
    """
    pattern = _FORMAT_NL if newlines else _FORMAT
    return np.array([1.0 if pattern.fullmatch(c) else 0.0 for c in _check_completions(completions)])


def tag_count_reward(completions) -> np.ndarray:
    """0.25 for each of the four tags that appears exactly once (a denser format signal, after
    open-r1's ``tag_count_reward``, which also requires the newlines). Shapes: (B) -> (B,)."""
    return np.array([sum(0.25 for t in TAGS if c.count(t) == 1) for c in _check_completions(completions)])


def overlong_penalty(lengths, *, max_completion_len, soft_punish_cache) -> np.ndarray:
    r"""DAPO's soft overlong punishment (DAPO §3.4, eq. 13; TRL ``get_soft_overlong_punishment``).

    .. math:: R_{\mathrm{length}}(y) = \begin{cases} 0 & |y| \le L_{max} - L_{cache} \\
              \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}} & L_{max} - L_{cache} < |y| \le L_{max} \\
              -1 & L_{max} < |y| \end{cases}

    added to the task reward. ``lengths`` are completion lengths in tokens.

    Shapes: lengths (B,) int -> (B,) float64 in [-1, 0].
    """
    lengths = np.asarray(lengths)
    if not np.issubdtype(lengths.dtype, np.integer) or lengths.ndim != 1:
        raise TypeError(f"lengths: expected a 1-D integer array, got dtype {lengths.dtype}, shape {lengths.shape}")
    for name, v in (("max_completion_len", max_completion_len), ("soft_punish_cache", soft_punish_cache)):
        check_integer(name, v, low=0)
    if soft_punish_cache > max_completion_len:
        raise ValueError(f"soft_punish_cache: expected <= max_completion_len={max_completion_len}, "
                         f"got {soft_punish_cache}")
    safe = max_completion_len - soft_punish_cache
    ramp = (safe - lengths) / max(soft_punish_cache, 1)                 # (B,)
    return np.where(lengths <= safe, 0.0, np.where(lengths <= max_completion_len, ramp, -1.0))


def language_consistency_reward(completions, *, alphabet, unit="char") -> np.ndarray:
    r"""Fraction of the chain of thought written in the allowed alphabet (R1 §2.3).

    R1 rewards the proportion of target-language *words* in the CoT to stop language mixing. This
    hook measures the text inside the first ``<think>…</think>`` block: with ``unit="char"`` the
    fraction of its non-whitespace characters in ``alphabet``, with ``unit="word"`` the fraction
    of whitespace-separated words made only of such characters. No ``<think>`` block, or an empty
    one, scores 0 (an absent CoT is not rewarded).

    Shapes: completions list[str] (B) -> (B,) float64 in [0, 1].
    """
    if unit not in ("char", "word"):
        raise ValueError(f"unit: expected 'char' or 'word', got {unit!r}")
    if not isinstance(alphabet, str | list | tuple | set | frozenset):
        raise TypeError(f"alphabet: expected a str or a collection of characters, got {type(alphabet).__name__}")
    allowed = set(alphabet)
    if not allowed:
        raise ValueError("alphabet: expected a non-empty collection of characters")
    out = []
    for c in _check_completions(completions):
        found = next(_blocks(c, "<think>", "</think>"), None)
        items = [] if found is None else (found.split() if unit == "word"
                                          else [ch for ch in found if not ch.isspace()])
        ok = [all(ch in allowed for ch in it) for it in items]
        out.append(float(np.mean(ok)) if ok else 0.0)
    return np.array(out)


def combine_rewards(rewards_per_func, weights=None) -> np.ndarray:
    r"""Weighted sum of reward functions, :math:`r_i = \sum_k w_k r_i^{(k)}` (TRL ``reward_weights``).

    As in TRL, a NaN entry (a reward function that does not apply to that sample) is skipped
    (``nansum``); a row where *every* function is NaN stays NaN, which
    :func:`~refimpl.rl.advantages.group_advantages` with ``nan_policy="omit"`` leaves out of the
    baseline. Shapes: rewards_per_func (B, F), weights (F,) or None (all 1) -> (B,) float64.
    """
    r = np.asarray(rewards_per_func, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] == 0:
        raise ValueError(f"rewards_per_func: expected shape (B, F) with F >= 1, got {r.shape}")
    if np.isinf(r).any():
        raise ValueError("rewards_per_func: contains inf")
    try:
        w = np.ones(r.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)  # (F,)
    except (ValueError, TypeError):
        raise TypeError(f"weights: expected {r.shape[1]} numbers, got {weights!r:.80}") from None
    if w.shape != (r.shape[1],) or not np.isfinite(w).all():
        raise ValueError(f"weights: expected {r.shape[1]} finite weights (one per reward function), got {w!r}")
    total = np.nansum(r * w, axis=1)                                    # (B,)
    return np.where(np.isnan(r).all(axis=1), np.nan, total)             # (B,)
