"""Issue 15 item 9: rewards run on arbitrary model samples, so they must take linear time.

The lazy regexes they replaced (``<answer>(.*?)</answer>`` with findall, ``<think>(.*?)</think>``
with search) are kept here as the oracle of the semantics on short strings.
"""

import re

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl.rewards import accuracy_reward, extract_answer, format_reward, language_consistency_reward
from refimpl.tasks import AdditionTask

PIECES = st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "a", " ", "\n", "1", "<", ">", "/"])
TEXT = st.lists(PIECES, max_size=30).map("".join)


def _oracle_answer(text):
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return found[-1].strip() if found else None


def _oracle_think(text):
    m = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    return None if m is None else m.group(1)


@given(text=TEXT)
def test_same_answers_as_the_regex(text):
    assert extract_answer(text) == _oracle_answer(text)


@given(text=TEXT)
def test_same_think_block_as_the_regex(text):
    block = _oracle_think(text)
    chars = [] if block is None else [c for c in block if not c.isspace()]
    expected = float(np.mean([c in "a1" for c in chars])) if chars else 0.0
    assert language_consistency_reward([text], alphabet="a1")[0] == expected


def test_adversarial_samples_of_128kb():
    # quadratic before: ~22 s and ~17 s; the tests' fuzz harness would time out on that
    for tag in ("<answer>", "<think>", "</answer>", "<answer>1</answer>" * 2):
        text = tag * 16000
        assert accuracy_reward([text], ["1"])[0] in (0.0, 1.0)
        assert language_consistency_reward([text], alphabet="abc")[0] >= 0.0
        assert format_reward([text])[0] == 0.0


def test_addition_check_on_a_huge_number():
    task = AdditionTask()
    assert not task.check("9" * 5000, "12")      # int() refuses > 4300 digits: no ValueError
    assert task.check("0" * 5000 + "12", "12") and task.check(" 12 ", "12") and not task.check("1 2", "12")
