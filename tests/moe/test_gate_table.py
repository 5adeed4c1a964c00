"""The router table (refimpl.moe.gates): every gate through the MoE layer (float64 finite differences,
balance-loss gradient included) and through a tiny model's training step; a new gate with its own
parameter picked up by the layer, init_params, the parameter-tree check and the checkpoint layout."""

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings

from refimpl.config import ModelConfig
from refimpl.model import hub_spec, init_params, loss_backward, loss_forward
from refimpl.model.structure import check_params
from refimpl.moe import GATES, Gate, get_gate, init_moe_params, moe_backward, moe_forward, register_gate
from refimpl.moe.gates import check_params_against_shapes, mixtral_layer_backward, mixtral_layer_forward
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst
from refimpl.tree import tree_map

GRAD_TOL = tol("gradcheck")["rtol"]
#: the config each router needs (the Mixtral gate selects greedily, without bias or groups)
GATE_CONFIGS = {"deepseek": {}, "mixtral": dict(topk_method="greedy", n_group=1, topk_group=1)}


def gate_config(name):
    base = ModelConfig.preset("tiny").replace(aux_loss_alpha=0.01)
    return base.replace(gate_type=name, **GATE_CONFIGS.get(name, {}))


def _selection_margin(info):
    """Smallest gap between a kept and a rejected expert's score: FD must not flip the choice."""
    s = -np.sort(-info["scores"].reshape(-1, info["scores"].shape[-1]), axis=1)   # (N, E)
    k = info["idx"].shape[-1]
    return float(np.min(s[:, k - 1] - s[:, k])) if k < s.shape[1] else np.inf


def test_the_built_in_gates_have_configs():
    assert set(GATE_CONFIGS) >= {"deepseek", "mixtral"} and set(GATE_CONFIGS) <= set(GATES) | {"dummy_scaled"}


@pytest.mark.parametrize("name", list(GATES))
@settings(max_examples=5)
@given(rng=rst.seeds())
def test_every_gate_through_the_moe_layer(name, rng):
    """moe_backward against central differences in float64, wrt x and every parameter (the router's own
    included), with random upstream gradients for y and for the scores (the balance losses' path)."""
    cfg = gate_config(name)
    params = init_moe_params(cfg, rng, std=0.5)
    x = rng.standard_normal((2, 3, cfg.hidden_size))
    y, cache, info = moe_forward(x, params, cfg, backend="numpy")
    if _selection_margin(info) < 1e-4:   # a near-tie: the choice would flip under FD's steps
        return
    ds = rng.standard_normal(info["scores"].shape)
    # Keep Routing: the recorded experts give the same output (the gate values are recomputed on them)
    np.testing.assert_allclose(moe_forward(x, params, cfg, backend="numpy", routes=info["idx"])[0], y, rtol=1e-13)

    def f(x, p):
        y, c, inf = moe_forward(x, p, cfg, backend="numpy")
        return (y, inf["scores"]), lambda d: moe_backward(d[0], c, dscores=d[1])
    assert check_grad(f, [x, params], max_entries=60) < GRAD_TOL
    assert set(moe_backward(np.ones_like(y), cache, dscores=ds)[1]["gate"]) == set(params["gate"])


@pytest.mark.parametrize("name", list(GATES))
def test_every_gate_trains_a_tiny_model(name):
    """init_params builds the router's parameters, check_params accepts the tree, the checkpoint layout
    names them, and one gradient step on the full loss (balance loss on) lowers it and moves the router."""
    cfg = gate_config(name)
    params = init_params(cfg, np.random.default_rng(0))
    check_params(params, cfg)
    moe_layer = next(lp for lp in params["model"]["layers"] if "gate" in lp["mlp"])
    assert set(moe_layer["mlp"]["gate"]) == set(get_gate(name).param_shapes(cfg))
    names = {n for n, *_ in hub_spec(cfg)}
    assert all(f"model.layers.1.mlp.gate.{k}" in names for k in moe_layer["mlp"]["gate"])
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8))
    loss, cache, _ = loss_forward(ids, params, cfg, backend="numpy")
    grads = loss_backward(1.0, cache, params)
    g_gate = next(g for g in grads["model"]["layers"] if "gate" in g["mlp"])["mlp"]["gate"]
    assert np.abs(g_gate["weight"]).max() > 0
    step = tree_map(lambda p, g: p - 0.05 * g, params, grads)
    assert float(loss_forward(ids, step, cfg, backend="numpy")[0]) < float(loss)


