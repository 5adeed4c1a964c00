"""The R1-Zero / R1 recipes (refimpl.recipes.r1): the base corpus's design, tiny end-to-end runs,
the result cache and the command line."""

import re

import numpy as np
import pytest

from refimpl.__main__ import RECIPES, main
from refimpl.recipes import _cache, r1
from refimpl.rl import format_reward
from refimpl.rl.rewards import extract_answer
from refimpl.tasks import Example, make_dataset, reference_completion
from refimpl.tree import tree_flatten

TINY = dict(base_steps=4, num_generations=2, prompts_per_step=2, max_completion_length=8, eval_n=4, eval_every=1,
            mask_truncated_completions=False, entropy_coef=0.01)


def test_noisy_corpus_has_the_designed_mixture():
    rng = np.random.default_rng(0)
    exs = make_dataset(r1.TASK, 600, rng)
    careful = [r1.noisy_completion(e, rng, p_carry=1.0, p_broken_format=0.0) for e in exs]
    assert careful == [reference_completion(r1.TASK, e) for e in exs]
    careless = [r1.noisy_completion(e, rng, p_carry=0.0, p_broken_format=0.0) for e in exs]
    for e, c in zip(exs, careless, strict=True):
        has_carry = re.search(r"\d\+\d\+1=", reference_completion(r1.TASK, e)) is not None
        assert (extract_answer(c) == e.answer) != has_carry          # a dropped carry always gives a wrong answer
    mixed = [r1.noisy_completion(e, rng) for e in exs]
    broken = 1 - format_reward(mixed).mean()
    assert 0.2 < broken < 0.4                                           # p_broken_format = 0.3
    ok = [extract_answer(c) == e.answer for e, c in zip(exs, mixed, strict=True)]
    assert 0.3 < np.mean(ok) < 0.7
    assert r1.careless_thought("47+85=", rng, p_carry=1.0) == ("7+5=12,4+8+1=13", "132")
    assert r1.careless_thought("47+85=", rng, p_carry=0.0) == ("7+5=12,4+8=12", "122")
    assert r1.noisy_completion(Example("5+5=", "10"), np.random.default_rng(1)).count("10") >= 1


def _same_tree(a, b):
    return all(np.array_equal(x, y) for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0], strict=True))


def test_r1_zero_tiny_run_and_cache_round_trip(tmp_path):
    a = r1.r1_zero_run(steps=2, progress=False, cache_dir=tmp_path, **TINY)
    assert not a["cached"] and len(a["history"]) == 2 and [e["step"] for e in a["evals"]] == [0, 1, 2]
    assert a["grpo_config"].num_generations == 2 and a["eval_before"] == a["base"]["eval"]
    for key in ("config", "base_params", "params", "eval_after", "samples_before", "samples_after", "seconds"):
        assert key in a
    assert len(a["samples_after"]) == 4 and not _same_tree(a["params"], a["base_params"])
    b = r1.r1_zero_run(steps=2, progress=False, cache_dir=tmp_path, **TINY)
    assert b["cached"] and b["base"]["cached"]
    assert _same_tree(a["params"], b["params"]) and _same_tree(a["base_params"], b["base_params"])
    assert a["history"] == b["history"] and a["evals"] == b["evals"] and a["eval_after"] == b["eval_after"]
    c = r1.r1_zero_run(steps=2, progress=False, cache_dir=tmp_path, **{**TINY, "lr": 1e-3})
    assert not c["cached"] and c["base"]["cached"]                      # new GRPO settings, same base


def test_r1_tiny_run_has_three_stages_and_caches(tmp_path):
    kw = dict(TINY, cold_start_examples=8, cold_start_steps=2, rs_prompts=2, rs_generations=2, rs_sft_steps=2)
    a = r1.r1_run(steps=1, progress=False, cache_dir=tmp_path, **kw)
    assert set(a["stages"]) == {"cold_start", "rl", "rejection_sft"}
    assert a["stages"]["cold_start"]["n_examples"] == 8 and a["stages"]["rejection_sft"]["n_sampled"] == 4
    assert a["eval_after"] == a["stages"]["rejection_sft"]["eval"]
    b = r1.r1_run(steps=1, progress=False, cache_dir=tmp_path, **kw)
    assert b["cached"] and _same_tree(a["params"], b["params"])
    assert _same_tree(a["stage_params"]["rl"], b["stage_params"]["rl"])
    params, config = r1.r1_teacher(cache_dir=tmp_path, steps=1, **kw)
    assert _same_tree(params, a["params"]) and config == a["config"]
    assert r1.steps_to_accuracy(a, -1.0) == 0 and r1.steps_to_accuracy(a, 2.0) is None


def test_steps_to_accuracy_is_the_first_evaluation_at_target():
    res = {"evals": [{"step": 0, "accuracy": 0.4}, {"step": 5, "accuracy": 0.9}, {"step": 10, "accuracy": 0.8},
                     {"step": 15, "accuracy": 0.95}]}
    assert [r1.steps_to_accuracy(res, t) for t in (0.4, 0.5, 0.9, 0.92, 0.95, 0.96)] == [0, 5, 5, 15, 15, None]


def test_cache_key_depends_on_arguments_and_sources(monkeypatch):
    k = r1._key("x", {"a": 1})
    assert k == r1._key("x", {"a": 1}) and k != r1._key("x", {"a": 2})
    monkeypatch.setattr(_cache, "source_hash", lambda sources: "edited")
    assert r1._key("x", {"a": 1}) != k


def test_cache_source_hash_follows_the_files(tmp_path):
    h = _cache.source_hash(r1.SOURCES)
    assert h == _cache.source_hash(r1.SOURCES) and h != _cache.source_hash(r1.SOURCES[:-1])
    with pytest.raises(ValueError, match="sources"):
        _cache.source_hash(["no_such_module.py"])


def test_cache_sources_include_the_kernels_own_imports():
    """A kernel module in SOURCES runs the kernel modules it imports: they must be hashed too, or an
    edit to one of them (say the vectorised exp) would leave stale results in the cache."""
    import ast
    from pathlib import Path
    root = Path(_cache.__file__).resolve().parents[1]
    listed = [s for s in r1.SOURCES if s.startswith("kernels/")]
    assert listed
    for entry in listed:
        tree = ast.parse((root / entry).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    assert f"kernels/{name}.py" in r1.SOURCES, (entry, name)


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError):
        r1.r1_zero_run(steps=1, progress=False, bogus=3)


def test_cli_registers_both_recipes(capsys):
    assert RECIPES["r1-zero"] == ("refimpl.recipes.r1", "r1_zero_run")
    assert RECIPES["r1"] == ("refimpl.recipes.r1", "r1_run")
    assert main(["r1", "--list-options"]) == 0
    assert "cold_start" in capsys.readouterr().out
    assert main(["r1-zero", "--list-options"]) == 0
    assert "steps" in capsys.readouterr().out
