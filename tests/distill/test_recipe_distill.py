"""The distillation chapter's recipe at a toy budget, with a random tiny teacher (no training of one)."""

import numpy as np
import pytest

from refimpl.accounting import parameter_counts
from refimpl.distill import pipelines
from refimpl.model import init_params
from refimpl.recipes import _cache, r1
from refimpl.recipes import distill as recipe
from refimpl.tasks import AdditionTask
from refimpl.tree import tree_flatten

from .test_pipelines import teacher_config


@pytest.fixture
def random_teacher(monkeypatch):
    tc = teacher_config()
    tp = init_params(tc, np.random.default_rng(0), np.float32)
    monkeypatch.setattr(recipe, "load_teacher", lambda cache_dir: (tp, tc, AdditionTask(1, 2)))
    # an untrained teacher is always wrong: keep its generations so that the pipeline has data
    monkeypatch.setattr(recipe, "teacher_generations",
                        lambda *a, **k: pipelines.teacher_generations(*a, **{**k, "reject": False}))
    return tc


def test_distill_run_matches_student_compute_and_is_deterministic(random_teacher):
    kw = dict(budget=0.02, base_steps=2, progress=False, eval_n=4, max_new_tokens=8,
              student=dict(hidden_size=8, intermediate_size=16),
              grpo_overrides=dict(prompts_per_step=2, num_generations=2))
    a, b = recipe.distill_run(**kw), recipe.distill_run(**kw)
    assert set(a["accuracy"]) == {"teacher", "base", "distilled", "distilled_gkd", "rl"}
    assert a["student_config"].vocab_size == random_teacher.vocab_size and a["grpo_config"].prompts_per_step == 2
    c = a["compute"]
    # GRPO ran until its student FLOPs reached the distillation arm's, and not a step longer
    assert c["rl_flops"] >= c["distill_flops"] > 0 and c["rl_steps"] == len(a["histories"]["rl"]) >= 1
    last = a["histories"]["rl"][-1]
    n_len, rows = last["completion_length"], 2 * 2
    one_step = recipe._flops(a["student_config"], rows * (7 + n_len), rows * last["generation_rounds"] * n_len)
    assert c["rl_flops"] - one_step < c["distill_flops"]
    assert a["accuracy"] == b["accuracy"] and a["compute"] == b["compute"]
    for name in ("distilled", "rl"):
        assert all(np.array_equal(x, y) for x, y in zip(tree_flatten(a["params"][name])[0],
                                                        tree_flatten(b["params"][name])[0], strict=True))
    with pytest.raises(ValueError, match="budget"):
        recipe.distill_run(budget=0, progress=False)


def test_student_base_is_cached_by_its_arguments(tmp_path):
    """A second call loads the stored result (same parameters and history); other arguments miss the cache."""
    cfg = recipe.dense_student_config(hidden_size=8, intermediate_size=16)
    kw = dict(n_corpus=20, batch_size=4, cache_dir=tmp_path, progress=False)
    first, again = recipe.student_base(cfg, 2, **kw), recipe.student_base(cfg, 2, **kw)
    assert not first["cached"] and again["cached"]
    assert again["history"] == first["history"]
    assert all(np.array_equal(x, y) for x, y in zip(tree_flatten(first["params"])[0],
                                                    tree_flatten(again["params"])[0], strict=True))
    assert not recipe.student_base(cfg, 3, **kw)["cached"]
    assert len(list(tmp_path.iterdir())) == 2
    assert "recipes/distill.py" in recipe.STUDENT_SOURCES          # student_base's own code is in the key
    with pytest.raises(ValueError, match="sources"):
        _cache.source_hash(["no_such_module.py"])


def test_parameter_counts_in_the_docstring():
    """The module docstring's sizes: dense student ~57k parameters, R1 teacher ~106k (~65k active)."""
    student, teacher = parameter_counts(recipe.dense_student_config()), parameter_counts(r1.r1_model_config())
    assert round(student["total"], -3) == 57_000 and student["active"] == student["total"] - student[
        "components"]["embedding"]["total"]                                  # dense: all but the embedding lookup
    assert round(teacher["total"], -3) == 106_000 and round(teacher["active"], -3) == 65_000