# ----------------------------------------------------------------------------------------------
# A new router: the Mixtral gate with a learned per-expert output scale (its own parameter)
# ----------------------------------------------------------------------------------------------

class ScaledCache(NamedTuple):
    inner: object
    idx: np.ndarray        # (N, K)
    raw: np.ndarray        # (N, K) gate values before the scale
    scale: np.ndarray      # (E,)


def _shapes(config):
    return {"weight": (config.n_routed_experts, config.hidden_size), "expert_scale": (config.n_routed_experts,)}


def _forward(x, params, config, *, mask_value=-np.inf, backend=None, routes=None):
    check_params_against_shapes(x, params, config, _shapes(config))
    routing, inner = mixtral_layer_forward(x, {"weight": params["weight"]}, config, backend=backend, routes=routes)
    s = params["expert_scale"]
    return routing._replace(weights=routing.weights * s[routing.idx]), ScaledCache(inner, routing.idx,
                                                                                   routing.weights, s)


def _backward(dweights, cache, dscores=None):
    dx, dp = mixtral_layer_backward(dweights * cache.scale[cache.idx], cache.inner, dscores)
    dscale = np.zeros_like(cache.scale)
    np.add.at(dscale, cache.idx, dweights * cache.raw)
    return dx, {**dp, "expert_scale": dscale}


@pytest.fixture
def dummy_gate():
    entry = register_gate(Gate("dummy_scaled", _forward, _backward, _shapes,
                               lambda c, normal, dtype: {"weight": normal(*_shapes(c)["weight"]),
                                                         "expert_scale": np.ones(c.n_routed_experts, dtype)},
                               lambda x, p, c: check_params_against_shapes(x, p, c, _shapes(c)),
                               GATES["mixtral"].check_config))
    yield entry
    GATES.pop(entry.name)


def test_a_registered_gate_is_picked_up_everywhere(dummy_gate):
    """One register_gate call: the config accepts the name, init_params and the tree check include the new
    parameter, the checkpoint layout names it, and the MoE layer's and the model's gradients reach it."""
    with pytest.raises(ValueError, match="gate_type"):
        gate_config("nope")
    cfg = gate_config("mixtral").replace(gate_type="dummy_scaled")
    params = init_params(cfg, np.random.default_rng(0))
    check_params(params, cfg)
    layer = params["model"]["layers"][1]["mlp"]
    assert set(layer["gate"]) == {"weight", "expert_scale"}
    assert "model.layers.1.mlp.gate.expert_scale" in {n for n, *_ in hub_spec(cfg)}
    with pytest.raises(ValueError, match="expert_scale"):
        check_params({**params, "model": {**params["model"], "layers": [params["model"]["layers"][0], {
            **params["model"]["layers"][1], "mlp": {**layer, "gate": {"weight": layer["gate"]["weight"]}}}]}}, cfg)
    rng = np.random.default_rng(3)
    mp = init_moe_params(cfg, rng, std=0.5)
    mp["gate"]["expert_scale"] = rng.uniform(0.5, 1.5, cfg.n_routed_experts)
    x = rng.standard_normal((5, cfg.hidden_size))

    def f(x, p):
        y, c, inf = moe_forward(x, p, cfg, backend="numpy")
        return (y, inf["scores"]), lambda d: moe_backward(d[0], c, dscores=d[1])
    assert check_grad(f, [x, mp], max_entries=60) < GRAD_TOL
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8))
    _, cache, _ = loss_forward(ids, params, cfg, backend="numpy")
    grads = loss_backward(1.0, cache, params)
    assert np.abs(grads["model"]["layers"][1]["mlp"]["gate"]["expert_scale"]).max() > 0


def test_gate_configs_are_validated():
    """gate_type must name a table entry, and the entry refuses settings it cannot honour."""
    with pytest.raises(ValueError, match="gate_type"):
        ModelConfig.preset("tiny").replace(gate_type="switch")
    with pytest.raises(ValueError, match="topk_method"):
        ModelConfig.preset("tiny").replace(gate_type="mixtral")       # tiny routes with noaux_tc
    assert ModelConfig.preset("tiny").gate_type == "deepseek"
