"""Reasoning, measured (issue 18): the "aha" miniature, the language reward and their detectors.

The chain-of-thought ablation is tested in test_cot.py.

Tiny budgets only: these check the returned keys, determinism for a seed, the corpora's design and
the detectors on handcrafted transcripts. The targets themselves are checked by running the CLI.
"""

import numpy as np
import pytest

from refimpl.__main__ import RECIPES
from refimpl.model.transformer import init_params
from refimpl.recipes import aha, language, r1
from refimpl.rl import GRPOConfig, format_reward, grpo_train, sft_train
from refimpl.rl.rewards import extract_answer
from refimpl.tasks import AdditionTask, Example, eval_set
from refimpl.tasks.reflection import (
    careless_answer,
    is_self_correction,
    parse_reflection,
    reflection_stats,
    reflective_completion,
)

SELF_CORRECTION = "<think>122. check 47+85: 7+5=12,4+8+1=13 so 132. wait, 132</think><answer>132</answer>"
UNFIXED = "<think>122. check 47+85: 7+5=12,4+8+1=13 so 132. ok</think><answer>122</answer>"
PASSED = "<think>132. check 47+85: 7+5=12,4+8+1=13 so 132. ok</think><answer>132</answer>"
PLAIN_WRONG = "<think>122</think><answer>122</answer>"


def test_parse_reflection_on_handcrafted_transcripts():
    r = parse_reflection(SELF_CORRECTION)
    assert r == ("122", True, "132", True, "132")
    assert parse_reflection(PLAIN_WRONG) == ("122", False, None, False, "122")
    assert parse_reflection("garbage") == (None, False, None, False, None)
    assert is_self_correction(SELF_CORRECTION, "132")
    assert not is_self_correction(UNFIXED, "132")               # the check disagreed, the answer was not fixed
    assert not is_self_correction(PASSED, "132")                # right from the start: nothing to correct
    assert not is_self_correction(SELF_CORRECTION, "122")       # "fixed" into a wrong answer
    assert is_self_correction(UNFIXED.replace("<answer>122", "<answer>132"), "132")  # fixed, no "wait" said
    assert not is_self_correction("<think>122</think><answer>132</answer>", "132")  # no check: not a correction
    with pytest.raises(TypeError, match="completion"):
        parse_reflection(None)


def test_reflection_stats_counts_each_behaviour():
    texts = [SELF_CORRECTION, UNFIXED, PASSED, PLAIN_WRONG]
    s = reflection_stats(texts, ["132"] * 4)
    assert s == {"reflection_rate": 0.75, "wait_rate": 0.25, "self_correction_rate": 0.25, "first_accuracy": 0.25,
                 "final_accuracy": 0.5, "failed_check_unfixed": 0.25}
    with pytest.raises(ValueError, match="answers"):
        reflection_stats(texts, ["132"])


def test_reflective_corpus_has_the_designed_mixture():
    rng = np.random.default_rng(0)
    assert careless_answer(47, 85, rng, p_carry=1.0) == "132"
    assert careless_answer(47, 85, rng, p_carry=0.0) == "122"
    assert careless_answer(999, 1, rng, p_carry=1.0) == "1000"
    exs = eval_set(AdditionTask(2, 3), 256)
    docs = [reflective_completion(e, rng, p_check=0.1, p_carry=0.35) for e in exs]
    assert format_reward(docs).all()
    stats = reflection_stats(docs, [e.answer for e in exs])
    assert 0.04 < stats["reflection_rate"] < 0.18                    # rare: p_check = 0.1
    assert 0.3 < stats["first_accuracy"] < 0.7                        # careless errors are common
    assert stats["failed_check_unfixed"] == 0                         # a failed check is always fixed
    for d, e in zip(docs, exs, strict=True):
        r = parse_reflection(d)
        assert r.final == (e.answer if r.checked else r.first)
        assert r.waited == (r.checked and r.first != e.answer)
    checked = [reflective_completion(Example("47+85=", "132"), rng, p_check=1.0, p_carry=0.0)]
    assert checked == [SELF_CORRECTION]
    assert len(aha.aha_corpus(20, 0)) == 20 and aha.aha_corpus(20, 0) == aha.aha_corpus(20, 0)
    assert aha.column_drill(Example("47+85=", "132")) == "sum 47+85: 7+5=12,4+8+1=13 so 132."
    drills = np.mean([d.startswith("sum ") for d in aha.aha_corpus(400, 0, p_drill=0.5)])
    assert 0.4 < drills < 0.6 and not any(d.startswith("sum ") for d in aha.aha_corpus(100, 0))


