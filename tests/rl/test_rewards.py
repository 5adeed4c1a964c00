"""Rule-based rewards: accuracy, format, tag count, DAPO overlong shaping, language consistency, sums."""

import numpy as np
import pytest

from refimpl.rl import (
    accuracy_reward,
    combine_rewards,
    extract_answer,
    format_reward,
    group_advantages,
    language_consistency_reward,
    overlong_penalty,
    tag_count_reward,
)
from refimpl.tasks import AdditionTask

GOOD = "<think>7+5=12,4+8+1=13</think><answer>132</answer>"


@pytest.mark.parametrize(("text", "expect"), [
    (GOOD, 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>a</think> <answer>b</answer>", 0.0),             # nothing between the blocks
    ("<think>a</think><answer>b</answer>x", 0.0),             # trailing text
    ("<think>a</think><answer>b</answer>\nmore", 0.0),        # open-r1's MULTILINE '$' would accept this
    ("x<think>a</think><answer>b</answer>", 0.0),
    ("<think>a<think>b</think><answer>c</answer>", 0.0),      # nested tag
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),
    ("<think>a</think>", 0.0),
    ("132", 0.0),
])
def test_format_reward(text, expect):
    assert format_reward([text])[0] == expect


def test_format_reward_with_open_r1_newlines():
    nl = "<think>\nreason\n</think>\n<answer>\n42\n</answer>"
    assert format_reward([nl], newlines=True)[0] == 1.0
    assert format_reward([nl])[0] == 0.0
    assert format_reward([GOOD], newlines=True)[0] == 0.0


def test_extract_and_accuracy():
    assert extract_answer(GOOD) == "132"
    assert extract_answer("<answer> 1 </answer> then <answer>2</answer>") == "2"
    assert extract_answer("no tags") is None
    comps = [GOOD, "<think>x</think><answer>131</answer>", "132", "<answer>0132</answer>"]
    np.testing.assert_array_equal(accuracy_reward(comps, ["132"] * 4), [1.0, 0.0, 0.0, 0.0])
    task = AdditionTask()
    np.testing.assert_array_equal(accuracy_reward(comps, ["132"] * 4, check=task.check), [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(accuracy_reward(comps[:2], ["132"] * 2, incorrect=-1.0), [1.0, -1.0])


def test_tag_count_reward():
    np.testing.assert_array_equal(tag_count_reward([GOOD, "<think>a</think>", "<think><think>", ""]),
                                  [1.0, 0.5, 0.0, 0.0])


def test_overlong_penalty_matches_dapo_eq13():
    L, C = 20480, 4096
    lengths = np.array([0, L - C, L - C + 1, L - C + 2048, L, L + 1])
    np.testing.assert_allclose(overlong_penalty(lengths, max_completion_len=L, soft_punish_cache=C),
                               [0.0, 0.0, -1 / C, -0.5, -1.0, -1.0])
    np.testing.assert_array_equal(overlong_penalty(np.array([3, 4, 5]), max_completion_len=4, soft_punish_cache=0),
                                  [0.0, 0.0, -1.0])


def test_language_consistency():
    allowed = "0123456789+=,"
    comps = ["<think>1+2=3</think><answer>3</answer>", "<think>1+2=3 drei</think>", "<answer>3</answer>",
             "<think> </think>"]
    np.testing.assert_allclose(language_consistency_reward(comps, alphabet=allowed), [1.0, 5 / 9, 0.0, 0.0])
    np.testing.assert_allclose(language_consistency_reward(comps, alphabet=allowed, unit="word"),
                               [1.0, 0.5, 0.0, 0.0])


def test_combine_rewards_nan_semantics():
    r = np.array([[1.0, 0.5], [np.nan, 1.0], [np.nan, np.nan]])
    out = combine_rewards(r, [2.0, 1.0])
    np.testing.assert_array_equal(out[:2], [2.5, 1.0])
    assert np.isnan(out[2])
    adv, _ = group_advantages(out, 3, nan_policy="omit")
    assert adv[2] == 0.0 and adv[0] > 0 > adv[1]


@pytest.mark.parametrize(("fn", "args", "kwargs", "exc", "match"), [
    (accuracy_reward, ("abc", ["a"]), {}, TypeError, "completions"),
    (accuracy_reward, (["a", "b"], ["a"]), {}, ValueError, "answers"),
    (format_reward, ([1],), {}, TypeError, "completions"),
    (overlong_penalty, (np.array([1.0]),), dict(max_completion_len=4, soft_punish_cache=1), TypeError, "lengths"),
    (overlong_penalty, (np.array([1]),), dict(max_completion_len=4, soft_punish_cache=5), ValueError,
     "soft_punish_cache"),
    (language_consistency_reward, (["a"],), dict(alphabet="a", unit="token"), ValueError, "unit"),
    (language_consistency_reward, (["a"],), dict(alphabet=""), ValueError, "alphabet"),
    (combine_rewards, (np.ones((2, 2)),), dict(weights=[1.0]), ValueError, "weights"),
    (combine_rewards, (np.ones(2),), {}, ValueError, "rewards_per_func"),
])
def test_bad_input(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
