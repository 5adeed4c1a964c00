"""MLA: gradients, inference-path equivalences, cache contents, scale and position properties, errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import core
from refimpl.attention import (
    LATENT_NORM_EPS,
    absorbed_weights,
    init_latent_cache,
    init_mla_params,
    mla_backward,
    mla_forward,
    mla_infer,
    mla_param_shapes,
)
from refimpl.config import ModelConfig
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import mla_cases, mla_params

EQ64, EQ32 = tol("equiv64"), tol("equiv32")
GRAD_TOL = tol("gradcheck")["rtol"]
YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny(**changes):
    return ModelConfig.preset("tiny").replace(**changes)


def _f(cfg, positions):
    def f(x, p):
        y, c = mla_forward(x, p, cfg, positions)
        return y, lambda dy: mla_backward(dy, c)
    return f


@given(case=mla_cases())
def test_gradients_every_param_and_input(case):
    cfg, p, x, pos = case
    err, details = check_grad(_f(cfg, pos), [x, p], max_entries=12, return_details=True)
    assert err < GRAD_TOL, details
    assert len(details) == 1 + len(p)          # the input and every parameter were checked


def test_gradients_with_yarn_and_both_query_paths(rng):
    for q_lora in (16, None):
        cfg = tiny(q_lora_rank=q_lora, rope_scaling=dict(YARN, original_max_position_embeddings=16, factor=4.0))
        p = mla_params(cfg, rng)
        x = rng.standard_normal((2, 5, cfg.hidden_size))
        assert check_grad(_f(cfg, 7 + np.arange(5)), [x, p], max_entries=30) < GRAD_TOL


@given(case=mla_cases(max_t=5), impl=st.sampled_from(["naive", "absorb"]))
def test_prefill_equals_forward(case, impl):
    cfg, p, x, _ = case
    y, _ = mla_forward(x, p, cfg)
    cache = init_latent_cache(cfg, x.shape[0], x.shape[1] + 2)
    np.testing.assert_allclose(mla_infer(x, p, cfg, cache, 0, impl=impl), y, **EQ64)


@given(case=mla_cases(max_t=5), data=st.data())
def test_absorbed_equals_naive_at_any_start(case, data):
    cfg, p, x, _ = case
    b, t, _ = x.shape
    start = data.draw(st.integers(0, 6))
    c1, c2 = init_latent_cache(cfg, b, start + t), init_latent_cache(cfg, b, start + t)
    hist = np.random.default_rng(0).standard_normal((b, start + t, cfg.hidden_size))
    if start:
        mla_infer(hist[:, :start], p, cfg, c1, 0, impl="naive")
        mla_infer(hist[:, :start], p, cfg, c2, 0, impl="absorb")
    y_naive = mla_infer(x, p, cfg, c1, start, impl="naive")
    y_abs = mla_infer(x, p, cfg, c2, start, impl="absorb")
    np.testing.assert_allclose(y_abs, y_naive, **EQ64)
    np.testing.assert_array_equal(c1.latent, c2.latent)


@given(case=mla_cases(max_t=6), data=st.data(), impl=st.sampled_from(["naive", "absorb"]))
def test_chunked_prefill_then_decode_equals_full(case, data, impl):
    """Prefill a chunk, then chunks at start_pos > 0 (mask j <= start_pos + i), then one-token steps."""
    cfg, p, x, _ = case
    b, t, _ = x.shape
    y_full, _ = mla_forward(x, p, cfg)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, t - 1), max_size=3)) if t > 1 else []))
    bounds = [0, *cuts, t]
    cache = init_latent_cache(cfg, b, t)
    ys = [mla_infer(x[:, s:e], p, cfg, cache, s, impl=impl) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_full, **EQ64)


def test_token_by_token_decode_equals_full(rng):
    cfg = tiny(rope_scaling=dict(YARN, original_max_position_embeddings=16, factor=4.0))
    p = mla_params(cfg, rng)
    x = rng.standard_normal((3, 9, cfg.hidden_size))
    y_full, _ = mla_forward(x, p, cfg)
    for impl in ("naive", "absorb"):
        cache = init_latent_cache(cfg, 3, 16)
        ys = [mla_infer(x[:, :4], p, cfg, cache, 0, impl=impl)]
        ys += [mla_infer(x[:, i:i + 1], p, cfg, cache, i, impl=impl) for i in range(4, 9)]
        np.testing.assert_allclose(np.concatenate(ys, axis=1), y_full, **EQ64)


def test_cache_holds_post_norm_latent_and_rotated_rope_key(rng):
    cfg = tiny(q_lora_rank=None)
    p = mla_params(cfg, rng)
    x = rng.standard_normal((2, 5, cfg.hidden_size))
    cache = init_latent_cache(cfg, 2, 8)
    mla_infer(x, p, cfg, cache, 0)
    dc, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert cache.latent.shape[-1] == cache.values_per_token == dc + dr
    a = x @ p["kv_a_proj_with_mqa"].T
    c_kv, _ = core.rmsnorm_forward(a[..., :dc], p["kv_a_layernorm"], LATENT_NORM_EPS)
    k_pe, _ = core.rope_forward(a[..., dc:], np.arange(5), core.rope_inv_freq(dr, cfg.rope_theta))
    np.testing.assert_allclose(cache.c_kv[:, :5], c_kv, **EQ64)
    np.testing.assert_allclose(cache.k_pe[:, :5], k_pe, **EQ64)
    assert not np.allclose(k_pe[:, 1:], a[:, 1:, dc:])      # rotated, and no norm on the rope key
    assert np.all(cache.latent[:, 5:] == 0)                   # rows past the prompt untouched


def test_footprint_is_independent_of_heads():
    for h in (1, 4, 16):
        cfg = tiny(num_attention_heads=h, num_key_value_heads=h)
        assert init_latent_cache(cfg, 1, 3).values_per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@given(case=mla_cases(max_t=4), shift=st.integers(1, 30))
def test_shifting_all_positions_leaves_output_unchanged(case, shift):
    cfg, p, x, pos = case
    pos = pos - pos[0]
    y0, _ = mla_forward(x, p, cfg, pos)
    y1, _ = mla_forward(x, p, cfg, pos + shift)
    np.testing.assert_allclose(y1, y0, rtol=1e-9, atol=1e-11)


def test_positions_matter_within_a_sequence(rng):
    cfg = tiny()
    p, x = mla_params(cfg, rng), rng.standard_normal((1, 4, cfg.hidden_size))
    y0, _ = mla_forward(x, p, cfg, np.arange(4))
    y1, _ = mla_forward(x, p, cfg, np.array([0, 1, 5, 9]))
    assert np.abs(y1 - y0).max() > 1e-3


def test_softmax_scale_matters_only_with_two_or_more_keys(rng):
    """YaRN's m^2 changes outputs when T >= 2; a one-key test cannot see it (reference §2.4)."""
    cfg = tiny()
    cfg_yarn = tiny(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    cfg_m2_off = tiny(rope_scaling=dict(cfg_yarn.rope_scaling, mscale_all_dim=0))
    p = mla_params(cfg, rng)
    x = rng.standard_normal((1, 4, cfg.hidden_size))
    y_on, _ = mla_forward(x, p, cfg_yarn)
    y_off, _ = mla_forward(x, p, cfg_m2_off)          # same frequencies, no m^2
    assert np.abs(y_on[:, 1:] - y_off[:, 1:]).max() > 1e-3
    np.testing.assert_allclose(y_on[:, 0], y_off[:, 0], **EQ64)   # the first token sees one key


def test_float32_matches_float64(rng):
    cfg = tiny()
    p = mla_params(cfg, rng)
    x = rng.standard_normal((2, 6, cfg.hidden_size))
    y64, _ = mla_forward(x, p, cfg)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    y32, c = mla_forward(x.astype(np.float32), p32, cfg)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)
    dx, dp = mla_backward(np.ones_like(y32), c)
    assert dx.dtype == np.float32 and all(g.dtype == np.float32 for g in dp.values())
    cache = init_latent_cache(cfg, 2, 6, dtype=np.float32)
    y_abs = mla_infer(x.astype(np.float32), p32, cfg, cache, 0)
    assert y_abs.dtype == np.float32
    np.testing.assert_allclose(y_abs, y32, **EQ32)


