"""Small configs shared by the model tests."""

import numpy as np
import pytest

from refimpl.config import ModelConfig


def tiny_config(**changes):
    """2 layers (dense, then MoE with V3 routing), MTP depth 1, q compression, YaRN; float64-friendly."""
    base = dict(vocab_size=13, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2,
                qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_shared_experts=1, n_group=2,
                topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, aux_loss_alpha=0.1,
                num_nextn_predict_layers=1, initializer_range=0.3, max_position_embeddings=32,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    base.update(changes)
    return ModelConfig.preset("tiny").replace(**base)


@pytest.fixture
def tiny():
    from refimpl.model import init_params
    cfg = tiny_config()
    params = init_params(cfg, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for lp in params["model"]["layers"] + params["mtp"]:
        if "gate" in lp["mlp"]:
            lp["mlp"]["gate"]["e_score_correction_bias"] = 0.3 * rng.standard_normal(cfg.n_routed_experts)
    return cfg, params
