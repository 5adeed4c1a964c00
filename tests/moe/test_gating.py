"""Routers: equivalence with the naive per-token router, the V2/V3 properties, gradients, bad input."""

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.moe import (
    gate_backward,
    gate_forward,
    mixtral_gate_backward,
    mixtral_gate_forward,
    select_experts,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst
from refimpl.testing.naive import naive_gate_matrix

from ._cases import moe_cases

GRAD = tol("gradcheck")["rtol"]
V3 = dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc",
          scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, hidden_size=8,
          moe_intermediate_size=4, n_shared_experts=1)
V2 = dict(V3, topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
          routed_scaling_factor=16.0, topk_group=2)


def _cfg(**kw):
    return ModelConfig.preset("tiny").replace(**kw)


def _gate(cfg, rng, bias=None, n=32):
    gate = {"weight": rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size))}
    if cfg.topk_method == "noaux_tc":
        gate["e_score_correction_bias"] = (np.zeros(cfg.n_routed_experts) if bias is None else bias)
    return gate, rng.standard_normal((n, cfg.hidden_size))


def _dense(routing, e):
    g = np.zeros((routing.idx.shape[0], e))
    np.put_along_axis(g, routing.idx, routing.weights, axis=1)
    return g


@given(moe_cases(), st.sampled_from(["numpy", "numba"]))
def test_gate_matches_naive_router(case, backend):
    cfg, params, x = case
    u = x.reshape(-1, x.shape[-1])
    routing, _ = gate_forward(u, params["gate"], cfg, backend=backend)
    np.testing.assert_allclose(_dense(routing, cfg.n_routed_experts), naive_gate_matrix(u, params["gate"], cfg),
                               **tol("equiv64"))
    assert routing.idx.dtype == np.int64 and routing.weights.dtype == x.dtype


@given(rst.seeds(), st.sampled_from([1, 2, 4]), st.integers(1, 4), st.sampled_from([None, "max", "top2_sum"]),
       st.sampled_from([-np.inf, 0.0]), st.sampled_from([np.float32, np.float64]), st.booleans())
def test_select_numba_matches_numpy_including_ties(rng, n_group, per, mode, mask, dtype, ties):
    per = max(per, 2)
    e = n_group * per
    sel = rng.standard_normal((7, e))
    if ties:                                   # few distinct values: ties everywhere, tie-break must agree
        sel = np.round(sel)
    sel = sel.astype(dtype)
    topk_group = int(rng.integers(1, n_group + 1))
    k = int(rng.integers(1, topk_group * per + 1))
    kw = dict(n_group=n_group, topk_group=topk_group, group_score=mode, mask_value=mask)
    a = select_experts(sel, k, backend="numpy", **kw)
    b = select_experts(sel, k, backend="numba", **kw)
    np.testing.assert_array_equal(a, b)
    assert all(len(set(r)) == k for r in a.tolist())


def test_v3_weights_sum_to_scale_and_lie_in_topk_groups(rng):
    cfg = _cfg(**V3)
    gate, x = _gate(cfg, rng, bias=rng.standard_normal(16))
    r, _ = gate_forward(x, gate, cfg)
    np.testing.assert_allclose(r.weights.sum(1), 2.5, rtol=1e-14)
    groups = r.idx // (cfg.n_routed_experts // cfg.n_group)
    assert max(len(set(g)) for g in groups.tolist()) <= cfg.topk_group
    # weights are the *unbiased* selected scores, renormalised
    sel = np.take_along_axis(r.scores, r.idx, 1)
    np.testing.assert_allclose(r.weights, 2.5 * sel / sel.sum(1, keepdims=True), rtol=1e-14)


def test_v2_weights_are_scaled_softmax_without_renormalisation(rng):
    cfg = _cfg(**V2)
    gate, x = _gate(cfg, rng)
    r, _ = gate_forward(x, gate, cfg)
    np.testing.assert_allclose(r.weights, 16.0 * np.take_along_axis(r.scores, r.idx, 1), rtol=1e-14)
    assert np.all(r.weights.sum(1) < 16.0)
    groups = r.idx // 4
    assert max(len(set(g)) for g in groups.tolist()) <= 2
    # V2-Lite: greedy over all experts, scale 1
    lite = _cfg(**dict(V2, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0))
    r, _ = gate_forward(x, gate, lite)
    np.testing.assert_array_equal(r.idx, np.argsort(-r.scores, 1, kind="stable")[:, :4])
    np.testing.assert_allclose(r.weights, np.sort(r.scores, 1)[:, ::-1][:, :4], rtol=1e-14)


def test_v3_group_score_is_top2_sum_not_max():
    """Group 0 has the single best expert but group 1 the best pair: top-2 sum keeps group 1."""
    sel = np.array([[0.95, 0.05, 0.7, 0.6]])
    assert select_experts(sel, 1, n_group=2, topk_group=1, group_score="top2_sum")[0, 0] == 2
    assert select_experts(sel, 1, n_group=2, topk_group=1, group_score="max")[0, 0] == 0


def test_constant_bias_shift_changes_nothing(rng):
    cfg = _cfg(**V3)
    b = rng.standard_normal(16)
    gate, x = _gate(cfg, rng, bias=b)
    r0, _ = gate_forward(x, gate, cfg)
    r1, _ = gate_forward(x, dict(gate, e_score_correction_bias=b + 3.0), cfg)
    np.testing.assert_array_equal(r0.idx, r1.idx)
    np.testing.assert_allclose(r0.weights, r1.weights, rtol=1e-14)


