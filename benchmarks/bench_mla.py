"""MLA decode and prefill: absorbed vs naive MLA vs MHA, refimpl-NumPy vs torch.

Decode (``mla/decode-*``): one new token against a cache of S = 1k, 4k or 16k earlier tokens,
batch 1, float32, one layer with DeepSeek-V2-Lite's attention shapes (D = 2048, H = 16, no query
compression, Dc = 512, Dr = 64, Dn = Dv = 128). Variants:

* ``refimpl-numpy``: :func:`~refimpl.attention.mla_infer` with ``impl="absorb"`` (latent cache,
  576 values per token);
* ``refimpl-numpy-naive``: the same cache, K and V decompressed with ``kv_b_proj`` every step;
* ``torch``: the absorbed computation written with torch ops on the same weights and cache;
* ``refimpl-numpy-mha`` / ``torch-mha``: MHA decode with the same 16 heads (Dh = 128) over a
  per-head cache of 2 x 16 x 128 = 4096 values per token (a different function: it is checked
  against its own torch twin, not against MLA).

The cache rows are random (post-norm-like latents), the new token writes row S each call.
Prefill (``mla/prefill-fwd+bwd``): :func:`~refimpl.attention.mla_forward` +
:func:`~refimpl.attention.mla_backward` vs the same naive-MLA computation in torch autograd.
No Numba variant: a fused one-pass Numba kernel for the absorbed decode attention (online softmax,
vectorised across the 16 heads, fastmath off) was tried and was 10-20x slower than NumPy's two BLAS
products at S = 1k and 4k, so it was not kept.
"""

from __future__ import annotations

import numpy as np

from refimpl import core
from refimpl.attention import (
    init_kv_cache,
    init_latent_cache,
    init_mha_params,
    init_mla_params,
    kv_cache_elements_per_token,
    mha_infer,
    mla_backward,
    mla_forward,
    mla_infer,
)
from refimpl.config import ModelConfig

from .harness import NUMPY, TORCH, Case, assert_outputs_close, import_torch, register

NAIVE, MHA, TORCH_MHA = "refimpl-numpy-naive", "refimpl-numpy-mha", "torch-mha"


