"""The chain-of-thought ablation (issue 18): data, positions, a tiny run's keys, determinism, seeds, errors.

Tiny budgets only; the targets (thinking first wins by >= 20 points, the gap grows with length)
are checked by running ``python -m refimpl cot-ablation``.
"""

import math

import numpy as np
import pytest

from refimpl.__main__ import RECIPES
from refimpl.recipes import cot
from refimpl.rl import format_reward
from refimpl.tasks import TOKENIZER, AdditionTask, eval_set, format_completion

TINY = dict(steps=3, direct_steps=2, n_train=40, train_max_digits=3, eval_digits=(2, 6), eval_n=2, batch_size=4,
            progress=False)


def test_cot_data_share_prompts_and_leave_out_held_out_sets():
    direct, think = cot.cot_data(200, 0, 3, (2, 4), 16)
    assert [p for p, _ in direct] == [p for p, _ in think] and len(direct) == 200
    banned = {e.prompt for d in (2, 4) for e in eval_set(AdditionTask(d, d), 16)}
    assert not banned & {p for p, _ in direct}
    assert all(c == cot.direct_completion(AdditionTask().solve(p)) for p, c in direct)
    assert all(c.startswith("<think>") for _, c in think)
    assert format_reward([c for _, c in think]).all()
    lengths = [tuple(len(x) for x in p[:-1].split("+")) for p, _ in direct]
    assert all(a == b for a, b in lengths) and {a for a, _ in lengths} == {1, 2, 3}   # equal lengths, 1..3
    mixed, _ = cot.cot_data(200, 0, 3, (2, 4), 16, equal_lengths=False)
    lengths = {tuple(len(x) for x in p[:-1].split("+")) for p, _ in mixed}
    assert {(1, 3), (3, 1), (2, 2)} <= lengths and max(map(max, lengths)) == 3 and len(set(mixed)) == 200


def test_longest_rows_fit_the_positions_and_the_generation_budget():
    task, config = AdditionTask(), cot.cot_model_config()
    for d in range(1, cot.MAX_DIGITS + 1):
        prompt = f"{'9' * d}+{'9' * d}="                             # a carry in every column: the longest trace
        completion = TOKENIZER.encode(format_completion(task.chain_of_thought(prompt), task.solve(prompt)),
                                      add_eos=True)
        assert len(completion) <= cot.max_completion_tokens(d)
        assert len(TOKENIZER.encode(prompt, add_bos=True)) + cot.max_completion_tokens(d) \
            <= config.max_position_embeddings


def test_summarise_means_over_all_seen_and_beyond_lengths():
    rows = [{"digits": 2, "with_cot": 1.0, "without_cot": 0.5, "gap": 0.5, "beyond_training": False},
            {"digits": 3, "with_cot": 0.5, "without_cot": 0.0, "gap": 0.5, "beyond_training": False},
            {"digits": 5, "with_cot": 0.25, "without_cot": 0.25, "gap": 0.0, "beyond_training": True}]
    s = cot.summarise(rows)
    assert s["accuracy_with_cot"] == pytest.approx(1.75 / 3) and s["gap"] == pytest.approx(1 / 3)
    assert s["accuracy_with_cot_seen"] == 0.75 and s["accuracy_without_cot_seen"] == 0.25 and s["gap_seen"] == 0.5
    assert s["accuracy_with_cot_beyond"] == 0.25 and s["gap_beyond"] == 0.0
    assert math.isnan(cot.summarise(rows[:2])["accuracy_with_cot_beyond"])


def test_cot_ablation_tiny_run_keys_determinism_and_cache(tmp_path):
    assert RECIPES["cot-ablation"] == ("refimpl.recipes.cot", "cot_ablation_run")
    a = cot.cot_ablation_run(**TINY)
    for key in ("accuracy_with_cot", "accuracy_without_cot", "gap", "gap_se", "accuracy_with_cot_seen",
                "accuracy_without_cot_beyond", "per_length", "per_seed", "tokens", "history", "samples"):
        assert key in a
    assert len(a["history"]["think"]) == 3 and len(a["history"]["direct"]) == 2   # each model its own budget
    assert a["tokens"]["think"] > a["tokens"]["direct"] > 0            # think rows are longer, at fewer steps here
    assert [r["digits"] for r in a["per_length"]] == [2, 6]
    assert [r["beyond_training"] for r in a["per_length"]] == [False, True]
    assert a["seeds"] == 1 and a["gap_se"] == 0.0 and a["gap"] == pytest.approx(a["accuracy_with_cot"]
                                                                              - a["accuracy_without_cot"])
    b = cot.cot_ablation_run(**TINY)
    assert a["history"] == b["history"] and a["per_length"] == b["per_length"] and a["samples"] == b["samples"]
    c = cot.cot_ablation_run(**TINY, cache_dir=tmp_path)
    d = cot.cot_ablation_run(**TINY, cache_dir=tmp_path)
    assert not c["cached"] and d["cached"] and c["history"] == d["history"] == a["history"]
    assert c["per_length"] == d["per_length"] == a["per_length"]


def test_cot_ablation_seeds_are_means_with_standard_errors_over_cached_single_seeds(tmp_path):
    one = cot.cot_ablation_run(**TINY, seed=1, cache_dir=tmp_path)
    two = cot.cot_ablation_run(**TINY, seeds=2, cache_dir=tmp_path)      # seeds 0 and 1: seed 1 from the cache
    assert not two["cached"] and [s["seed"] for s in two["per_seed"]] == [0, 1]
    assert two["per_seed"][1]["per_length"] == one["per_seed"][0]["per_length"]
    assert two["per_seed"][1]["tokens"] == one["tokens"] != two["per_seed"][0]["tokens"]   # another seed, other rows
    for key in ("accuracy_with_cot", "gap", "accuracy_without_cot_seen"):
        values = [s[key] for s in two["per_seed"]]
        assert two[key] == pytest.approx(np.mean(values))
        assert two[f"{key}_se"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    for j, row in enumerate(two["per_length"]):
        assert row["with_cot"] == pytest.approx(np.mean([s["per_length"][j]["with_cot"] for s in two["per_seed"]]))
    assert cot.cot_ablation_run(**TINY, seeds=2, cache_dir=tmp_path)["cached"]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(eval_digits=(10,)), ValueError, "eval_digits"),
    (dict(eval_digits=()), ValueError, "eval_digits"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(direct_steps=1.5), TypeError, "direct_steps"),
    (dict(seeds=0), ValueError, "seeds"),
    (dict(train_max_digits=10), ValueError, "train_max_digits"),
    (dict(eval_n=0), ValueError, "eval_n"),
])
def test_cot_ablation_rejects_bad_arguments_before_training(kwargs, error, match):
    with pytest.raises(error, match=match):
        cot.cot_ablation_run(**{**TINY, **kwargs})
