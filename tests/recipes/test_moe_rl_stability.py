"""The moe-rl-stability recipe on a tiny budget: shapes of its record, on-policy invariants, the CLI."""

import numpy as np
import pytest

from refimpl.__main__ import RECIPES
from refimpl.recipes.moe_rl_stability import engine_weights, moe_rl_stability_run

TINY = dict(base_steps=4, n_updates=2, prompts_per_step=2, eval_n=4, max_completion_length=8, stress_steps=1,
            stress_num_iterations=(2,), progress=False, mask_truncated_completions=False)


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
    for p in ("bf16", "fp8"):
        mm = res["mismatch"][p]
        assert 0 <= mm["drift"] <= 1 and mm["tokens"] > 0
        # tokens the trainer routes like the engine score the same with or without Keep Routing
        assert mm["abs_log_ratio"]["own"]["unchanged"] == pytest.approx(mm["abs_log_ratio"]["kept"]["unchanged"],
                                                                        rel=1e-4)  # float32, other summation order
    assert res["sweep"][1]["grpo"]["eval_before"] == res["sweep"][2]["v32"]["eval_before"]


def test_cli_registers_the_recipe():
    assert RECIPES["moe-rl-stability"] == ("refimpl.recipes.moe_rl_stability", "moe_rl_stability_run")


def test_engine_weights_round_to_the_named_precision(rng):
    params = {"a": rng.standard_normal((4, 5)).astype(np.float32), "ids": np.arange(3)}
    bf = engine_weights(params, "bf16")
    assert np.array_equal(bf["ids"], params["ids"])
    assert np.all(bf["a"].view(np.uint32) & 0xFFFF == 0)                  # 16 low bits cleared
    f8 = engine_weights(params, "fp8")
    s = np.abs(params["a"]).max() / 448.0
    assert np.allclose(f8["a"], params["a"], rtol=2.0**-4, atol=s * 2.0**-9)
    assert len(np.unique(f8["a"] / s)) <= 256