def _configs(quick):
    lite = ModelConfig.preset("deepseek-v2-lite")
    if quick:
        lite = lite.replace(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
                            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    mha = ModelConfig.from_dict({**lite.to_dict(), "model_type": "llama"})
    return lite, mha


def _torch_rope(torch, x, pos, inv_freq, amp):
    """Adjacent-pair rotation (DeepSeek's layout) via complex multiply; x (..., Dr)."""
    ang = torch.tensor(np.asarray(pos, dtype=np.float64)[:, None] * inv_freq, dtype=torch.float32)
    rot = torch.polar(torch.full_like(ang, amp), ang)                   # (T, Dr/2)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * (rot[:, None] if x.dim() == 4 else rot)).flatten(-2)


def _torch_mla_decode(torch, cfg, p, latent, s):
    """Absorbed MLA decode of one token (B = 1) in torch; writes row s of ``latent``."""
    h, dn, dr, dc = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    inv = core.rope_inv_freq(dr, cfg.rope_theta, cfg.rope_scaling)
    amp = core.rope_attention_factor(cfg.rope_scaling)
    scale = core.softmax_scale(dn + dr, cfg.rope_scaling)
    w_kvb = p["kv_b_proj"].view(h, -1, dc)
    w_uk, w_uv = w_kvb[:, :dn], w_kvb[:, dn:]

    def step(x):
        with torch.no_grad():
            q = (x @ p["q_proj"].T).view(1, 1, h, dn + dr)
            q_pe = _torch_rope(torch, q[..., dn:], [s], inv, amp)
            a = x @ p["kv_a_proj_with_mqa"].T
            latent[:, s, :dc] = torch.nn.functional.rms_norm(a[..., :dc], (dc,), p["kv_a_layernorm"], 1e-6)[:, 0]
            latent[:, s, dc:] = _torch_rope(torch, a[..., dc:], [s], inv, amp)[:, 0]
            q_abs = torch.einsum("bthd,hdc->bthc", q[..., :dn], w_uk)
            qc = torch.cat([q_abs, q_pe], -1)[:, 0]                     # (1, H, Dc+Dr)
            lat = latent[:, :s + 1]                                     # (1, S+1, Dc+Dr)
            prob = torch.softmax((qc @ lat.transpose(1, 2)) * scale, -1)
            o = torch.einsum("bhc,hvc->bhv", prob @ lat[..., :dc], w_uv)
            return o.reshape(1, 1, -1) @ p["o_proj"].T
    return step


def _torch_mha_decode(torch, cfg, p, k_cache, v_cache, s):
    h, dh = cfg.num_attention_heads, p["q_proj"].shape[0] // cfg.num_attention_heads
    inv = core.rope_inv_freq(dh, cfg.rope_theta, cfg.rope_scaling)

    def step(x):
        with torch.no_grad():
            q = _torch_rope(torch, (x @ p["q_proj"].T).view(1, 1, h, dh), [s], inv, 1.0)
            k = _torch_rope(torch, (x @ p["k_proj"].T).view(1, 1, h, dh), [s], inv, 1.0)
            k_cache[:, :, s] = k[:, 0]
            v_cache[:, :, s] = (x @ p["v_proj"].T).view(1, h, dh)
            prob = torch.softmax((q[:, 0, :, None] @ k_cache[:, :, :s + 1].transpose(2, 3)) * dh ** -0.5, -1)
            return (prob @ v_cache[:, :, :s + 1]).reshape(1, 1, -1) @ p["o_proj"].T
    return step


def _decode_case(context, quick):
    # names say short / medium / long, not a size: the quick page runs each at 1/16 of its context
    s = context // 16 if quick else context
    cfg, mcfg = _configs(quick)
    rng = np.random.default_rng(0)
    p = init_mla_params(cfg, rng, dtype=np.float32)
    p["kv_a_layernorm"] = (1 + 0.1 * rng.standard_normal(cfg.kv_lora_rank)).astype(np.float32)
    dh = cfg.v_head_dim
    pm = init_mha_params(mcfg, rng, head_dim=dh, dtype=np.float32)
    x = rng.standard_normal((1, 1, cfg.hidden_size), dtype=np.float32)
    cache = init_latent_cache(cfg, 1, s + 1, dtype=np.float32)
    cache.latent[:, :s] = rng.standard_normal((1, s, cache.latent.shape[-1]), dtype=np.float32)
    kv = init_kv_cache(mcfg, 1, s + 1, head_dim=dh, dtype=np.float32)
    kv.k[:, :, :s] = rng.standard_normal(kv.k[:, :, :s].shape, dtype=np.float32)
    kv.v[:, :, :s] = rng.standard_normal(kv.v[:, :, :s].shape, dtype=np.float32)
    mla_vals = kv_cache_elements_per_token(cfg, "mla", per_layer=True)
    mha_vals = kv.values_per_token
    case = Case(
        params={"context": s, "B": 1, "D": cfg.hidden_size, "H": cfg.num_attention_heads, "dtype": "float32",
                "mla_cache_bytes_per_token": 4 * mla_vals, "mha_cache_bytes_per_token": 4 * mha_vals,
                "cache_ratio_mha_over_mla": round(mha_vals / mla_vals, 2)},
        description=(f"One decode step at context {s}, V2-Lite attention shapes (one layer, float32): "
                     "refimpl-numpy = absorbed MLA on the latent cache, refimpl-numpy-naive = K/V "
                     "decompressed from the latent cache, torch = absorbed MLA in torch; "
                     "*-mha = MHA with the same heads on a per-head cache (checked against each other)."))
    case.add(NUMPY, lambda: mla_infer(x, p, cfg, cache, s, impl="absorb"))
    case.add(NAIVE, lambda: mla_infer(x, p, cfg, cache, s, impl="naive"), kind="numpy")
    case.add(MHA, lambda: mha_infer(x, pm, mcfg, kv, s), kind="numpy")
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
        case.skip(TORCH_MHA, "torch is not installed")
    else:
        tp = {k: torch.from_numpy(v) for k, v in p.items()}
        tpm = {k: torch.from_numpy(v) for k, v in pm.items()}
        xt = torch.from_numpy(x)
        mla_step = _torch_mla_decode(torch, cfg, tp, torch.from_numpy(cache.latent.copy()), s)
        mha_step = _torch_mha_decode(torch, mcfg, tpm, torch.from_numpy(kv.k.copy()),
                                     torch.from_numpy(kv.v.copy()), s)
        case.add(TORCH, lambda: mla_step(xt))
        case.add(TORCH_MHA, lambda: mha_step(xt), kind="torch")

    def check(outs):
        # float32 throughout; absorbed vs naive is a reassociation (the "equiv32" tolerance).
        assert_outputs_close({k: v for k, v in outs.items() if k in (NUMPY, NAIVE, TORCH)},
                             reference=NUMPY, rtol=2e-4, atol_scale=2e-5)
        assert_outputs_close({k: v for k, v in outs.items() if k in (MHA, TORCH_MHA)},
                             reference=MHA, rtol=2e-4, atol_scale=2e-5)
    case.check = check
    return case


@register("mla/decode-short")
def decode_1k(quick: bool) -> Case:
    return _decode_case(1024, quick)


@register("mla/decode-medium")
def decode_4k(quick: bool) -> Case:
    return _decode_case(4096, quick)


@register("mla/decode-long")
def decode_16k(quick: bool) -> Case:
    return _decode_case(16384, quick)


def _torch_mla_train(torch, cfg, x, p, dy):
    """Naive MLA forward (decompressed K/V, causal) + autograd backward, as in mla_forward."""
    F = torch.nn.functional
    b, t, _ = x.shape
    h, dn, dr, dv, dc = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                         cfg.kv_lora_rank)
    inv = core.rope_inv_freq(dr, cfg.rope_theta, cfg.rope_scaling)
    amp = core.rope_attention_factor(cfg.rope_scaling)
    pos = np.arange(t)
    scale = core.softmax_scale(dn + dr, cfg.rope_scaling)
    leaves = [x, *p.values()]

    def fn():
        q = (x @ p["q_proj"].T).view(b, t, h, dn + dr)
        q = torch.cat([q[..., :dn], _torch_rope(torch, q[..., dn:], pos, inv, amp)], -1)
        a = x @ p["kv_a_proj_with_mqa"].T
        c = F.rms_norm(a[..., :dc], (dc,), p["kv_a_layernorm"], 1e-6)
        k_pe = _torch_rope(torch, a[..., dc:], pos, inv, amp)
        kv = (c @ p["kv_b_proj"].T).view(b, t, h, dn + dv)
        k = torch.cat([kv[..., :dn], k_pe[:, :, None].expand(b, t, h, dr)], -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., dn:].transpose(1, 2),
                                           is_causal=True, scale=scale)
        y = o.transpose(1, 2).reshape(b, t, h * dv) @ p["o_proj"].T
        return (y.detach(), *torch.autograd.grad(y, leaves, dy))
    return fn


