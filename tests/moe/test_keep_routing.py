"""Keep Routing (DeepSeek-V3.2 §3.1): the MoE layer with given routes, its gate gradient, the whole model."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.model import init_params, model_backward, model_forward
from refimpl.moe import gate_backward, gate_forward, moe_backward, moe_forward
from refimpl.rl.stable import router_choice
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst
from refimpl.tree import tree_flatten

from ._cases import moe_cases

GRAD = tol("gradcheck")["rtol"]
EPS = 1e-5  # as test_layer.py: outputs |y| ~ 10 (see its note)


def _random_routes(rng, n, e, k):
    return np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int64)


@given(moe_cases())
def test_own_routes_reproduce_the_layer_exactly(case):
    """Given the routes the router itself picks, forward and backward are bit-identical."""
    cfg, params, x = case
    y, cache, info = moe_forward(x, params, cfg, backend="numpy")
    y2, cache2, info2 = moe_forward(x, params, cfg, backend="numpy", routes=info["idx"])
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(info2["weights"], info["weights"])
    dy = np.random.default_rng(0).standard_normal(y.shape)
    dx, g = moe_backward(dy, cache)
    dx2, g2 = moe_backward(dy, cache2)
    np.testing.assert_array_equal(dx2, dx)
    for a, b in zip(_leaves(g), _leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    return tree_flatten(tree)[0]


@given(moe_cases(), rst.seeds())
def test_gate_with_given_routes_gradient_matches_fd(case, rng):
    """Any recorded routes (not the router's own): no selection happens, the gate values are the current
    scores on those experts, and their gradient into the gate weight and input matches FD."""
    cfg, params, x = case
    u = x.reshape(-1, x.shape[-1])
    routes = _random_routes(rng, u.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok)

    def f(u, gate):
        r, c = gate_forward(u, gate, cfg, routes=routes)
        return r.weights, lambda g: gate_backward(g, c)
    assert check_grad(f, [u, params["gate"]]) < GRAD


@given(moe_cases(), rst.seeds())
def test_layer_with_given_routes_gradient_matches_fd(case, rng):
    cfg, params, x = case
    lead = x.shape[:-1]
    routes = _random_routes(rng, int(np.prod(lead)), cfg.n_routed_experts,
                            cfg.num_experts_per_tok).reshape(*lead, -1)

    def f(x, params):
        y, cache, _ = moe_forward(x, params, cfg, backend="numpy", routes=routes)
        return y, lambda g: moe_backward(g, cache)
    assert check_grad(f, [x, params], max_entries=15, eps=EPS) < GRAD


@given(moe_cases(), rst.seeds())
def test_changing_the_router_changes_gate_values_never_the_expert_set(case, rng):
    cfg, params, x = case
    _, _, info = moe_forward(x, params, cfg, backend="numpy")
    moved = dict(params, gate=dict(params["gate"], weight=params["gate"]["weight"]
                                   + rng.standard_normal(params["gate"]["weight"].shape)))
    _, _, kept = moe_forward(x, moved, cfg, backend="numpy", routes=info["idx"])
    np.testing.assert_array_equal(kept["idx"], info["idx"])
    if not (cfg.num_experts_per_tok == 1 and cfg.norm_topk_prob):   # else g = routed_scaling_factor always
        assert not np.allclose(kept["weights"], info["weights"])
    # and router_choice reads the router's own choice from the info of any forward
    np.testing.assert_array_equal(router_choice(info, params["gate"], cfg), info["idx"])


def test_bad_routes_are_rejected(rng):
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                             topk_method="greedy", scoring_func="softmax")
    gate = {"weight": rng.standard_normal((4, cfg.hidden_size))}
    u = rng.standard_normal((3, cfg.hidden_size))
    for routes, match in ((np.zeros((3, 3), np.int64), "shape"), (np.full((3, 2), 4), r"\[0, 4\)"),
                          (np.array([[1, 1]] * 3), "distinct")):
        with pytest.raises(ValueError, match=match):
            gate_forward(u, gate, cfg, routes=routes)
    with pytest.raises(TypeError, match="routes"):
        gate_forward(u, gate, cfg, routes=np.zeros((3, 2)))


@given(rst.seeds(), st.sampled_from([np.float32, np.float64]))
def test_model_with_its_own_routes_reproduces_logits_and_gradients(rng, dtype):
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                                             num_experts_per_tok=2, n_group=2, topk_group=1, topk_method="noaux_tc",
                                             scoring_func="sigmoid", norm_topk_prob=True)
    params = init_params(cfg, rng, dtype)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 7))
    logits, cache, info = model_forward(ids, params, cfg)
    routes = [None if i is None else i["idx"] for i in info["moe"]]
    assert routes[0] is None and routes[1] is not None
    logits2, cache2, _ = model_forward(ids, params, cfg, routes=routes)
    np.testing.assert_array_equal(logits2, logits)
    d = rng.standard_normal(logits.shape).astype(dtype)
    g, g2 = model_backward(d, cache), model_backward(d, cache2)
    for a, b in zip(_leaves(g), _leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="routes"):
        model_forward(ids, params, cfg, routes=routes[:2])
