"""The moe-rl-stability recipe on a tiny budget: shapes of its record, on-policy invariants, the CLI."""

import numpy as np

from refimpl.__main__ import RECIPES
from refimpl.recipes.moe_rl_stability import moe_rl_stability_run

TINY = dict(base_steps=4, n_updates=2, prompts_per_step=2, eval_n=4, max_completion_length=8, stress_steps=1,
            stress_num_iterations=(2,), progress=False)


def test_tiny_run_records_drift_and_ratios_consistently(tmp_path):
    res = moe_rl_stability_run(steps=1, num_iterations=(1, 2), cache_dir=str(tmp_path), **TINY)
    mech = res["mechanism"]
    assert mech["updates"] == [0, 1, 2] and len(mech["drift"]) == 3 and mech["drift"][0] == 0.0
    # before any update, the recorded routes are the router's own: the two forwards agree exactly
    assert mech["abs_log_ratio"]["own"]["all"][0] == 0.0 == mech["abs_log_ratio"]["kept"]["all"][0]
    assert all(0 <= d <= 1 for d in mech["drift"])
    for mu in (1, 2):
        for name in ("grpo", "v32"):
            r = res["sweep"][mu][name]
            assert len(r["drift"]) == mu and len(r["reward"]) == 1
            assert r["drift"][0] == 0.0 and r["ratio_std"][0] == 0.0 and r["ratio_max"][0] == 1.0
            assert all(np.isfinite(v) for v in r["ratio_std"] + r["ratio_max"] + r["masked"])
    assert set(res["stress"]) == {2}
    assert res["sweep"][1]["grpo"]["eval_before"] == res["sweep"][2]["v32"]["eval_before"]


def test_cli_registers_the_recipe():
    assert RECIPES["moe-rl-stability"] == ("refimpl.recipes.moe_rl_stability", "moe_rl_stability_run")