@register("mla/prefill-fwd+bwd")
def prefill(quick: bool) -> Case:
    cfg, _ = _configs(quick)
    b, t = (1, 64) if quick else (2, 1024)
    rng = np.random.default_rng(0)
    p = init_mla_params(cfg, rng, dtype=np.float32)
    x = rng.standard_normal((b, t, cfg.hidden_size), dtype=np.float32)
    dy = rng.standard_normal((b, t, cfg.hidden_size), dtype=np.float32)
    h, dn, dr, dv, dc, d = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                            cfg.kv_lora_rank, cfg.hidden_size)
    proj = d * h * (dn + dr) + d * (dc + dr) + dc * h * (dn + dv) + h * dv * d   # multiply-adds per token
    attn = t * h * (dn + dr + dv)                                                # per query, full T x T
    case = Case(params={"B": b, "T": t, "D": d, "H": h, "dtype": "float32"},
                flops=3 * 2.0 * b * t * (proj + attn),
                description="MLA training step on one layer: mla_forward + mla_backward (naive, decompressed "
                            "K/V, causal) vs torch autograd of the same computation (torch uses "
                            "scaled_dot_product_attention); V2-Lite attention shapes, float32. FLOPs count the "
                            "full T x T score matrix and backward = 2 x forward.")

    def numpy_fn():
        y, c = mla_forward(x, p, cfg)
        dx, dp = mla_backward(dy, c)
        return (y, dx, *dp.values())
    case.add(NUMPY, numpy_fn)
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        tp = {k: torch.from_numpy(v).requires_grad_(True) for k, v in p.items()}
        case.add(TORCH, _torch_mla_train(torch, cfg, torch.from_numpy(x).requires_grad_(True), tp,
                                         torch.from_numpy(dy)))
    case.check = lambda outs: assert_outputs_close(outs, rtol=1e-3, atol_scale=1e-4,
                                                   labels=("y", "dx", *p.keys()))
    return case
