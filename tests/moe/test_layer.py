"""The MoE layer: sparse == dense, Numba == NumPy, structural equivalences, gradients, dropping, bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.core import swiglu_mlp_forward
from refimpl.moe import (
    balance_backward,
    init_moe_params,
    moe_backward,
    moe_forward,
    permute_experts,
    seq_balance_forward,
    split_shared_experts,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst
from refimpl.testing.naive import moe_dense_reference

from ._cases import moe_cases

GRAD = tol("gradcheck")["rtol"]
# Finite-difference step for the whole layer: its outputs reach |y| ~ 10, and with the default 1e-6
# the rounding error of central differences (~1e-16 |f| / eps) is ~1e-6 relative for the smallest
# expert-weight gradients (measured: ~1% of draws fail at 1.2-1.6e-6 with eps=1e-6, none in 1200 with
# 1e-5). 1e-5 is still 10x below the routing margin the strategy enforces (MIN_MARGIN = 1e-4).
EPS = 1e-5


def _layer(cfg, **kw):
    def f(x, params):
        y, cache, _ = moe_forward(x, params, cfg, **kw)
        return y, lambda dy: moe_backward(dy, cache)
    return f


def _leaves(tree):
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def _keys(tree):
    return {k: _keys(v) for k, v in tree.items()} if isinstance(tree, dict) else None


def _assert_tree_close(a, b, rtol, atol):
    """Leafwise allclose; atol is relative to the largest entry of the whole tree (a zero-gradient
    leaf, e.g. the gate with K=1 and renormalisation, is rounding noise at that scale)."""
    assert _keys(a) == _keys(b)
    scale = max(1.0, max(float(np.max(np.abs(x), initial=0.0)) for x in _leaves(b)))
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


@given(moe_cases(), st.sampled_from(["numpy", "numba"]))
def test_sparse_equals_dense_masked(case, backend):
    cfg, params, x = case
    y, _, info = moe_forward(x, params, cfg, backend=backend)
    np.testing.assert_allclose(y, moe_dense_reference(x, params, cfg), **tol("equiv64"))
    assert info["load"].sum() == x[..., 0].size * cfg.num_experts_per_tok
    np.testing.assert_array_equal(info["load"], info["load_kept"])


@given(moe_cases(), st.sampled_from([None, 0.5, 1.0]), st.sampled_from([np.float64, np.float32]))
def test_numba_equals_numpy_forward_and_backward(case, capacity, dtype):
    cfg, params, x = case
    params = _cast(params, dtype)
    x = x.astype(dtype)
    rng = np.random.default_rng(0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    out = {}
    for backend in ("numpy", "numba"):
        y, cache, info = moe_forward(x, params, cfg, capacity_factor=capacity, backend=backend)
        dx, dp = moe_backward(dy, cache)
        out[backend] = (y, dx, dp, info)
    t = tol("equiv64") if dtype == np.float64 else tol("equiv32")
    (y0, dx0, dp0, i0), (y1, dx1, dp1, i1) = out["numpy"], out["numba"]
    assert y1.dtype == dtype and dx1.dtype == dtype and dp1["experts"]["gate_proj"].dtype == dtype
    np.testing.assert_array_equal(i0["idx"], i1["idx"])
    np.testing.assert_allclose(y1, y0, **t)
    np.testing.assert_allclose(dx1, dx0, **t)
    _assert_tree_close(dp1, dp0, **t)


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree.astype(dtype)


@given(moe_cases())
def test_gradient_through_layer_all_weights_gate_and_input(case):
    """NumPy backend only: the Numba twins are checked against it in the test above."""
    cfg, params, x = case
    assert check_grad(_layer(cfg, backend="numpy"), [x, params], max_entries=15, eps=EPS) < GRAD


@given(moe_cases(), st.sampled_from([0.5, 0.75]))
def test_gradient_with_token_dropping(case, capacity):
    cfg, params, x = case
    f = _layer(cfg, capacity_factor=capacity, backend="numpy")
    assert check_grad(f, [x, params], max_entries=10, eps=EPS) < GRAD


@given(moe_cases(lead=(2, 5)))
def test_gradient_of_layer_plus_sequence_balance_loss(case):
    """dscores from a balance loss flows through the router together with the routed weights.

    alpha is large on purpose: with K = 1 and renormalisation the routed path gives the gate no
    gradient, and a tiny balance gradient would drown in the finite differences' rounding."""
    cfg, params, x = case

    def f(x, params):
        y, cache, info = moe_forward(x, params, cfg, backend="numpy")
        loss, lc = seq_balance_forward(info["scores"], info["idx"], alpha=5.0)   # large: see docstring

        def vjp(d):
            dy, dloss = d
            return moe_backward(dy, cache, dscores=balance_backward(dloss, lc))
        return (y, loss), vjp
    assert check_grad(f, [x, params], max_entries=10, eps=EPS) < GRAD


