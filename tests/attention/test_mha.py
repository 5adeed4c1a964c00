"""MHA / GQA / MQA baselines and the shared attention core: gradients, equivalences, errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import core
from refimpl.attention import (
    causal_mask,
    init_kv_cache,
    init_mha_params,
    mha_backward,
    mha_forward,
    mha_infer,
    sdpa_backward,
    sdpa_forward,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import mha_cases, mha_config

EQ64 = tol("equiv64")
GRAD_TOL = tol("gradcheck")["rtol"]


def _per_head_reference(q, k, v, scale, q_offset=0):
    """Loop over batch and heads with query head h reading KV head h // (H / Hk)."""
    b, t, h, _ = q.shape
    g = h // k.shape[2]
    o = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            s = scale * q[bi, :, hi] @ k[bi, :, hi // g].T
            s = np.where(causal_mask(t, k.shape[1], q_offset), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            o[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // g]
    return o


@st.composite
def qkv(draw):
    rng = draw(rst.seeds())
    b, t, hk = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    h = hk * draw(st.integers(1, 3))
    extra = draw(st.integers(0, 3))
    dk, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    s = t + extra
    return (rng.standard_normal((b, t, h, dk)), rng.standard_normal((b, s, hk, dk)),
            rng.standard_normal((b, s, hk, dv)), extra)


@given(args=qkv())
def test_sdpa_matches_per_head_loop(args):
    q, k, v, off = args
    o, _ = sdpa_forward(q, k, v, 0.7, q_offset=off)
    np.testing.assert_allclose(o, _per_head_reference(q, k, v, 0.7, off), **EQ64)


@given(args=qkv())
def test_sdpa_gradients(args):
    q, k, v, off = args
    def f(q, k, v):
        o, c = sdpa_forward(q, k, v, 0.7, q_offset=off)
        return o, lambda do: sdpa_backward(do, c)
    assert check_grad(f, [q, k, v], max_entries=20) < GRAD_TOL


@given(case=mha_cases())
def test_mha_gradients_every_param_and_input(case):
    cfg, p, x, pos = case
    def f(x, p):
        y, c = mha_forward(x, p, cfg, pos)
        return y, lambda dy: mha_backward(dy, c)
    err, details = check_grad(f, [x, p], max_entries=12, return_details=True)
    assert err < GRAD_TOL, details
    assert len(details) == 5


@given(rng=rst.seeds(), hk=st.sampled_from([1, 2]), g=st.sampled_from([2, 3]))
def test_gqa_equals_mha_with_repeated_kv_heads(rng, hk, g):
    """GQA with Hk groups == MHA whose k/v heads repeat each group's head (transformers' repeat_kv);
    MQA is Hk = 1. With Hk = H (as many groups as heads) GQA is MHA itself."""
    h, dh = hk * g, 4
    gqa = mha_config(h=h, hk=hk, dh=dh)
    p = init_mha_params(gqa, rng)
    x = rng.standard_normal((2, 5, gqa.hidden_size))
    rep = {k: np.repeat(p[k].reshape(hk, dh, -1), g, axis=0).reshape(h * dh, -1) for k in ("k_proj", "v_proj")}
    mha = mha_config(h=h, hk=h, dh=dh)
    y_gqa, _ = mha_forward(x, p, gqa)
    y_mha, _ = mha_forward(x, dict(p, **rep), mha)
    np.testing.assert_allclose(y_gqa, y_mha, **EQ64)


def test_mha_matches_explicit_per_head_computation(rng):
    cfg = mha_config(h=3, hk=3, dh=4)
    p = init_mha_params(cfg, rng)
    x = rng.standard_normal((2, 5, cfg.hidden_size))
    inv = core.rope_inv_freq(4, cfg.rope_theta)
    q = core.rope_forward((x @ p["q_proj"].T).reshape(2, 5, 3, 4), np.arange(5)[:, None], inv)[0]
    k = core.rope_forward((x @ p["k_proj"].T).reshape(2, 5, 3, 4), np.arange(5)[:, None], inv)[0]
    v = (x @ p["v_proj"].T).reshape(2, 5, 3, 4)
    o = _per_head_reference(q, k, v, 0.5)
    np.testing.assert_allclose(mha_forward(x, p, cfg)[0], o.reshape(2, 5, 12) @ p["o_proj"].T, **EQ64)


@given(case=mha_cases(max_t=6), data=st.data())
def test_chunked_prefill_and_decode_equal_full(case, data):
    cfg, p, x, _ = case
    b, t, _ = x.shape
    y, _ = mha_forward(x, p, cfg)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, t - 1), max_size=3)) if t > 1 else []))
    bounds = [0, *cuts, t]
    cache = init_kv_cache(cfg, b, t + 1, head_dim=p["q_proj"].shape[0] // cfg.num_attention_heads)
    ys = [mha_infer(x[:, s:e], p, cfg, cache, s) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y, **EQ64)


@given(case=mha_cases(), shift=st.integers(1, 40))
def test_position_shift_invariance(case, shift):
    cfg, p, x, pos = case
    pos = pos - pos[0]
    np.testing.assert_allclose(mha_forward(x, p, cfg, pos + shift)[0], mha_forward(x, p, cfg, pos)[0],
                               rtol=1e-9, atol=1e-11)


def test_bad_input(rng):
    cfg = mha_config(h=4, hk=2, dh=4)
    p = init_mha_params(cfg, rng)
    x = rng.standard_normal((1, 3, cfg.hidden_size))
    with pytest.raises(ValueError, match=r"params\['k_proj'\]"):
        mha_forward(x, p, mha_config(h=4, hk=4, dh=4))
    with pytest.raises(ValueError, match="odd"):
        mha_forward(x, init_mha_params(cfg, rng, head_dim=3), cfg)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        mha_forward(x, p, _bad_hk())
    with pytest.raises(ValueError, match="positions"):
        mha_forward(x, p, cfg, np.array([0, 1, 64]))
    with pytest.raises(TypeError, match="params\\['o_proj'\\]"):
        mha_forward(x, dict(p, o_proj=p["o_proj"].astype(np.float32)), cfg)
    with pytest.raises(ValueError, match="k"):
        sdpa_forward(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)), 1.0)
    with pytest.raises(ValueError, match="q_offset"):
        sdpa_forward(np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)), 1.0, q_offset=1)
    with pytest.raises(ValueError, match="start_pos"):
        mha_infer(x, p, cfg, init_kv_cache(cfg, 1, 4), -1)


def _bad_hk():
    bad = mha_config(h=4, hk=2)
    bad.num_key_value_heads = 3                    # bypasses validate(), as a hand-built config might
    return bad
