"""Toy reasoning tasks: generators, reference chains of thought, checkers, held-out sets."""

import numpy as np
import pytest
from hypothesis import given

from refimpl.rl import accuracy_reward, format_reward
from refimpl.tasks import (
    TASKS,
    TOKENIZER,
    AdditionTask,
    SortingTask,
    eval_set,
    get_task,
    make_dataset,
    reference_completion,
)
from refimpl.testing import strategies as rst

ALL = [AdditionTask(), AdditionTask(2, 4), SortingTask(), SortingTask(1, 8)]


@pytest.mark.parametrize("task", ALL, ids=repr)
@given(rng=rst.seeds())
def test_samples_are_solved_and_checked(task, rng):
    ex = task.sample(rng)
    assert task.solve(ex.prompt) == ex.answer
    assert task.check(ex.answer, ex.answer)
    assert not task.check(ex.answer + "1", ex.answer)
    assert not task.check("", ex.answer)
    comp = reference_completion(task, ex)
    assert format_reward([comp])[0] == 1.0
    assert accuracy_reward([comp], [ex.answer], check=task.check)[0] == 1.0
    TOKENIZER.encode(ex.prompt + comp)           # every character is in the tokenizer's alphabet


@given(rng=rst.seeds())
def test_addition_trace_is_a_correct_column_sum(rng):
    task = AdditionTask(1, 4)
    ex = task.sample(rng)
    a, b = (int(x) for x in ex.prompt[:-1].split("+"))
    carry, digits = 0, []
    for i, step in enumerate(task.chain_of_thought(ex.prompt).split(",")):
        lhs, s = step.split("=")
        terms = [int(t) for t in lhs.split("+")]
        assert terms[:2] == [a // 10**i % 10, b // 10**i % 10] and sum(terms) - sum(terms[:2]) == carry
        assert int(s) == sum(terms)
        carry, digits = int(s) // 10, digits + [int(s) % 10]
    assert int("".join(map(str, ([carry] if carry else []) + digits[::-1]))) == a + b


@given(rng=rst.seeds())
def test_sorting_trace_is_selection_sort(rng):
    task = SortingTask(1, 8)
    ex = task.sample(rng)
    rest = ex.prompt[5:-1]
    for step in task.chain_of_thought(ex.prompt).split(","):
        low, left = step.split("|")
        assert low == min(rest) and sorted(left + low) == sorted(rest)
        rest = left
    assert rest == ""


def test_checkers_are_exact():
    add = AdditionTask()
    assert add.check(" 132 ", "132") and add.check("0132", "132")
    assert not add.check("13 2", "132") and not add.check("+132", "132") and not add.check("132.0", "132")
    srt = SortingTask()
    assert srt.check("135", "135") and not srt.check("1 3 5", "135") and not srt.check("531", "135")


@pytest.mark.parametrize("task", ALL, ids=repr)
def test_held_out_sets_are_fixed_distinct_and_short(task):
    ev = eval_set(task)
    assert ev == eval_set(task) and len(ev) == 256 and len({e.prompt for e in ev}) == 256
    if task in TASKS.values():      # the default configurations fit a 64-token context
        n_tok = max(len(TOKENIZER.encode(e.prompt + reference_completion(task, e), add_bos=True, add_eos=True))
                    for e in ev)
        assert n_tok <= 64


def test_held_out_sets_are_pinned():
    """The evaluation sets must never change silently: results across versions are compared on them."""
    assert [e.prompt for e in eval_set(get_task("addition"))[:3]] == ["42+67=", "145+328=", "97+8="]
    assert [e.prompt for e in eval_set(get_task("sorting"))[:3]] == ["sort 8244=", "sort 635=", "sort 298="]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_training_data_excludes_held_out_and_is_seeded(name):
    task = get_task(name)
    held = {e.prompt for e in eval_set(task)}
    a = make_dataset(task, 300, np.random.default_rng(5))
    assert a == make_dataset(task, 300, np.random.default_rng(5))
    assert a != make_dataset(task, 300, np.random.default_rng(6))
    assert len({e.prompt for e in a}) == 300 and not held & {e.prompt for e in a}


def test_errors():
    with pytest.raises(ValueError, match="name"):
        get_task("chess")
    with pytest.raises(TypeError, match="rng"):
        AdditionTask().sample(0)
    with pytest.raises(ValueError, match="min_digits"):
        AdditionTask(3, 2)
    with pytest.raises(ValueError, match="min_len"):
        SortingTask(0, 2)
    with pytest.raises(ValueError, match="prompt"):
        AdditionTask().solve("1+2")
    with pytest.raises(ValueError, match="prompt"):
        SortingTask().chain_of_thought("sort 12")
    with pytest.raises(ValueError, match="n:"):
        make_dataset(SortingTask(1, 1), 11, np.random.default_rng(0))   # only 10 distinct prompts exist
    with pytest.raises(ValueError, match="n:"):
        make_dataset(SortingTask(), -1, np.random.default_rng(0))