def test_absorbed_weights_are_the_head_major_blocks_of_kv_b_proj(rng):
    cfg = tiny()
    p = init_mla_params(cfg, rng)
    w_uk, w_uv = absorbed_weights(p, cfg)
    dn, dv, dc = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    h = 2
    np.testing.assert_array_equal(w_uk[h], p["kv_b_proj"][h * (dn + dv):h * (dn + dv) + dn])
    np.testing.assert_array_equal(w_uv[h], p["kv_b_proj"][h * (dn + dv) + dn:(h + 1) * (dn + dv)])
    assert w_uv.shape == (cfg.num_attention_heads, dv, dc)


@given(cfg=rst.model_configs(moe=False), rng=rst.seeds())
def test_init_draws_every_param_with_its_shape(cfg, rng):
    p = init_mla_params(cfg, rng, dtype=np.float32)
    assert {k: v.shape for k, v in p.items()} == mla_param_shapes(cfg)
    assert ("q_proj" in p) == (cfg.q_lora_rank is None)
    assert all(v.dtype == np.float32 for v in p.values())


def test_v3_parameter_shapes():
    s = mla_param_shapes(ModelConfig.preset("deepseek-v3"))
    assert s["q_b_proj"] == (24576, 1536) and s["kv_a_proj_with_mqa"] == (576, 7168)
    assert s["kv_b_proj"] == (32768, 512) and s["o_proj"] == (7168, 16384)
    assert "q_proj" in mla_param_shapes(ModelConfig.preset("deepseek-v2-lite"))


