"""MLA against transformers' DeepseekV3Attention / DeepseekV2Attention on tiny random configs.

No downloads: the modules are built from a config and loaded with refimpl's parameters, whose
names are the checkpoint names. transformers computes RMSNorm and the RoPE tables in float32 even
in a float64 model (reference §10), so the exact tests patch those two steps to float64 (and use
torch's float64 SDPA instead of the eager path, whose softmax is float32); the unpatched tests
use the "transformers64" tolerance.
"""

import numpy as np
import pytest

from refimpl import core
from refimpl.attention import init_latent_cache, mla_backward, mla_forward, mla_infer
from refimpl.config import ModelConfig
from refimpl.testing import tol

from .helpers import mla_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
v3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

EXACT, LOOSE = tol("torch64"), tol("transformers64")
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def configs(q_lora_rank=16, rope_scaling=YARN):
    cfg = ModelConfig.preset("tiny").replace(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling,
                                             max_position_embeddings=64)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rope_scaling:
        rope = dict(rope, rope_type="yarn", **{k: v for k, v in rope_scaling.items() if k != "type"})
    hf = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, q_lora_rank=q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
              qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
              v_head_dim=cfg.v_head_dim, max_position_embeddings=64, rope_parameters=rope,
              attn_implementation="sdpa", vocab_size=cfg.vocab_size, n_routed_experts=8, n_group=4, topk_group=2,
              num_experts_per_tok=2)
    return cfg, hf


def load(module, params):
    module.load_state_dict({f"{k}.weight": torch.tensor(v) for k, v in params.items()})
    return module


def float64_norms(module):
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        norm = getattr(module, name)
        if norm is not None:
            def fwd(h, norm=norm):
                return norm.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            norm.forward = fwd


def float64_cos_sin(cfg, b, positions):
    """transformers' V3 table layout cat(angle, angle) * amplitude, computed in float64."""
    inv = core.rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    ang = torch.tensor(np.asarray(positions)[:, None] * inv)
    ang = torch.cat([ang, ang], -1)[None].expand(b, -1, -1)
    amp = core.rope_attention_factor(cfg.rope_scaling)
    return amp * ang.cos(), amp * ang.sin()


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("rope_scaling", [YARN, None])
def test_v3_attention_exact_forward_gradients_and_cache(rng, q_lora_rank, rope_scaling):
    cfg, hf = configs(q_lora_rank, rope_scaling)
    p = mla_params(cfg, rng)
    attn = load(v3.DeepseekV3Attention(transformers.DeepseekV3Config(**hf), 0).double(), p)
    float64_norms(attn)
    b, t = 2, 6
    x = rng.standard_normal((b, t, cfg.hidden_size))
    pos = 3 + np.arange(t)
    y, c = mla_forward(x, p, cfg, pos)
    dy = rng.standard_normal(y.shape)
    dx, dp = mla_backward(dy, c)
    tx = torch.tensor(x, requires_grad=True)
    ty = attn(tx, float64_cos_sin(cfg, b, pos), None)[0]
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), **EXACT)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **EXACT)
    for name, param in attn.named_parameters():
        np.testing.assert_allclose(dp[name.removesuffix(".weight")], param.grad.numpy(), **EXACT, err_msg=name)

    # transformers 5.x caches the same latent: c_KV after the norm, k_R after RoPE (de-interleaved)
    cache = transformers.DynamicCache(config=attn.config)
    with torch.no_grad():
        attn(torch.tensor(x), float64_cos_sin(cfg, b, np.arange(t)), None, cache=cache)
    ours = init_latent_cache(cfg, b, t)
    mla_infer(x, p, cfg, ours, 0)
    layer = cache.layers[0]
    np.testing.assert_allclose(layer.keys[:, 0].numpy(), ours.c_kv, **EXACT)
    perm = core.deinterleave_perm(cfg.qk_rope_head_dim)
    np.testing.assert_allclose(layer.values[:, 0].numpy(), ours.k_pe[..., perm], **EXACT)


def test_v3_attention_unpatched_with_its_own_rope_tables(rng):
    """transformers as shipped (its YaRN inv_freq, amplitude and scaling; float32 tables and norms)."""
    cfg, hf = configs(16, dict(YARN, mscale=1.0, mscale_all_dim=1.0))
    config = transformers.DeepseekV3Config(**hf)
    p = mla_params(cfg, rng)
    attn = load(v3.DeepseekV3Attention(config, 0).double(), p)
    rotary = v3.DeepseekV3RotaryEmbedding(config)
    x = rng.standard_normal((2, 7, cfg.hidden_size))
    tx = torch.tensor(x)
    pos = torch.arange(7)[None].expand(2, -1)
    assert attn.scaling == pytest.approx(core.softmax_scale(cfg.qk_head_dim, cfg.rope_scaling), rel=1e-15)
    np.testing.assert_allclose(rotary.inv_freq.numpy(), core.rope_inv_freq(4, cfg.rope_theta, cfg.rope_scaling),
                               rtol=1e-6)
    with torch.no_grad():
        y_hf = attn(tx, rotary(tx, pos), None)[0].numpy()
    np.testing.assert_allclose(mla_forward(x, p, cfg)[0], y_hf, **LOOSE)


def test_v2_attention_interleaved_complex_rope(rng):
    """DeepseekV2Attention rotates adjacent pairs as complex numbers (float32) with V2's m^2 scale."""
    v2 = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
    cfg, hf = configs(None, YARN)
    hf.pop("n_group"), hf.pop("topk_group")
    config = transformers.DeepseekV2Config(**hf)
    p = mla_params(cfg, rng)
    attn = load(v2.DeepseekV2Attention(config, 0).double(), p)
    rotary = v2.DeepseekV2RotaryEmbedding(config)
    x = rng.standard_normal((1, 6, cfg.hidden_size))
    tx = torch.tensor(x)
    with torch.no_grad():
        y_hf = attn(tx, None, position_embeddings=rotary(tx, torch.arange(6)[None]))[0].numpy()
    np.testing.assert_allclose(mla_forward(x, p, cfg)[0], y_hf, **LOOSE)
