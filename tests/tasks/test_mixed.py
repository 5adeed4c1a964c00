"""The mixed arithmetic task (longer additions and multiplication by one digit): generator, traces, verifier."""

import numpy as np
import pytest
from hypothesis import given

from refimpl.rl import accuracy_reward, format_reward
from refimpl.tasks import TOKENIZER, MixedArithmeticTask, eval_set, get_task, make_dataset, reference_completion
from refimpl.tasks.mixed import column_steps
from refimpl.testing import strategies as rst

TASK = MixedArithmeticTask()


def test_handcrafted_traces():
    assert TASK.chain_of_thought("347*6=") == "7*6=42,4*6+4=28,3*6+2=20"
    assert TASK.solve("347*6=") == "2082"
    assert TASK.chain_of_thought("4738+985=") == "8+5=13,3+8+1=12,7+9+1=17,4+0+1=5"
    assert TASK.solve("4738+985=") == "5723"
    # a dropped carry changes that column and, consistently, the answer read off the sums
    assert column_steps("347", "*", "6", keep_carry=lambda i: i != 1) == (["7*6=42", "4*6=24", "3*6+2=20"], "2042")
    assert column_steps("99", "+", "1", keep_carry=lambda i: False) == (["9+1=10", "9+0=9"], "90")


@given(rng=rst.seeds())
def test_samples_are_solved_checked_and_traced(rng):
    ex = TASK.sample(rng)
    a, op, b = TASK.parse(ex.prompt)
    assert ex.answer == str(int(a) + int(b) if op == "+" else int(a) * int(b))
    steps, answer = column_steps(a, op, b)
    assert answer == ex.answer and len(steps) == (len(a) if op == "*" else max(len(a), len(b)))
    assert TASK.check(ex.answer, ex.answer) and TASK.check(f" 0{ex.answer} ", ex.answer)
    assert not TASK.check(str(int(ex.answer) + 1), ex.answer) and not TASK.check("", ex.answer)
    comp = reference_completion(TASK, ex)
    assert format_reward([comp])[0] == 1.0
    assert accuracy_reward([comp], [ex.answer], check=TASK.check)[0] == 1.0
    assert len(TOKENIZER.encode(ex.prompt + comp, add_bos=True, add_eos=True)) <= 64


def test_mixture_and_held_out_set():
    exs = eval_set(TASK)
    share_mul = np.mean(["*" in e.prompt for e in exs])
    assert 0.4 < share_mul < 0.6
    assert all(len(TASK.parse(e.prompt)[2]) == 1 and 2 <= int(TASK.parse(e.prompt)[2]) for e in exs if "*" in e.prompt)
    assert get_task("mixed-arithmetic") == TASK
    train = make_dataset(TASK, 200, np.random.default_rng(0))
    assert not {e.prompt for e in exs} & {e.prompt for e in train}
    assert MixedArithmeticTask(p_mul=0.0).sample(np.random.default_rng(0)).prompt.count("+") == 1


@pytest.mark.parametrize("kw, match", [(dict(add_min=0), "add_min"), (dict(mul_max=7), "mul_min"),
                                       (dict(p_mul=1.5), "p_mul")])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        MixedArithmeticTask(**kw)


@pytest.mark.parametrize("prompt", ["12*34=", "12-3=", "12+3", None])
def test_bad_prompts(prompt):
    with pytest.raises(ValueError, match="prompt"):
        TASK.parse(prompt)