def test_aha_tiny_run_keys_and_determinism(tmp_path):
    kw = dict(steps=2, base_steps=3, n_corpus=30, eval_every=1, eval_n=3, max_completion_length=12,
              num_generations=2, prompts_per_step=2, progress=False)
    a = aha.aha_run(**kw, cache_dir=tmp_path)
    for when in ("before", "after"):
        for k in ("reflection_rate", "self_correction_rate", "accuracy", "mean_length"):
            assert isinstance(a[f"{k}_{when}"], float)
    assert [c["step"] for c in a["curve"]] == [0, 1, 2] and len(a["history"]) == 2
    assert set(a["sampled_after"]) >= {"reflection_rate", "self_correction_rate", "accuracy", "mean_length"}
    b = aha.aha_run(**kw)
    assert not a["cached"] and not b["cached"]
    assert a["curve"] == b["curve"] and a["history"] == b["history"] and a["samples_after"] == b["samples_after"]
    assert aha.aha_run(**kw, cache_dir=tmp_path)["cached"]


def test_cli_names():
    assert RECIPES["cot-ablation"] == ("refimpl.recipes.cot", "cot_ablation_run")
    assert RECIPES["aha"] == ("refimpl.recipes.aha", "aha_run")


MIXED = "<think>7+5=12,e+i+b=bd</think><answer>132</answer>"
PURE = "<think>7+5=12,4+8+1=13</think><answer>132</answer>"


def test_language_corpus_and_consistency_on_handcrafted_transcripts():
    assert language.to_letters("4+8+1=13") == "e+i+b=bd"
    c = language.consistency([MIXED, PURE, "<answer>132</answer>"])
    assert c["consistent"] == pytest.approx(1 / 3)
    assert c["share"] == pytest.approx((10 / 15 + 1 + 0) / 3)        # letters e, i, b, b, d off-script; no <think>: 0
    rng = np.random.default_rng(0)
    exs = eval_set(language.TASK, 200)
    always = [language.mixed_completion(e, rng, p_switch=1.0, p_carry=1.0) for e in exs]
    never = [language.mixed_completion(e, rng, p_switch=0.0, p_carry=1.0) for e in exs]
    assert language.consistency(never)["consistent"] == 1.0 and language.consistency(always)["consistent"] == 0.0
    for a, n in zip(always, never, strict=True):                       # the switch changes the script, not the sums
        assert a.split(",", 1)[0] == n.split(",", 1)[0] and language.to_letters(n) == language.to_letters(a)
        assert extract_answer(a) == extract_answer(n)
    mixed = language.consistency([language.mixed_completion(e, rng) for e in exs])["consistent"]
    assert 0.15 < mixed < 0.45                                         # p_switch = 0.6 per boundary


def test_language_weight_adds_the_consistency_reward():
    with pytest.raises(ValueError, match="language_weight"):
        GRPOConfig(language_weight=-1.0)
    with pytest.raises(ValueError, match="language_alphabet"):
        GRPOConfig(language_alphabet="")
    config = r1.r1_model_config()
    params = init_params(config, np.random.default_rng(0), np.float32)
    params = sft_train(params, config, language.language_corpus(40, 0), steps=3, progress=False)["params"]
    gc = GRPOConfig(steps=1, num_generations=2, prompts_per_step=2, max_completion_length=12, eval_n=2,
                    mask_truncated_completions=False)
    plain = grpo_train(params, config, language.TASK, gc, progress=False, eval_every=0)["history"][0]
    lc = grpo_train(params, config, language.TASK, gc.replace(language_weight=2.0), progress=False,
                    eval_every=0)["history"][0]
    assert plain["sample"] == lc["sample"]                             # same samples, only the reward differs
    assert lc["reward"] >= plain["reward"]


def test_language_tiny_run_keys_and_determinism():
    kw = dict(steps=1, base_steps=2, n_corpus=20, eval_n=2, max_completion_length=10, num_generations=2,
              prompts_per_step=2, progress=False)
    a, b = language.language_run(**kw), language.language_run(**kw)
    for k in ("consistency_before", "consistency_zero", "consistency_lc", "accuracy_before", "accuracy_zero",
              "accuracy_lc", "accuracy_cost"):
        assert isinstance(a[k], float) and a[k] == b[k]
    assert a["zero"] == b["zero"] and a["lc"] == b["lc"] and set(a["base"]) >= {"greedy", "sampled"}
