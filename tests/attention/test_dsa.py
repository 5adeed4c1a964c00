"""DSA (DeepSeek-V3.2): tie rule, dense reduction, causality and cache = full on tied inputs, gradients."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.attention import (
    dsa_backward,
    dsa_forward,
    dsa_indexer_loss,
    dsa_infer,
    init_dsa_cache,
    init_dsa_params,
    init_latent_cache,
    mla_backward,
    mla_forward,
    mla_infer,
    select_topk,
)
from refimpl.attention.dsa import attention_target, split_params
from refimpl.attention.indexer import (
    index_scores,
    indexer_backward,
    indexer_kl_backward,
    indexer_kl_forward,
    indexer_qkw,
    query_latent,
    rope_half_forward,
)
from refimpl.config import ModelConfig
from refimpl.core.rope import rope_forward, rope_inv_freq
from refimpl.testing import check_grad, tol
from refimpl.tree import tree_map

EQ64 = tol("equiv64")
GRAD_TOL = tol("gradcheck")["rtol"]


def dsa_config(hi=2, di=8, topk=3, **changes):
    """The tiny V3 with a small indexer: few heads make exact zero scores (ties) common."""
    extra = {"model_type": "deepseek_v32", "index_n_heads": hi, "index_head_dim": di, "index_topk": topk}
    return ModelConfig.preset("tiny").replace(extra=extra, **changes)


def scaled_params(cfg, rng, scale=4.0):
    p = init_dsa_params(cfg, rng)
    for k in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        p[k] = scale * p[k]
    for k in ("wq_b", "wk", "weights_proj"):
        p["indexer"][k] = 10 * p["indexer"][k]
    p["indexer"]["k_norm"]["bias"] = 0.3 * rng.standard_normal(p["indexer"]["k_norm"]["bias"].shape)
    return p


def boundary_ties(scores, topk):
    """Rows whose k-th and (k+1)-th largest causal scores are exactly equal (the tie rule decides)."""
    b, t, _ = scores.shape
    n = 0
    for i in range(topk, t):
        row = np.sort(scores[:, i, : i + 1], axis=-1)[:, ::-1]         # (B, i+1)
        n += int((row[:, topk - 1] == row[:, topk]).sum())
    return n


def tied_case(seed=0, t=14, b=2, topk=3):
    cfg = dsa_config(topk=topk)
    for s in range(seed, seed + 50):
        rng = np.random.default_rng(s)
        p = scaled_params(cfg, rng)
        x = rng.standard_normal((b, t, cfg.hidden_size))
        _, _, info = dsa_forward(x, p, cfg)
        if boundary_ties(info["scores"], topk) >= 2:
            return cfg, p, x
    raise AssertionError("no tied input found")


@given(data=st.data())
def test_select_topk_is_the_stable_sort_rule(data):
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9))
    extra = data.draw(st.integers(0, 4))
    s, k = t + extra, data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    scores = rng.integers(-2, 3, size=(b, t, s)).astype(np.float64)    # many exact ties
    sel = select_topk(scores, k, q_offset=extra)
    causal = np.arange(s)[None, :] <= extra + np.arange(t)[:, None]
    masked = np.where(causal, scores, -np.inf)
    order = np.argsort(-masked, axis=-1, kind="stable")[..., : min(k, s)]
    ref = np.zeros_like(sel)
    np.put_along_axis(ref, order, True, axis=-1)
    np.testing.assert_array_equal(sel, ref & causal)
    np.testing.assert_array_equal(sel.sum(-1), np.minimum(k, extra + np.arange(t) + 1)[None].repeat(b, 0))


def test_selection_of_a_row_does_not_depend_on_the_row_length():
    scores = np.zeros((1, 1, 10))                                      # every score tied
    for s in range(4, 11):
        sel = select_topk(scores[..., :s], 3, q_offset=s - 1)
        np.testing.assert_array_equal(np.flatnonzero(sel[0, 0]), [0, 1, 2])


@pytest.mark.parametrize("sparse", [True, False])
def test_topk_at_least_t_is_dense_mla_exactly(sparse):
    cfg = dsa_config(topk=14)
    rng = np.random.default_rng(3)
    p = scaled_params(cfg, rng)
    x = rng.standard_normal((2, 14, cfg.hidden_size))
    y, _, _ = dsa_forward(x, p, cfg, sparse=sparse)
    mla_p, _ = split_params(p)
    np.testing.assert_array_equal(y, mla_forward(x, mla_p, cfg)[0])
    for impl in ("naive", "absorb"):
        cache = init_dsa_cache(cfg, 2, 14)
        lat = init_latent_cache(cfg, 2, 14)
        np.testing.assert_array_equal(dsa_infer(x, p, cfg, cache, impl=impl), mla_infer(x, mla_p, cfg, lat, impl=impl))


def test_attended_set_and_early_rows():
    cfg, p, x = tied_case()
    y, cache, info = dsa_forward(x, p, cfg)
    pa = cache.mla.attn.p                                              # (B, H, T, T)
    t = x.shape[1]
    nz = (pa > 0).any(axis=1)                                          # (B, T, T)
    np.testing.assert_array_equal(nz, info["selected"])
    assert np.all(nz.sum(-1) == np.minimum(3, np.arange(t) + 1))
    assert not np.triu(nz, 1).any()
    dense = mla_forward(x, split_params(p)[0], cfg)[0]
    np.testing.assert_array_equal(y[:, :3], dense[:, :3])              # rows with t + 1 <= k are dense
    assert np.abs(y[:, 3:] - dense[:, 3:]).max() > 1e-3


@pytest.mark.parametrize("seed", [0, 7])
def test_prefix_rows_never_change_when_the_sequence_grows_with_ties(seed):
    cfg, p, x = tied_case(seed)
    full = dsa_forward(x, p, cfg)[0]
    for n in range(1, x.shape[1]):
        np.testing.assert_allclose(dsa_forward(x[:, :n], p, cfg)[0], full[:, :n], **EQ64)


def test_perturbing_a_token_changes_no_earlier_row():
    cfg, p, x = tied_case(3)
    full = dsa_forward(x, p, cfg)[0]
    for u in (4, 9):
        x2 = x.copy()
        x2[:, u] += 1.0
        y2 = dsa_forward(x2, p, cfg)[0]
        np.testing.assert_array_equal(y2[:, :u], full[:, :u])


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_decode_equals_full_forward_from_any_prefill_with_ties(impl):
    cfg, p, x = tied_case(1)
    t = x.shape[1]
    full, _, info = dsa_forward(x, p, cfg)
    for t0 in range(1, t):
        cache = init_dsa_cache(cfg, x.shape[0], t)
        out = [dsa_infer(x[:, :t0], p, cfg, cache, 0, impl=impl)]
        for i in range(t0, t):
            y, sel = dsa_infer(x[:, i:i + 1], p, cfg, cache, i, impl=impl, return_selection=True)
            np.testing.assert_array_equal(sel[:, 0], info["selected"][:, i, : i + 1])
            out.append(y)
        np.testing.assert_allclose(np.concatenate(out, axis=1), full, **EQ64)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_chunked_prefill_equals_full_forward(impl):
    cfg, p, x = tied_case(2)
    full = dsa_forward(x, p, cfg)[0]
    cache = init_dsa_cache(cfg, x.shape[0], x.shape[1])
    ys = [dsa_infer(x[:, a:b], p, cfg, cache, a, impl=impl) for a, b in ((0, 4), (4, 9), (9, 14))]
    np.testing.assert_allclose(np.concatenate(ys, axis=1), full, **EQ64)


def test_indexer_score_is_invariant_to_a_position_shift_and_uses_half_split_rope():
    cfg = dsa_config()
    rng = np.random.default_rng(5)
    p = scaled_params(cfg, rng)
    x = rng.standard_normal((1, 6, cfg.hidden_size))
    cq = query_latent(x, split_params(p)[0])
    s0 = index_scores(*indexer_qkw(x, cq, p["indexer"], cfg, np.arange(6)[None])[:3])
    s1 = index_scores(*indexer_qkw(x, cq, p["indexer"], cfg, 11 + np.arange(6)[None])[:3])
    np.testing.assert_allclose(s0, s1, **EQ64)
    v = rng.standard_normal((5, 4))
    inv = rope_inv_freq(4, cfg.rope_theta)
    half = rope_half_forward(v, np.arange(5), inv)[0]
    cos, sin = np.cos(np.arange(5)[:, None] * inv), np.sin(np.arange(5)[:, None] * inv)  # (5, 2)
    ref = np.concatenate([v[:, :2] * cos - v[:, 2:] * sin, v[:, :2] * sin + v[:, 2:] * cos], 1)
    np.testing.assert_allclose(half, ref, **EQ64)
    assert np.abs(half - rope_forward(v, np.arange(5), inv)[0]).max() > 0.1   # not the interleaved layout


@given(seed=st.integers(0, 10**6), topk=st.integers(1, 5), t=st.integers(2, 7))
def test_lm_gradient_under_fixed_selection(seed, topk, t):
    cfg = dsa_config(topk=topk)
    rng = np.random.default_rng(seed)
    p = scaled_params(cfg, rng, scale=2.0)
    x = rng.standard_normal((1, t, cfg.hidden_size))
    _, cache, info = dsa_forward(x, p, cfg)
    allowed = info["selected"]
    mla_p = split_params(p)[0]

    def f(x, mp):
        y, c = mla_forward(x, mp, cfg, allowed=allowed)
        return y, lambda dy: mla_backward(dy, c)
    assert check_grad(f, [x, mla_p], max_entries=10, seed=seed) < GRAD_TOL
    dy = rng.standard_normal(x.shape)
    dx, g = dsa_backward(dy, cache)
    dx2, g2 = mla_backward(dy, cache.mla)
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(g["q_b_proj"], g2["q_b_proj"])
    ig = g["indexer"]
    assert all(np.all(ig[k] == 0) for k in ("wq_b", "wk", "weights_proj")) and not ig["k_norm"]["bias"].any()


def test_float32_matches_float64_when_the_selection_agrees():
    cfg, p, x = tied_case(6)
    y64, _, i64 = dsa_forward(x, p, cfg)
    p32 = tree_map(lambda a: a.astype(np.float32), p)
    y32, _, i32 = dsa_forward(x.astype(np.float32), p32, cfg)
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(i32["selected"], i64["selected"])
    np.testing.assert_allclose(y32, y64, rtol=1e-3, atol=1e-4)   # float32 through ~10 products and 3 norms


@given(seed=st.integers(0, 10**6), sparse=st.booleans())
def test_indexer_gradient_matches_finite_differences(seed, sparse):
    cfg = dsa_config(topk=3)
    rng = np.random.default_rng(seed)
    p = scaled_params(cfg, rng, scale=2.0)
    x = rng.standard_normal((2, 6, cfg.hidden_size))
    _, cache, _ = dsa_forward(x, p, cfg, sparse=sparse)
    target, support = attention_target(cache), cache.allowed
    cq = query_latent(x, split_params(p)[0])
    pos = np.broadcast_to(np.arange(6), (2, 6))

    def f(ip):
        q, k, w, ic = indexer_qkw(x, cq, ip, cfg, pos)
        loss, c = indexer_kl_forward(index_scores(q, k, w), target, support)
        return loss, lambda d: (indexer_backward(indexer_kl_backward(d, c), ic),)
    assert check_grad(f, [p["indexer"]], max_entries=20, seed=seed) < GRAD_TOL
    loss, g = dsa_indexer_loss(cache)
    loss2, vjp = f(p["indexer"])
    assert loss == pytest.approx(float(loss2), rel=1e-12) and loss >= 0
    np.testing.assert_allclose(g["wq_b"], vjp(1.0)[0]["wq_b"], **EQ64)


def test_kl_loss_is_zero_at_the_target_and_its_gradient_rows_sum_to_zero():
    rng = np.random.default_rng(0)
    allowed = select_topk(rng.standard_normal((2, 5, 5)), 3)
    s = rng.standard_normal((2, 5, 5))
    pi = np.where(allowed, np.exp(s), 0.0)
    pi /= pi.sum(-1, keepdims=True)
    loss, c = indexer_kl_forward(s, pi, allowed)
    assert abs(loss) < 1e-14
    target = np.where(allowed, rng.random((2, 5, 5)), 0.0)
    target /= target.sum(-1, keepdims=True)
    loss, c = indexer_kl_forward(s, target, allowed)
    g = indexer_kl_backward(1.0, c)
    assert loss > 0
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-15)
    assert np.all(g[~allowed] == 0)


def test_errors_name_the_argument():
    cfg = dsa_config()
    p = init_dsa_params(cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="params"):
        dsa_forward(np.zeros((1, 2, 32)), split_params(p)[0], cfg)
    with pytest.raises(ValueError, match="q_lora_rank"):
        init_dsa_params(dsa_config(q_lora_rank=None), np.random.default_rng(0))
    with pytest.raises(ValueError, match="index_head_dim"):
        init_dsa_params(dsa_config(di=4), np.random.default_rng(0))
    with pytest.raises(ValueError, match="start_pos"):
        dsa_infer(np.zeros((1, 2, 32)), p, cfg, init_dsa_cache(cfg, 1, 4), 3)
