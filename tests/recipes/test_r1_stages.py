"""R1's four stages against R1-Zero (issue 18, item 3) and language consistency over seeds: tiny budgets only.

These check the corpus design, the readability measure on handcrafted transcripts, the returned
keys, the aggregation over seeds and determinism. The targets are checked by running the CLI.
"""

import numpy as np
import pytest

from refimpl.__main__ import RECIPES
from refimpl.recipes import language, r1_stages
from refimpl.recipes._cache import mean_se
from refimpl.rl import extract_answer, format_reward
from refimpl.tasks import eval_set

READABLE = "<think>7*6=42,4*6+4=28,3*6+2=20</think><answer>2082</answer>"
MIXED = "<think>7*6=42,e*g+e=ci,d*g+c=ca</think><answer>2082</answer>"
UNFORMATTED = "7*6=42,4*6+4=28,3*6+2=20 so 2082"


def test_readability_on_handcrafted_transcripts():
    r = r1_stages.readability([READABLE, MIXED, UNFORMATTED, "<think>7*6=42</think>2082"])
    assert r["readability"] == 0.25                        # only the first: formatted and all digits
    assert r["language_share"] == pytest.approx((1 + 14 / 24 + 0 + 1) / 4)   # 10 of 24 characters are letters


def test_corpus_mixes_careless_carries_scripts_and_formats():
    rng = np.random.default_rng(0)
    exs = eval_set(r1_stages.TASK, 256)
    clean = [r1_stages.stage_completion(e, rng, p_carry_add=1, p_carry_mul=1, p_switch=0, p_broken_format=0)
             for e in exs]
    assert all(extract_answer(c) == e.answer for c, e in zip(clean, exs, strict=True))
    assert r1_stages.readability(clean)["readability"] == 1.0
    careless = [r1_stages.stage_completion(e, rng, p_carry_add=0, p_carry_mul=0, p_switch=0, p_broken_format=0)
                for e in exs]
    wrong = [extract_answer(c) != e.answer for c, e in zip(careless, exs, strict=True)]
    assert 0.4 < np.mean(wrong) < 1.0                       # every carry dropped: wrong unless there is none
    noisy = [r1_stages.stage_completion(e, rng) for e in exs]
    assert 0.6 < format_reward(noisy).mean() < 0.8          # p_broken_format = 0.3
    assert 0.3 < r1_stages.readability(noisy)["readability"] < format_reward(noisy).mean() - 0.1   # some switch
    assert r1_stages.stages_corpus(20, 0) == r1_stages.stages_corpus(20, 0)


def test_mean_se():
    assert mean_se([0.5]) == (0.5, 0.0)
    m, se = mean_se([0.2, 0.4])
    assert m == pytest.approx(0.3) and se == pytest.approx(0.1)


TINY = dict(steps=2, steps_rl1=1, base_steps=3, n_corpus=30, eval_n=2, max_completion_length=12, num_generations=2,
            prompts_per_step=2, cold_start_examples=8, cold_start_steps=2, rs_prompts=2, rs_generations=2,
            rs_sft_steps=2, progress=False)


def test_r1_stages_tiny_run_keys_determinism_and_cache(tmp_path):
    a = r1_stages.r1_stages_run(seeds=2, **TINY, cache_dir=tmp_path)
    for c in r1_stages.CHECKPOINTS:
        for m in ("accuracy", "format", "readability"):
            assert 0.0 <= a[f"{m}_{c}"] <= 1.0 and a[f"{m}_{c}_se"] >= 0.0
    for k in ("gain_cold_start", "gain_rl1", "gain_rejection_sft", "gain_rl2", "r1_minus_zero"):
        assert isinstance(a[k], float) and isinstance(a[f"{k}_se"], float)
    assert len(a["per_seed"]) == 2 and not a["cached"]
    accs = [r["measures"]["rl2"]["accuracy"] for r in a["per_seed"]]
    assert a["accuracy_rl2"] == pytest.approx(np.mean(accs))
    b = r1_stages.r1_stages_run(seeds=2, **TINY)
    assert [r["measures"] for r in a["per_seed"]] == [r["measures"] for r in b["per_seed"]]
    assert r1_stages.r1_stages_run(seeds=2, **TINY, cache_dir=tmp_path)["cached"]
    with pytest.raises(ValueError, match="seeds"):
        r1_stages.r1_stages_run(seeds=0)
    with pytest.raises(ValueError, match="steps_rl1"):
        r1_stages.r1_stages_run(steps=2, steps_rl1=3)


def test_r1_stages_rl_lr_and_budget_record():
    frozen = r1_stages.r1_stages_seed(0, rl_lr=0.0, **TINY)             # R1's two RL stages cannot move
    m = frozen["measures"]
    assert m["rl1"] == m["cold_start"] and m["rl2"] == m["rejection_sft"]
    assert frozen["budget"]["rl_lr"] == 0.0 and frozen["budget"]["cold_start_examples"] == 8


def test_language_seeds_tiny_run(tmp_path):
    kw = dict(steps=1, base_steps=2, n_corpus=20, eval_n=2, max_completion_length=10, num_generations=2,
              prompts_per_step=2, progress=False)
    a = language.language_seeds_run(seeds=2, cache_dir=tmp_path, **kw)
    for k in ("consistency_lc", "accuracy_zero", "accuracy_lc", "accuracy_cost", "sampled_consistency_lc"):
        assert isinstance(a[k], float) and a[f"{k}_se"] >= 0.0
    costs = [r["accuracy_cost"] for r in a["per_seed"]]
    assert a["accuracy_cost"] == pytest.approx(np.mean(costs))
    assert language.language_seeds_run(seeds=2, cache_dir=tmp_path, **kw)["cached"]
    with pytest.raises(ValueError, match="seeds"):
        language.language_seeds_run(seeds=0)


def test_cli_names():
    assert RECIPES["r1-stages"] == ("refimpl.recipes.r1_stages", "r1_stages_run")
    assert RECIPES["language"] == ("refimpl.recipes.language", "language_seeds_run")
