"""MLA and MHA/GQA against torch autograd (float64). Skipped without torch.

The torch side is written from the equations (DeepSeek-V2 App. C) with torch's own ops
(``scaled_dot_product_attention``, complex-multiply RoPE, ``rms_norm``), so it shares no code path
with refimpl's hand-written backward.
"""

import numpy as np
import pytest
from hypothesis import given

from refimpl import core
from refimpl.attention import mha_backward, mha_forward, mla_backward, mla_forward
from refimpl.testing import tol

from .helpers import mha_cases, mla_cases

torch = pytest.importorskip("torch")
F = torch.nn.functional
TOL = tol("torch64")


def _rope(x, positions, inv_freq, amp):
    """Adjacent pairs as complex numbers times amp * e^{i p theta}; x (..., T, [H,] Dr)."""
    ang = torch.tensor(positions[:, None] * inv_freq)                     # (T, Dr/2)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.full_like(ang, amp), ang)
    if x.dim() == 4:
        rot = rot[:, None]
    return torch.view_as_real(z * rot).flatten(-2)


def torch_mla(x, p, cfg, positions):
    b, t, _ = x.shape
    h, dn, dr, dv, dc = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                         cfg.kv_lora_rank)
    inv, amp = core.rope_inv_freq(dr, cfg.rope_theta, cfg.rope_scaling), core.rope_attention_factor(cfg.rope_scaling)
    if "q_proj" in p:
        q = x @ p["q_proj"].T
    else:
        q = F.rms_norm(x @ p["q_a_proj"].T, (cfg.q_lora_rank,), p["q_a_layernorm"], 1e-6) @ p["q_b_proj"].T
    q = q.view(b, t, h, dn + dr)
    q = torch.cat([q[..., :dn], _rope(q[..., dn:], positions, inv, amp)], -1)
    a = x @ p["kv_a_proj_with_mqa"].T
    c = F.rms_norm(a[..., :dc], (dc,), p["kv_a_layernorm"], 1e-6)
    k_pe = _rope(a[..., dc:], positions, inv, amp)
    kv = (c @ p["kv_b_proj"].T).view(b, t, h, dn + dv)
    k = torch.cat([kv[..., :dn], k_pe[:, :, None].expand(b, t, h, dr)], -1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., dn:].transpose(1, 2),
                                       is_causal=True, scale=core.softmax_scale(dn + dr, cfg.rope_scaling))
    return o.transpose(1, 2).reshape(b, t, h * dv) @ p["o_proj"].T


def torch_mha(x, p, cfg, positions):
    b, t, _ = x.shape
    h, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = p["q_proj"].shape[0] // h
    inv, amp = core.rope_inv_freq(dh, cfg.rope_theta, cfg.rope_scaling), core.rope_attention_factor(cfg.rope_scaling)
    q = _rope((x @ p["q_proj"].T).view(b, t, h, dh), positions, inv, amp).transpose(1, 2)
    k = _rope((x @ p["k_proj"].T).view(b, t, hk, dh), positions, inv, amp).transpose(1, 2)
    v = (x @ p["v_proj"].T).view(b, t, hk, dh).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, t, h * dh) @ p["o_proj"].T


def _compare(torch_fn, fwd, bwd, case, seed=0):
    cfg, p, x, pos = case
    y, cache = fwd(x, p, cfg, pos)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    dx, dp = bwd(dy, cache)
    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    ty = torch_fn(tx, tp, cfg, np.asarray(pos))
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **TOL)
    for k in p:
        np.testing.assert_allclose(dp[k], tp[k].grad.numpy(), **TOL, err_msg=k)


@given(case=mla_cases(max_t=5))
def test_mla_forward_and_gradients_match_torch_autograd(case):
    _compare(torch_mla, mla_forward, mla_backward, case)


@given(case=mha_cases(max_t=5))
def test_mha_gqa_mqa_forward_and_gradients_match_torch_autograd(case):
    _compare(torch_mha, mha_forward, mha_backward, case)
