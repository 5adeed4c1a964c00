"""Toy verifiable reasoning tasks and a character tokenizer, sized for tiny policies on a CPU.

Each task generates (prompt, answer) pairs, writes a reference chain of thought, and checks
answers exactly (see :mod:`refimpl.tasks.base`). Prompts and completions stay within ~64
characters so a model with a few hundred thousand parameters can learn them in minutes.

>>> from refimpl.tasks import get_task, reference_completion, eval_set
>>> task = get_task("addition")
>>> reference_completion(task, eval_set(task)[0])  # doctest: +SKIP
'<think>...</think><answer>...</answer>'
"""

from .arithmetic import AdditionTask
from .base import (
    EVAL_SEED,
    EVAL_SIZE,
    Example,
    Task,
    eval_seed,
    eval_set,
    format_completion,
    make_dataset,
    reference_completion,
)
from .mixed import MixedArithmeticTask
from .sorting import SortingTask
from .tokenizer import TOKENIZER, CharTokenizer, pad_sequences

TASKS = {"addition": AdditionTask(), "sorting": SortingTask(), "mixed-arithmetic": MixedArithmeticTask()}


def get_task(name: str):
    """The default-configured task called ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"name: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


__all__ = [
    "AdditionTask", "SortingTask", "MixedArithmeticTask", "Example", "Task", "TASKS", "get_task", "eval_set",
    "eval_seed", "make_dataset", "format_completion", "reference_completion", "EVAL_SEED", "EVAL_SIZE", "CharTokenizer",
    "TOKENIZER", "pad_sequences",
]