# --- bad input --------------------------------------------------------------------------------

def _setup(rng, **changes):
    cfg = tiny(**changes)
    return cfg, init_mla_params(cfg, rng), rng.standard_normal((1, 3, cfg.hidden_size))


def test_head_dims_that_do_not_match_the_weights(rng):
    cfg, p, x = _setup(rng)
    for field in ("qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "num_attention_heads"):
        bad = tiny(**{field: getattr(cfg, field) * 2})
        if field == "num_attention_heads":
            bad = tiny(num_attention_heads=8, num_key_value_heads=8)
        with pytest.raises(ValueError, match=r"params\['"):
            mla_forward(x, p, bad)


def test_odd_rope_dim(rng):
    cfg, p, x = _setup(rng)
    bad = ModelConfig.preset("tiny")
    bad.qk_rope_head_dim = 3                        # bypasses validate(), as a hand-built config might
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        mla_forward(x, p, bad)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        ModelConfig.preset("tiny").replace(qk_rope_head_dim=3)


def test_positions_past_the_configured_maximum(rng):
    cfg, p, x = _setup(rng)
    with pytest.raises(ValueError, match="positions.*max_position_embeddings"):
        mla_forward(x, p, cfg, np.array([0, 1, cfg.max_position_embeddings]))
    with pytest.raises(ValueError, match="positions"):
        mla_forward(x, p, cfg, np.array([-1, 0, 1]))
    with pytest.raises(ValueError, match="positions"):
        mla_forward(x, p, cfg, np.arange(4))
    cache = init_latent_cache(cfg, 1, cfg.max_position_embeddings + 8)
    with pytest.raises(ValueError, match="start_pos.*max_position_embeddings"):
        mla_infer(x, p, cfg, cache, cfg.max_position_embeddings - 1)


def test_wrong_dtypes(rng):
    cfg, p, x = _setup(rng)
    with pytest.raises(TypeError, match="params\\['kv_b_proj'\\]"):
        mla_forward(x, dict(p, kv_b_proj=p["kv_b_proj"].astype(np.float32)), cfg)
    with pytest.raises(TypeError, match="x"):
        mla_forward(x.astype(np.int64), p, cfg)
    with pytest.raises(TypeError, match="positions"):
        mla_forward(x, p, cfg, np.arange(3.0))
    with pytest.raises(TypeError, match="cache.latent"):
        mla_infer(x, p, cfg, init_latent_cache(cfg, 1, 4, dtype=np.float32), 0)
    with pytest.raises(TypeError, match="rng"):
        init_mla_params(cfg, 0)


def test_bad_params_and_cache(rng):
    cfg, p, x = _setup(rng)
    with pytest.raises(ValueError, match="missing 'o_proj'"):
        mla_forward(x, {k: v for k, v in p.items() if k != "o_proj"}, cfg)
    with pytest.raises(ValueError, match="unexpected 'q_proj'"):
        mla_forward(x, dict(p, q_proj=p["q_b_proj"]), cfg)
    with pytest.raises(ValueError, match="x"):
        mla_forward(x[..., :-1], p, cfg)
    with pytest.raises(ValueError, match="start_pos.*capacity"):
        mla_infer(x, p, cfg, init_latent_cache(cfg, 1, 4), 2)
    with pytest.raises(ValueError, match="cache"):
        mla_infer(x, p, cfg, init_latent_cache(tiny(kv_lora_rank=8), 1, 4), 0)
    with pytest.raises(ValueError, match="impl"):
        mla_infer(x, p, cfg, init_latent_cache(cfg, 1, 4), 0, impl="flash")
    with pytest.raises(ValueError, match="model_type"):
        mla_forward(x, p, ModelConfig.preset("deepseek-67b"))
