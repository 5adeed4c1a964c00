"""The V3.2 options in the GRPO trainer: sampling record, Keep Routing through the model, FD of the objective."""

import numpy as np
import pytest

from refimpl.model import init_params, model_forward
from refimpl.rl.stable import routing_drift, sampling_record
from refimpl.rl.trainer import GRPOConfig, completion_logps, grpo_objective, grpo_train
from refimpl.testing import check_grad, tol

from .test_trainer import TASK, _leaves, _scale, random_batch, small_gc, text_rewards, tiny_config

V32 = dict(use_bias_correction_kl=True, off_policy_mask_threshold=0.02, keep_routing=True, keep_sampling_mask=True)


def test_keep_routing_with_unchanged_weights_reproduces_sampling_time_outputs_exactly():
    rng = np.random.default_rng(0)
    cfg = tiny_config()
    params = init_params(cfg, rng, np.float32)
    gc = small_gc(top_p=0.8, temperature=0.9, **V32)
    batch = random_batch(rng, gc)
    rec = sampling_record(params, cfg, batch, gc)
    logits, _, info = model_forward(batch.ids, params, cfg)
    kept, _, _ = model_forward(batch.ids, params, cfg, routes=rec.routes)
    np.testing.assert_array_equal(kept, logits)
    assert rec.routes[0] is None and np.array_equal(rec.routes[1], info["moe"][1]["idx"])
    # the recorded nucleus holds every sampled token, and pi_old is renormalised over it
    assert np.take_along_axis(rec.vocab_mask, batch.comp[..., None], -1).all()
    assert np.all(rec.logps[batch.mask] >= completion_logps(params, cfg, batch, gc.temperature)[batch.mask])
    _, _, info = grpo_objective(params, cfg, batch, rng.standard_normal(4), rec.logps, None, gc, rec)
    assert info["routing_drift"] == 0.0
    assert info["ratio_max"] == 1.0 and info["ratio_min"] == 1.0 and info["ratio_std"] == 0.0
    assert info["opsm_masked_fraction"] == 0.0


def test_keep_routing_holds_the_experts_when_the_router_moves():
    rng = np.random.default_rng(1)
    cfg = tiny_config()
    params = init_params(cfg, rng, np.float64)
    gc = small_gc(keep_routing=True)
    batch = random_batch(rng, gc)
    rec = sampling_record(params, cfg, batch, gc)
    moved = {**params, "model": {**params["model"], "layers": [dict(lp) for lp in params["model"]["layers"]]}}
    mlp = moved["model"]["layers"][1]["mlp"] = dict(moved["model"]["layers"][1]["mlp"])
    w = mlp["gate"]["weight"]
    mlp["gate"] = {**mlp["gate"], "weight": w + 2.0 * rng.standard_normal(w.shape)}
    _, _, own = model_forward(batch.ids, moved, cfg)
    _, _, kept = model_forward(batch.ids, moved, cfg, routes=rec.routes)
    np.testing.assert_array_equal(kept["moe"][1]["idx"], rec.routes[1])
    drift = routing_drift(kept["moe"], rec.routes, moved, cfg)
    changed = (np.sort(own["moe"][1]["idx"], -1) != np.sort(rec.routes[1], -1)).any(-1).mean()
    assert drift == pytest.approx(changed) and drift > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_v32_objective_gradient_matches_finite_differences(level):
    """d J / d params with all four V3.2 options, through the masked log-probs and the kept routes."""
    rng = np.random.default_rng(2)
    cfg = tiny_config()
    params = init_params(cfg, rng, np.float64)
    gc = small_gc(importance_sampling_level=level, beta=0.05, top_p=0.7, temperature=0.8, entropy_coef=0.01,
                  off_policy_mask_threshold=0.0, use_bias_correction_kl=True, keep_routing=True,
                  keep_sampling_mask=True)
    batch = random_batch(rng, gc)
    rec = sampling_record(params, cfg, batch, gc)
    old = rec.logps + rng.uniform(-0.05, 0.05, rec.logps.shape)        # ratios within [0.95, 1.05]
    rec = rec._replace(logps=old + rng.choice([-0.3, 0.3], size=(4, 1)))  # OPSM divergences far from 0
    ref = old + rng.uniform(-0.3, 0.3, old.shape)
    adv = np.array([1.0, -1.0, -0.5, 0.5])

    def f(p):
        loss, grads, info = grpo_objective(p, cfg, batch, adv, old, ref, gc, rec)
        return loss, lambda d: ({k: _scale(v, float(d)) for k, v in grads.items()},)
    assert 0 < grpo_objective(params, cfg, batch, adv, old, ref, gc, rec)[2]["opsm_masked_fraction"] < 1
    assert check_grad(f, [params], max_entries=3, seed=1) < tol("gradcheck")["rtol"]


def test_train_with_v32_options_reports_drift_and_spread(monkeypatch):
    text_rewards(monkeypatch)
    cfg = tiny_config()
    p0 = init_params(cfg, np.random.default_rng(4), np.float32)
    plain = grpo_train(p0, cfg, TASK, small_gc(steps=1, num_iterations=3, lr=0.05), progress=False, eval_every=0)
    v32 = grpo_train(p0, cfg, TASK, small_gc(steps=1, num_iterations=3, lr=0.05, top_p=0.9, beta=0.01, **V32),
                     progress=False, eval_every=0)
    for res in (plain, v32):
        its = res["history"][0]["iterations"]
        assert its[0]["routing_drift"] == 0.0 and its[0]["ratio_std"] == 0.0
        for it in its:
            assert all(np.isfinite(v) for v in it.values())
    assert any(it["routing_drift"] > 0 for it in plain["history"][0]["iterations"][1:])
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(plain["params"]), _leaves(v32["params"]),
                                                        strict=True))


@pytest.mark.parametrize("changes,name", [(dict(keep_routing=1), "keep_routing"),
                                          (dict(use_bias_correction_kl="yes"), "use_bias_correction_kl"),
                                          (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold"),
                                          (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold"),
                                          (dict(keep_sampling_mask=None), "keep_sampling_mask")])
def test_bad_v32_options(changes, name):
    with pytest.raises(ValueError, match=name):
        GRPOConfig(**changes)
