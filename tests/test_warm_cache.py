"""book/warm_cache.py: it finds the chapters' cached recipe calls with their exact arguments."""

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("warm_cache", ROOT / "book" / "warm_cache.py")
warm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(warm)


def test_finds_every_cached_call_of_the_chapters_with_its_arguments():
    calls = warm.book_calls()
    names = [name for _, name, _ in calls]
    assert len(names) == len(set(names)), "r1_zero_run is called by two chapters and must be listed once"
    for expected in ("r1_zero_run", "r1_run", "distill_run", "aha_run", "r1_stages_run", "cot_ablation_run",
                     "fp8_train_run", "dsa_pretrain_run"):
        assert expected in names
    stages = next(kw for _, name, kw in calls if name == "r1_stages_run")
    assert stages["seeds"] == 3 and stages["cache_dir"] == "_cache"
    for module, name, kwargs in calls:          # each call, as run_job makes it, binds to the real signature
        inspect.signature(getattr(importlib.import_module(module), name)).bind(**{**kwargs, "progress": False})


def test_chains_keep_shared_stages_in_one_job_in_order():
    calls = [("m", "distill_run", {}), ("m", "aha_run", {}), ("m", "r1_zero_run", {}), ("m", "r1_run", {"a": 1})]
    jobs = warm.jobs_of(calls, long_first=())
    assert [[c[1] for c in job] for job in jobs] == [["r1_zero_run", "r1_run", "distill_run"], ["aha_run"]]


def test_long_jobs_start_first_and_the_rest_keep_their_order():
    calls = [("m", "language_seeds_run", {}), ("m", "r1_zero_run", {}), ("m", "aha_run", {}),
             ("m", "moe_rl_stability_run", {}), ("m", "r1_stages_run", {}), ("m", "r1_run", {})]
    jobs = warm.jobs_of(calls, long_first=("r1_stages_run", "aha_run"))
    assert [[c[1] for c in job] for job in jobs] == [["r1_stages_run"], ["aha_run"], ["r1_zero_run", "r1_run"],
                                                     ["language_seeds_run"], ["moe_rl_stability_run"]]
    names = {c[1] for c in warm.book_calls()}
    assert set(warm.LONG_FIRST) <= names            # the names are the chapters' calls, not stale ones


@pytest.mark.parametrize("line", ["x = r1_run(3, cache_dir='_cache')", "x = r1_run(cache_dir=CACHE)"])
def test_rejects_calls_it_cannot_repeat_exactly(tmp_path, line):
    (tmp_path / "01_a.py").write_text(f"from refimpl.recipes.r1 import r1_run\n{line}\n")
    with pytest.raises(ValueError, match="01_a.py:2"):
        warm.book_calls(tmp_path)