@pytest.mark.parametrize("scoring, method, norm", [("softmax", "greedy", False), ("sigmoid", "noaux_tc", True),
                                                   ("softmax", "group_limited_greedy", True)])
def test_one_expert_top1_is_a_dense_swiglu_ffn(rng, scoring, method, norm):
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
                                             topk_method=method, scoring_func=scoring, norm_topk_prob=norm,
                                             routed_scaling_factor=1.0, n_shared_experts=0)
    params = init_moe_params(cfg, rng, std=0.3)
    x = rng.standard_normal((3, 4, cfg.hidden_size))
    y, _, _ = moe_forward(x, params, cfg)
    dense = {k: v[0] for k, v in params["experts"].items()}
    want, _ = swiglu_mlp_forward(x, dense)
    if norm:
        np.testing.assert_allclose(y, want, **tol("equiv64"))
    else:                                  # unnormalised: the weight is the expert's score (softmax: 1)
        np.testing.assert_allclose(y, want, **tol("equiv64"))


@pytest.mark.parametrize("ns", [1, 2, 3])
def test_shared_experts_as_one_wide_mlp_equal_the_sum_of_ns_mlps(rng, ns):
    cfg = ModelConfig.preset("tiny").replace(n_shared_experts=ns)
    params = init_moe_params(cfg, rng, std=0.3)
    x = rng.standard_normal((6, cfg.hidden_size))
    wide, _ = swiglu_mlp_forward(x, params["shared_experts"])
    parts = split_shared_experts(params["shared_experts"], ns)
    assert len(parts) == ns and parts[0]["gate_proj"].shape == (cfg.moe_intermediate_size, cfg.hidden_size)
    np.testing.assert_allclose(wide, sum(swiglu_mlp_forward(x, p)[0] for p in parts), **tol("equiv64"))


@given(moe_cases(), rst.seeds())
def test_relabelling_experts_changes_nothing(case, rng):
    """Permute groups, and experts within each group (so group membership is kept), weights and bias together."""
    cfg, params, x = case
    g, per = cfg.n_group, cfg.n_routed_experts // cfg.n_group
    perm = np.concatenate([gi * per + rng.permutation(per) for gi in rng.permutation(g)])
    y0, c0, _ = moe_forward(x, params, cfg)
    y1, c1, info = moe_forward(x, permute_experts(params, perm), cfg)
    np.testing.assert_allclose(y1, y0, **tol("equiv64"))
    dy = rng.standard_normal(x.shape)
    dx0, dp0 = moe_backward(dy, c0)
    dx1, dp1 = moe_backward(dy, c1)
    np.testing.assert_allclose(dx1, dx0, **tol("equiv64"))
    _assert_tree_close(permute_experts(dp0, perm), dp1, **tol("equiv64"))


def test_token_dropping_keeps_the_highest_affinity_copies_per_device(rng):
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=8, n_group=4, topk_group=4, num_experts_per_tok=2)
    params = init_moe_params(cfg, rng, std=0.3)
    params["gate"]["weight"] = rng.standard_normal(params["gate"]["weight"].shape)
    params["gate"]["weight"][:2] += 1.0                                # skew: devices 0 overloaded
    x = rng.standard_normal((64, cfg.hidden_size)) + 0.5
    y, cache, info = moe_forward(x, params, cfg, capacity_factor=1.0, n_devices=4)
    n, k = 64, 2
    assert info["capacity"] == 32 and info["dropped"] > 0
    assert info["dropped"] == n * k - info["load_kept"].sum() == info["device_dropped"].sum()
    kept_per_dev = info["load_kept"].reshape(4, 2).sum(1)
    assert np.all(kept_per_dev <= info["capacity"])
    np.testing.assert_array_equal(kept_per_dev + info["device_dropped"], info["device_load"])
    keep = cache.plan.pos >= 0
    aff = np.take_along_axis(info["scores"], info["idx"], 1)
    dev = info["idx"] // 2
    for d in range(4):
        kept, dropped = aff[keep & (dev == d)], aff[~keep & (dev == d)]
        if dropped.size:
            assert kept.min() >= dropped.max()
    # the output is the dense layer with the dropped copies' gate values set to zero
    g = np.zeros((n, 8))
    np.put_along_axis(g, info["idx"], np.where(keep, info["weights"], 0.0), axis=1)
    np.testing.assert_allclose(y, moe_dense_reference(x, params, cfg, gate_matrix=g), **tol("equiv64"))
    # a large capacity drops nothing
    y_all, _, info_all = moe_forward(x, params, cfg, capacity_factor=4.0, n_devices=4)
    assert info_all["dropped"] == 0
    np.testing.assert_allclose(y_all, moe_forward(x, params, cfg)[0], **tol("equiv64"))


