"""Differential tests against HF transformers' DeepseekV3MoE / DeepseekV2Moe (tiny random configs, no downloads).

transformers computes the router (logits, scores, weights) in float32 even in a float64 model
(reference notes §10), so the whole-layer comparison uses the "transformers64" tolerance. Two
oracles avoid that loss of precision: the router alone is compared in float32 against refimpl run in
float32, and HF's experts are driven with refimpl's float64 routing and compared at "torch64".
"""

import numpy as np
import pytest

from refimpl.config import ModelConfig
from refimpl.moe import experts_from_fused, gate_forward, moe_backward, moe_forward
from refimpl.testing import tol

from ._cases import margin

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
    "v3-noaux_tc": dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                        routed_scaling_factor=2.5, n_group=4, topk_group=2, num_experts_per_tok=3,
                        n_shared_experts=1),
    "v3-no-groups": dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                         routed_scaling_factor=1.5, n_group=1, topk_group=1, num_experts_per_tok=2,
                         n_shared_experts=2),
    "v2-group_limited": dict(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
                             routed_scaling_factor=16.0, n_group=4, topk_group=2, num_experts_per_tok=3,
                             n_shared_experts=2),
    "v2-lite-greedy": dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                           routed_scaling_factor=1.0, n_group=1, topk_group=1, num_experts_per_tok=2,
                           n_shared_experts=2),
}
D, I, E = 16, 6, 8


def _build(name, seed):
    fields = dict(CASES[name], hidden_size=D, moe_intermediate_size=I, n_routed_experts=E)
    cfg = ModelConfig.preset("tiny").replace(**fields)
    common = dict(fields, vocab_size=16, num_hidden_layers=1, num_attention_heads=2, hidden_act="silu")
    if name.startswith("v3"):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        common.pop("topk_method")
        common.pop("scoring_func")
        module = DeepseekV3MoE(transformers.DeepseekV3Config(**common))
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        common.pop("scoring_func")
        module = DeepseekV2Moe(transformers.DeepseekV2Config(**common))
    module = module.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        if hasattr(module.gate, "e_score_correction_bias"):
            module.gate.e_score_correction_bias.copy_(0.5 * torch.randn(E, generator=g, dtype=torch.float64) - 0.6)
    sd = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    params = {"gate": {"weight": sd["gate.weight"]},
              "experts": experts_from_fused(sd["experts.gate_up_proj"], sd["experts.down_proj"]),
              "shared_experts": {k: sd[f"shared_experts.{k}.weight"] for k in ("gate_proj", "up_proj", "down_proj")}}
    if "gate.e_score_correction_bias" in sd:
        params["gate"]["e_score_correction_bias"] = sd["gate.e_score_correction_bias"]
    x = np.random.default_rng(seed).standard_normal((2, 5, D))
    assert margin(x, params["gate"], cfg) > 1e-5            # no near-ties: float32 vs float64 choose alike
    return cfg, module, params, x


def _dense(idx, w):
    g = np.zeros((idx.shape[0], E))
    np.put_along_axis(g, np.asarray(idx), np.asarray(w), axis=1)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_layer_forward_and_gradients_match_transformers(name, seed):
    cfg, module, params, x = _build(name, seed)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    y, cache, _ = moe_forward(x, params, cfg)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol("transformers64"))
    dy = np.random.default_rng(7).standard_normal(x.shape)
    (yt * torch.as_tensor(dy)).sum().backward()
    dx, dp = moe_backward(dy, cache)
    rtol, atol = tol("transformers64").values()

    def close(mine, theirs):            # float32 router weights: the absolute error scales with the array
        np.testing.assert_allclose(mine, theirs, rtol=rtol, atol=atol * max(1.0, np.abs(theirs).max()))
    close(dx, xt.grad.numpy())
    hf = dict(module.named_parameters())
    gu = hf["experts.gate_up_proj"].grad.numpy()
    close(dp["experts"]["gate_proj"], gu[:, :I])
    close(dp["experts"]["up_proj"], gu[:, I:])
    close(dp["experts"]["down_proj"], hf["experts.down_proj"].grad.numpy())
    close(dp["gate"]["weight"], hf["gate.weight"].grad.numpy())
    for k in ("gate_proj", "up_proj", "down_proj"):     # the shared MLP never sees the router: exact
        np.testing.assert_allclose(dp["shared_experts"][k], hf[f"shared_experts.{k}.weight"].grad.numpy(),
                                   **tol("torch64"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_router_matches_transformers_in_float32(name, seed):
    cfg, module, params, x = _build(name, seed)
    u = x.reshape(-1, D)
    _, w_hf, idx_hf = module.gate(torch.tensor(u))
    gate32 = {k: v.astype(np.float32) for k, v in params["gate"].items()}
    r, _ = gate_forward(u.astype(np.float32), gate32, cfg)
    np.testing.assert_array_equal(np.sort(r.idx, 1), np.sort(idx_hf.numpy(), 1))
    np.testing.assert_allclose(_dense(r.idx, r.weights), _dense(idx_hf.numpy(), w_hf.detach().numpy()),
                               **tol("equiv32"))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(CASES))
def test_experts_match_transformers_exactly_given_float64_routing(name, seed):
    """HF's expert loop and shared MLP, driven with refimpl's float64 routing, agree to float64 rounding."""
    cfg, module, params, x = _build(name, seed)
    u = x.reshape(-1, D)
    r, _ = gate_forward(u, params["gate"], cfg)
    with torch.no_grad():
        ut = torch.tensor(u)
        y_hf = module.experts(ut, torch.as_tensor(r.idx), torch.tensor(r.weights)) + module.shared_experts(ut)
    y, _, _ = moe_forward(x, params, cfg)
    np.testing.assert_allclose(y.reshape(-1, D), y_hf.numpy(), **tol("torch64"))
