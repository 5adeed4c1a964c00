r"""What every toy reasoning task provides, and the dataset helpers shared by all of them.

A task is a small frozen dataclass with

* ``name`` — its registry key;
* ``sample(rng) -> Example`` — a random (prompt, answer) pair from a ``numpy.random.Generator``;
* ``solve(prompt) -> str`` — the exact answer (the ground truth the generator stores);
* ``chain_of_thought(prompt) -> str`` — a reference reasoning trace, written the way a person
  would work it out step by step (the cold-start SFT data of the R1 recipe, DeepSeek-R1 §2.3.1);
* ``check(pred, gold) -> bool`` — the rule that decides correctness (the accuracy reward, §2.2.2).

A completion in the R1 format is ``<think>`` trace ``</think><answer>`` answer ``</answer>``
(:func:`format_completion`). Held-out evaluation sets are fixed by a seed derived from the task's
name and configuration (:func:`eval_set`), and :func:`make_dataset` leaves them out of training
data by default.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Protocol

import numpy as np

from .._validate import check_integer

EVAL_SEED = 20250122  # fixed: the held-out sets must not change between runs or versions
EVAL_SIZE = 256


class Example(NamedTuple):
    prompt: str
    answer: str


class Task(Protocol):
    name: str

    def sample(self, rng: np.random.Generator) -> Example: ...
    def solve(self, prompt: str) -> str: ...
    def chain_of_thought(self, prompt: str) -> str: ...
    def check(self, pred: str, gold: str) -> bool: ...


def format_completion(thought: str, answer: str) -> str:
    """``<think>thought</think><answer>answer</answer>`` — the R1 template's completion (R1 Table 1)."""
    return f"<think>{thought}</think><answer>{answer}</answer>"


def reference_completion(task: Task, example: Example) -> str:
    """The task's reference reasoning trace and answer in the R1 format (cold-start SFT target)."""
    return format_completion(task.chain_of_thought(example.prompt), example.answer)


def check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def make_dataset(task: Task, n: int, rng, *, exclude_eval=True, unique=True) -> list[Example]:
    """``n`` examples drawn with ``rng``; by default without the held-out prompts and without repeats.

    Raises ValueError if the task cannot supply ``n`` distinct prompts in a reasonable number of draws.
    """
    rng = check_rng(rng)
    n = check_integer("n", n, low=0)
    banned = {e.prompt for e in eval_set(task)} if exclude_eval else set()
    out, seen = [], set()
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        ex = task.sample(rng)
        if ex.prompt in banned or (unique and ex.prompt in seen):
            continue
        seen.add(ex.prompt)
        out.append(ex)
    if len(out) < n:
        raise ValueError(f"n: {task!r} produced only {len(out)} distinct prompts outside the held-out set")
    return out


def eval_seed(task: Task) -> int:
    """The held-out set's seed: :data:`EVAL_SEED` mixed with a CRC of the task's repr (its config)."""
    return EVAL_SEED ^ zlib.crc32(repr(task).encode())


def eval_set(task: Task, n: int = EVAL_SIZE) -> list[Example]:
    """The fixed held-out evaluation set of ``task`` (distinct prompts; the same on every call)."""
    rng = np.random.default_rng(eval_seed(task))
    out, seen = [], set()
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        ex = task.sample(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out