def test_bad_inputs_raise_naming_the_argument(rng):
    cfg = ModelConfig.preset("tiny")
    params = init_moe_params(cfg, rng)
    x = rng.standard_normal((4, cfg.hidden_size))
    with pytest.raises(ValueError, match="x: expected last axis hidden_size"):
        moe_forward(x[:, :-1], params, cfg)
    with pytest.raises(ValueError, match="missing 'shared_experts'"):
        moe_forward(x, {k: v for k, v in params.items() if k != "shared_experts"}, cfg)
    with pytest.raises(TypeError, match=r"params\['experts'\].*experts_from_list"):
        moe_forward(x, dict(params, experts=[{}]), cfg)
    bad = dict(params, experts=dict(params["experts"], down_proj=params["experts"]["down_proj"][:, :, :-1]))
    with pytest.raises(ValueError, match=r"params\['experts'\]\['down_proj'\]"):
        moe_forward(x, bad, cfg)
    with pytest.raises(TypeError, match=r"params\['experts'\]\['gate_proj'\]"):
        moe_forward(x, _cast(params, np.float32), cfg) if False else moe_forward(x.astype(np.float32), dict(
            _cast(params, np.float32), experts=params["experts"]), cfg)
    with pytest.raises(TypeError, match="x"):
        moe_forward(x.astype(np.int64), params, cfg)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_forward(x, params, cfg, capacity_factor=0.0)
    with pytest.raises(ValueError, match="n_devices"):
        moe_forward(x, params, cfg, capacity_factor=1.0, n_devices=3)
    from refimpl.moe.dispatch import combine, dispatch, make_plan
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match="idx"):
            make_plan(np.array([[0, 8]]), 8, backend=backend)
        plan = make_plan(np.array([[0, 1], [2, 3]]), 8, backend=backend)
        with pytest.raises(ValueError, match="x"):
            dispatch(np.ones((3, 4)), plan, backend=backend)
        with pytest.raises(ValueError, match="weights"):
            combine(np.ones((4, 4)), np.ones((2, 3)), plan, backend=backend)
    y, cache, _ = moe_forward(x, params, cfg)
    with pytest.raises(ValueError, match="dy"):
        moe_backward(y[:-1], cache)
    with pytest.raises(ValueError, match="dscores"):
        moe_backward(y, cache, dscores=np.zeros((4, 7)))
    with pytest.raises(ValueError, match="NaN"):
        moe_forward(np.full_like(x, np.nan), params, cfg)


@pytest.mark.parametrize("method", ["noaux_tc", "greedy", "group_limited_greedy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_router_logits_stay_finite(rng, method, dtype):
    """|logits| ~ 1e4: saturated sigmoids (scores exactly 0 or 1) and one-hot softmaxes, no NaN anywhere."""
    cfg = ModelConfig.preset("tiny").replace(topk_method=method,
                                             scoring_func="sigmoid" if method == "noaux_tc" else "softmax")
    params = _cast(init_moe_params(cfg, rng, std=0.3), dtype)
    params["gate"]["weight"] = (300.0 * rng.standard_normal(params["gate"]["weight"].shape)).astype(dtype)
    x = rng.standard_normal((3, 4, cfg.hidden_size)).astype(dtype)
    y, cache, info = moe_forward(x, params, cfg)
    dx, dp = moe_backward(np.ones_like(y), cache, dscores=np.ones_like(info["scores"]))
    assert y.dtype == dtype and np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(v).all() for v in _leaves(dp))
    assert np.abs(x.reshape(-1, cfg.hidden_size) @ params["gate"]["weight"].T).max() > 1e3   # really extreme