def test_huge_bias_forces_expert_in_but_leaves_its_weight_unbiased(rng):
    cfg = _cfg(**V3)
    b = np.zeros(16)
    b[13] = 100.0
    gate, x = _gate(cfg, rng, bias=b)
    r, _ = gate_forward(x, gate, cfg)
    assert np.all(r.idx[:, 0] == 13)
    sel = np.take_along_axis(r.scores, r.idx, 1)
    np.testing.assert_allclose(r.weights[:, 0], 2.5 * r.scores[:, 13] / sel.sum(1), rtol=1e-14)
    assert np.all(r.weights[:, 0] < 2.5)                 # a bias in the weight would give ~2.5


def test_negative_biased_scores_zero_mask_leaks_and_inf_mask_does_not():
    """All biased scores < 0: a 0.0 fill makes excluded experts (0.0) beat every kept one (< 0)."""
    cfg = _cfg(**dict(V3, n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2))
    gate = {"weight": np.eye(8, 8) * 0.5, "e_score_correction_bias": np.full(8, -2.0)}
    x = np.eye(8)[:3] + 0.1 * np.arange(8)[None, :]
    leaky, _ = gate_forward(x, gate, cfg, mask_value=0.0)
    good, _ = gate_forward(x, gate, cfg)
    groups_good = good.idx // 2
    assert all(len(set(g)) == 1 for g in groups_good.tolist())       # both from the one kept group
    kept_group = groups_good[:, :1]                                  # the group chosen by top-2 sum
    assert np.all(leaky.idx // 2 != kept_group)                      # the bug: only excluded experts
    for backend in ("numpy", "numba"):
        r, _ = gate_forward(x, gate, cfg, mask_value=0.0, backend=backend)
        np.testing.assert_array_equal(r.idx, leaky.idx)


def test_mixtral_router_equals_renormalised_greedy_softmax(rng):
    cfg = _cfg(**dict(V2, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=True,
                      routed_scaling_factor=1.0))
    gate, x = _gate(cfg, rng)
    a, _ = mixtral_gate_forward(x, gate["weight"], 4)
    b, _ = gate_forward(x, gate, cfg)
    np.testing.assert_array_equal(a.idx, b.idx)
    np.testing.assert_allclose(a.weights, b.weights, **tol("equiv64"))


@given(moe_cases())
def test_gate_gradient_through_weights_renormalisation_and_scores(case):
    cfg, params, x = case
    u = x.reshape(-1, x.shape[-1])

    def f(u, gate):
        r, c = gate_forward(u, gate, cfg)
        return (r.weights, r.scores), lambda d: gate_backward(d[0], c, dscores=d[1])
    assert check_grad(f, [u, params["gate"]], max_entries=60) < GRAD


@given(rst.seeds(), st.integers(1, 4))
def test_mixtral_gate_gradient(rng, k):
    x, w = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
    gaps = -np.diff(np.sort(x @ w.T, 1)[:, ::-1], axis=1)              # (5, 3) gaps between ranks
    assume(k == 4 or gaps[:, k - 1].min() > 1e-4)

    def f(x, w):
        r, c = mixtral_gate_forward(x, w, k)
        return r.weights, lambda d: mixtral_gate_backward(d, c)
    assert check_grad(f, [x, w]) < GRAD


@pytest.mark.parametrize("change, match", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(num_experts_per_tok=9, topk_group=2), "num_experts_per_tok"),
    (dict(n_routed_experts=0), "n_routed_experts"),
])
def test_bad_config_raises_naming_the_field(rng, change, match):
    good = _cfg(**V3)
    gate, x = _gate(good, rng)
    bad = dataclasses.replace(good, **change)                       # not validated on purpose
    with pytest.raises(ValueError, match=match):
        gate_forward(x, gate, bad)


def test_bad_inputs_raise_naming_the_argument(rng):
    cfg = _cfg(**V3)
    gate, x = _gate(cfg, rng)
    with pytest.raises(ValueError, match=r"params\['weight'\]"):
        gate_forward(x, {"weight": gate["weight"][:, :-1], "e_score_correction_bias": np.zeros(16)}, cfg)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        gate_forward(x, {"weight": gate["weight"]}, cfg)
    with pytest.raises(ValueError, match=r"params\['e_score_correction_bias'\]"):
        gate_forward(x, dict(gate, e_score_correction_bias=np.zeros(15)), cfg)
    with pytest.raises(ValueError, match="only used by topk_method='noaux_tc'"):
        gate_forward(x, gate, _cfg(**V2))
    with pytest.raises(TypeError, match=r"params\['weight'\]"):
        gate_forward(x, dict(gate, weight=gate["weight"].astype(np.float32)), cfg)
    with pytest.raises(ValueError, match="x"):
        gate_forward(x[0], gate, cfg)
    with pytest.raises(TypeError, match="config"):
        gate_forward(x, gate, {"n_group": 4})
    with pytest.raises(ValueError, match="k"):
        select_experts(x, 9)
    with pytest.raises(ValueError, match="topk_group"):
        select_experts(x, 2, n_group=2, topk_group=3, group_score="max")
    with pytest.raises(ValueError, match="n_group"):
        select_experts(x, 2, n_group=3, topk_group=1, group_score="max")
