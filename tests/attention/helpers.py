"""Shared drawing helpers for the attention tests (small shapes: check_grad perturbs every entry twice)."""

import numpy as np
from hypothesis import strategies as st

from refimpl.attention import init_mha_params, init_mla_params
from refimpl.config import ModelConfig
from refimpl.testing import strategies as rst


def mla_params(cfg, rng, dtype=np.float64, weight_scale=3.0):
    """MLA weights with non-trivial attention (scaled up) and non-unit norm gains."""
    p = init_mla_params(cfg, rng, dtype=np.float64)
    for k in p:
        if k.endswith("layernorm"):
            p[k] = 1.0 + 0.3 * rng.standard_normal(p[k].shape)
        else:
            p[k] = weight_scale * p[k]
    return {k: v.astype(dtype) for k, v in p.items()}


@st.composite
def mla_cases(draw, max_b=2, max_t=4, q_lora=None, yarn=None):
    """(config, params, x (B, T, D), positions (B, T)) for MLA, every shape tiny."""
    cfg = draw(rst.model_configs(moe=False, q_lora=q_lora, yarn=yarn))
    rng = draw(rst.seeds())
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    x = rng.standard_normal((b, t, cfg.hidden_size))
    start = draw(st.integers(0, cfg.max_position_embeddings - t))
    return cfg, mla_params(cfg, rng), x, start + np.arange(t)


def mha_config(h=4, hk=2, dh=4, d=12, yarn=False, max_pos=64):
    """A small standard-attention (model_type "llama") config with Dh = dh."""
    fields = dict(model_type="llama", hidden_size=d, num_attention_heads=h, num_key_value_heads=hk,
                  head_dim=dh, max_position_embeddings=max_pos, n_routed_experts=0, n_shared_experts=0,
                  first_k_dense_replace=0, n_group=1, topk_group=1, num_experts_per_tok=1,
                  q_lora_rank=None, initializer_range=0.5, vocab_size=16, intermediate_size=8)
    if yarn:
        fields["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                  "beta_fast": 32, "beta_slow": 1}
    return ModelConfig.from_dict(fields)


@st.composite
def mha_cases(draw, max_b=2, max_t=4):
    """(config, params, x, positions) for MHA/GQA/MQA."""
    hk = draw(st.sampled_from([1, 2, 3]))
    h = hk * draw(st.sampled_from([1, 2]))
    dh = draw(st.sampled_from([2, 4]))
    cfg = mha_config(h=h, hk=hk, dh=dh, d=draw(st.sampled_from([4, 8])), yarn=draw(st.booleans()))
    rng = draw(rst.seeds())
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    start = draw(st.integers(0, cfg.max_position_embeddings - t))
    return cfg, init_mha_params(cfg, rng), rng.standard_normal((b, t, cfg.hidden_size)), start + np.arange(t)
