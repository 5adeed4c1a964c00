r"""Multi-head latent attention (MLA), as DeepSeek-V2 and V3 compute it.

MLA (DeepSeek-V2 §2.1.2-2.1.3, App. C; DeepSeek-V3 §2.1.1 eqs. 1-11) compresses each token's
keys and values into one small latent :math:`c^{KV}_t = W^{DKV} h_t` of ``kv_lora_rank`` values
(512 in V2/V3). Every head's key and value are linear read-outs of that latent,
:math:`k^C = W^{UK} c^{KV}` and :math:`v^C = W^{UV} c^{KV}`, so a decoder only has to cache the
latent. RoPE cannot live inside that low-rank key, because a position-dependent rotation between
:math:`W^{UK}` and the query would stop :math:`W^{UK}` from being folded into the query; MLA
therefore adds a *decoupled* rope key :math:`k^R_t = \mathrm{RoPE}(W^{KR} h_t)` of
``qk_rope_head_dim`` values (64), shared by all heads, and a matching per-head rope query. The
cache is :math:`[c^{KV}_t ; k^R_t]`: 576 values per token per layer for any head count.

Layout and semantics follow the released weights, DeepSeek's inference code and transformers
(DeepseekV3Attention): parameters carry the HF checkpoint names, RMSNorms (fixed eps 1e-6) sit on
the query latent and on the KV latent only, ``kv_b_proj`` viewed as ``[H, Dn + Dv, Dc]`` holds
:math:`W^{UK}_h` in rows ``:Dn`` and :math:`W^{UV}_h` in rows ``Dn:``, RoPE rotates adjacent pairs,
and with YaRN the logit scale is :math:`D_{qk}^{-1/2} m^2` on the whole logit
(:func:`~refimpl.core.softmax_scale`, ``mscale_all_dim`` as transformers reads it; DeepSeek's code
reads ``mscale``) with cos/sin scaled by :func:`~refimpl.core.rope_attention_factor`.

:func:`mla_forward` / :func:`mla_backward` are the training pair (keys and values decompressed).
:func:`mla_infer` runs prefill, chunked prefill and decode against a :class:`LatentKVCache`,
either ``impl="naive"`` (decompress K and V from the latent) or ``impl="absorb"`` (fold
:math:`W^{UK}` into the query and :math:`W^{UV}` into the output; DeepSeek's default).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_same_dtype
from ..config import check_config
from ..core.linear import linear_backward, linear_forward
from ..core.rmsnorm import rmsnorm_backward, rmsnorm_forward
from ..core.rope import rope_attention_factor, rope_backward, rope_forward, rope_inv_freq, softmax_scale
from .kv_cache import LatentKVCache, check_positions, uses_mla
from .mha import attend, check_start_pos, check_weight, project, sdpa_backward, sdpa_forward

#: The latent RMSNorms (``q_a_layernorm``, ``kv_a_layernorm``) use this eps in DeepSeek's code and
#: transformers, whatever ``rms_norm_eps`` says; only the block norms read ``rms_norm_eps``.
LATENT_NORM_EPS = 1e-6
IMPLS = ("naive", "absorb")


def mla_param_shapes(config):
    """Weight shapes ``[out, in]`` by HF checkpoint name (DeepSeek-V2 App. C; reference table §2.1)."""
    d, h, dc, dr = config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    dqk, dn, dv, dq = config.qk_head_dim, config.qk_nope_head_dim, config.v_head_dim, config.q_lora_rank
    shapes = ({"q_a_proj": (dq, d), "q_a_layernorm": (dq,), "q_b_proj": (h * dqk, dq)} if dq
              else {"q_proj": (h * dqk, d)})
    shapes.update(kv_a_proj_with_mqa=(dc + dr, d), kv_a_layernorm=(dc,), kv_b_proj=(h * (dn + dv), dc),
                  o_proj=(d, h * dv))
    return shapes


def init_mla_params(config, rng, dtype=np.float64):
    """Weights ~ N(0, ``initializer_range``) and unit norm gains (transformers' ``_init_weights``).

    DeepSeek-V2/V3 train with std 0.006 (V2 §3.1.2, V3 §4.2), the presets' ``initializer_range``.
    """
    _check_config(config)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    std = config.initializer_range
    return {k: np.ones(s, dtype=dtype) if k.endswith("layernorm") else (std * rng.standard_normal(s)).astype(dtype)
            for k, s in mla_param_shapes(config).items()}


def _check_config(config):
    check_config(config)
    if not uses_mla(config):
        raise ValueError(f"config: model_type {config.extra.get('model_type')!r} uses standard attention, "
                         "not MLA (use refimpl.attention.mha_forward)")
    dr = config.qk_rope_head_dim
    if not (isinstance(dr, int) and dr > 0 and dr % 2 == 0):
        raise ValueError(f"config.qk_rope_head_dim: expected a positive even integer (RoPE rotates pairs), "
                         f"got {dr!r}")
    for name in ("kv_lora_rank", "v_head_dim", "num_attention_heads"):
        if not getattr(config, name) > 0:
            raise ValueError(f"config.{name}: expected a positive integer, got {getattr(config, name)!r}")


def _check_mla(x, params, config, scan=True):
    _check_config(config)
    check_float("x", x, ndim=3)
    if x.shape[-1] != config.hidden_size:
        raise ValueError(f"x: expected last axis hidden_size={config.hidden_size}, got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x: expected shape (B, T, D) with B >= 1 and T >= 1, got {x.shape}")
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of MLA weights, got {type(params).__name__}")
    shapes = mla_param_shapes(config)
    for name in params:
        if name not in shapes:
            raise ValueError(f"params: unexpected '{name}' for this config (expected keys {sorted(shapes)}; "
                             f"q_lora_rank={config.q_lora_rank})")
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"params: missing '{name}' (expected keys {sorted(shapes)})")
        check_weight(f"params['{name}']", params[name], x, len(shape), scan)
        if params[name].shape != shape:
            raise ValueError(f"params['{name}']: expected shape {shape} from the config's head dims, "
                             f"got {params[name].shape}")


def _queries(x, params, config, positions, lin=linear_forward):
    """q_nope (B, T, H, Dn), rotated q_pe (B, T, H, Dr) and their caches (DeepSeek-V2 eqs. 37-40)."""
    b, t, _ = x.shape
    h, dn, dr = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    inv_freq, amp = rope_inv_freq(dr, config.rope_theta, config.rope_scaling), rope_attention_factor(
        config.rope_scaling)
    if config.q_lora_rank:
        cq, c_qa = lin(x, params["q_a_proj"])                           # (B, T, Dq)
        cq, c_qn = rmsnorm_forward(cq, params["q_a_layernorm"], LATENT_NORM_EPS)  # (B, T, Dq)
        q, c_qb = lin(cq, params["q_b_proj"])                           # (B, T, H*(Dn+Dr))
    else:
        c_qa = c_qn = None
        q, c_qb = lin(x, params["q_proj"])                              # (B, T, H*(Dn+Dr))
    q = q.reshape(b, t, h, dn + dr)                                     # (B, T, H, Dn+Dr)
    q_pe, c_qr = rope_forward(q[..., dn:], positions[..., None], inv_freq, amp)  # (B, T, H, Dr)
    return q[..., :dn], q_pe, (c_qa, c_qn, c_qb, c_qr)


def _latents(x, params, config, positions, lin=linear_forward):
    """Post-norm latent c_kv (B, T, Dc), rotated shared key k_pe (B, T, Dr) (eqs. 41-43)."""
    dc, dr = config.kv_lora_rank, config.qk_rope_head_dim
    inv_freq, amp = rope_inv_freq(dr, config.rope_theta, config.rope_scaling), rope_attention_factor(
        config.rope_scaling)
    a, c_kva = lin(x, params["kv_a_proj_with_mqa"])                     # (B, T, Dc+Dr)
    c_kv, c_kvn = rmsnorm_forward(a[..., :dc], params["kv_a_layernorm"], LATENT_NORM_EPS)  # (B, T, Dc)
    k_pe, c_kr = rope_forward(a[..., dc:], positions, inv_freq, amp)    # (B, T, Dr)
    return c_kv, k_pe, (c_kva, c_kvn, c_kr)


def absorbed_weights(params, config):
    r"""Views :math:`W^{UK}` (H, Dn, Dc) and :math:`W^{UV}` (H, Dv, Dc) of ``kv_b_proj`` (head-major rows)."""
    h, dn, dc = config.num_attention_heads, config.qk_nope_head_dim, config.kv_lora_rank
    w = params["kv_b_proj"].reshape(h, -1, dc)                          # (H, Dn+Dv, Dc)
    return w[:, :dn], w[:, dn:]


def _per_head(x, w):
    """out[b, t, h] = x[b, t, h] @ w[h]. Shapes: x (B, T, H, a), w (H, a, c) -> (B, T, H, c)."""
    b, t, h, a = x.shape
    y = x.transpose(2, 0, 1, 3).reshape(h, b * t, a) @ w                # (H, B*T, c)
    return y.reshape(h, b, t, -1).transpose(1, 2, 0, 3)                 # (B, T, H, c)


class MLACache(NamedTuple):
    q_a: object        # LinearCache of q_a_proj (None without query compression)
    q_norm: object     # RMSNormCache of q_a_layernorm (None without query compression)
    q_b: object        # LinearCache of q_b_proj, or of q_proj
    q_rope: object     # RopeCache of the rope query
    kv_a: object       # LinearCache of kv_a_proj_with_mqa
    kv_norm: object    # RMSNormCache of kv_a_layernorm
    k_rope: object     # RopeCache of the shared rope key
    kv_b: object       # LinearCache of kv_b_proj
    attn: object       # SDPACache
    o: object          # LinearCache of o_proj
    dims: tuple        # (B, T, H, Dn, Dr, Dv, Dc)
    keys: tuple        # the params' keys, in their order (gradients come back in it)


def mla_forward(x, params, config, positions=None, *, allowed=None):
    r"""MLA training forward with decompressed keys and values (DeepSeek-V2 App. C, eqs. 37-47).

    .. math::
        c^Q &= \mathrm{RMSNorm}(W^{DQ} h),\quad [q^C; q^R_0] = W^{UQ} c^Q \ \ (\text{or } W^Q h),\quad
        q^R = \mathrm{RoPE}(q^R_0) \\
        [c'; k^R_0] &= W^{DKV}_{+KR} h,\quad c^{KV} = \mathrm{RMSNorm}(c'),\quad k^R = \mathrm{RoPE}(k^R_0),
        \quad [k^C; v] = W^{UKV} c^{KV} \\
        o_{t,h} &= \textstyle\sum_{j\le t} \mathrm{softmax}_j\bigl(s\,(q^C_{t,h}\cdot k^C_{j,h}
        + q^R_{t,h}\cdot k^R_j)\bigr)\, v_{j,h},\qquad y_t = W^O [o_{t,1}; \dots; o_{t,H}]

    with :math:`s` = :func:`~refimpl.core.softmax_scale`. The rope key :math:`k^R_j` is shared by
    all heads. ``positions`` feed RoPE only; the mask is causal over sequence index, intersected
    with ``allowed`` (B, T, T) bool if given (DSA's selected keys, :func:`refimpl.attention.dsa_forward`).

    Shapes: x (B, T, D), positions (T,) or (B, T) int64 (default arange(T)) -> y (B, T, D).
    """
    _check_mla(x, params, config)
    b, t, _ = x.shape
    h, dn, dr, dv, dc = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                         config.v_head_dim, config.kv_lora_rank)
    positions = check_positions(positions, b, t, config.max_position_embeddings)  # (B, T)
    q_nope, q_pe, (c_qa, c_qn, c_qb, c_qr) = _queries(x, params, config, positions)
    c_kv, k_pe, (c_kva, c_kvn, c_kr) = _latents(x, params, config, positions)
    kv, c_kvb = linear_forward(c_kv, params["kv_b_proj"])               # (B, T, H*(Dn+Dv))
    kv = kv.reshape(b, t, h, dn + dv)                                   # (B, T, H, Dn+Dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(k_pe[:, :, None], (b, t, h, dr))], axis=-1)  # (B, T, H, Dn+Dr)
    q = np.concatenate([q_nope, q_pe], axis=-1)                         # (B, T, H, Dn+Dr)
    o, c_at = sdpa_forward(q, k, kv[..., dn:], softmax_scale(dn + dr, config.rope_scaling),
                           allowed=allowed)                             # (B, T, H, Dv)
    y, c_o = linear_forward(o.reshape(b, t, h * dv), params["o_proj"])  # (B, T, D)
    return y, MLACache(c_qa, c_qn, c_qb, c_qr, c_kva, c_kvn, c_kr, c_kvb, c_at, c_o, (b, t, h, dn, dr, dv, dc),
                     tuple(params))


def mla_backward(dy, cache):
    """Gradients of :func:`mla_forward`: ``dx`` (B, T, D) and a dict with the params' keys."""
    b, t, h, dn, dr, dv, dc = cache.dims
    grads = {}
    # forward: y = o_proj(o.reshape(B, T, H*Dv))
    do, grads["o_proj"], _ = linear_backward(dy, cache.o)               # (B, T, H*Dv)
    # forward: o = attention(q, k, v, scale)
    dq, dk, dvalue = sdpa_backward(do.reshape(b, t, h, dv), cache.attn) # (B, T, H, Dn+Dr), .., (B, T, H, Dv)
    # forward: k = [k_nope ; k_pe broadcast over heads]   so: dk_pe sums over heads
    dk_pe = dk[..., dn:].sum(axis=2)                                    # (B, T, Dr)
    # forward: [k_nope | v] = kv_b_proj(c_kv).reshape(B, T, H, Dn+Dv)
    dkv = np.concatenate([dk[..., :dn], dvalue], axis=-1).reshape(b, t, h * (dn + dv))  # (B, T, H*(Dn+Dv))
    dc_kv, grads["kv_b_proj"], _ = linear_backward(dkv, cache.kv_b)     # (B, T, Dc)
    # forward: k_pe = rope(a[..., Dc:]);  c_kv = rmsnorm(a[..., :Dc])
    da_pe = rope_backward(dk_pe, cache.k_rope)                          # (B, T, Dr)
    da_c, grads["kv_a_layernorm"] = rmsnorm_backward(dc_kv, cache.kv_norm)  # (B, T, Dc)
    # forward: a = kv_a_proj_with_mqa(x)
    dx, grads["kv_a_proj_with_mqa"], _ = linear_backward(np.concatenate([da_c, da_pe], axis=-1), cache.kv_a)
    # forward: q = [q_nope ; rope(q_pe_raw)]
    dq_pe = rope_backward(dq[..., dn:], cache.q_rope)                   # (B, T, H, Dr)
    dq = np.concatenate([dq[..., :dn], dq_pe], axis=-1).reshape(b, t, h * (dn + dr))  # (B, T, H*(Dn+Dr))
    if cache.q_a is None:
        # forward: q = q_proj(x)
        dx_q, grads["q_proj"], _ = linear_backward(dq, cache.q_b)       # (B, T, D)
    else:
        # forward: q = q_b_proj(rmsnorm(q_a_proj(x)))
        dcq, grads["q_b_proj"], _ = linear_backward(dq, cache.q_b)      # (B, T, Dq)
        dcq, grads["q_a_layernorm"] = rmsnorm_backward(dcq, cache.q_norm)  # (B, T, Dq)
        dx_q, grads["q_a_proj"], _ = linear_backward(dcq, cache.q_a)    # (B, T, D)
    return dx + dx_q, {k: grads[k] for k in cache.keys}


def mla_infer(x, params, config, cache, start_pos=0, *, impl="absorb", allowed=None):
    r"""Prefill, chunked prefill or one-token decode against a latent cache.

    Computes the new tokens' :math:`c^{KV}` (after ``kv_a_layernorm``) and :math:`k^R` (after
    RoPE), writes them into rows ``[start_pos, start_pos + T)`` of ``cache`` **in place** (as
    DeepSeek's inference code does), then lets query ``i`` attend to rows ``j <= start_pos + i``.
    Prefill is ``start_pos = 0``; chunked prefill any ``start_pos`` with T > 1 (DeepSeek's code
    masks only T x T, so it supports start_pos > 0 only for T = 1); decode is T = 1.

    ``impl="naive"`` decompresses :math:`k^C, v` for all cached tokens with ``kv_b_proj`` and runs
    per-head attention. ``impl="absorb"`` (DeepSeek-V2 §2.1.2, "absorbed into"; DeepSeek's
    ``attn_impl="absorb"``) uses associativity instead,

    .. math:: q^C\cdot(W^{UK}_h c) = (W^{UK\top}_h q^C)\cdot c, \qquad
              W^{UV}_h \textstyle\sum_j p_j c_j = \sum_j p_j W^{UV}_h c_j,

    so attention runs on the cache itself as MQA with one key head ``[c^{KV}; k^R]`` (Dc + Dr wide)
    and one value head ``c^{KV}`` (FlashMLA's layout), and :math:`W^{UV}_h` maps the Dc-wide head
    outputs back. Both equal :func:`mla_forward` on the whole sequence. Weights are checked for
    shape and dtype, not scanned for NaN at every step (:func:`~refimpl.attention.mha.check_weight`).

    ``allowed`` (B, T, start_pos + T) bool, optional, restricts each query's keys further (DSA);
    it must select the same number of keys in every batch row when T = 1, where the selected cache
    rows are gathered so that only they are read (a one-token decode's selection is all causal).

    Shapes: x (B, T, D), cache.latent (B, Tmax, Dc + Dr) -> y (B, T, D).
    """
    _check_mla(x, params, config, scan=False)
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if not isinstance(cache, LatentKVCache):
        raise TypeError(f"cache: expected a LatentKVCache, got {type(cache).__name__}")
    b, t, _ = x.shape
    h, dn, dr, dv, dc = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                         config.v_head_dim, config.kv_lora_rank)
    if cache.latent.shape[0] != b or cache.latent.shape[2] != dc + dr or cache.kv_lora_rank != dc:
        raise ValueError(f"cache: expected latent of shape ({b}, Tmax, {dc + dr}) with kv_lora_rank={dc}, "
                         f"got {cache.latent.shape} with kv_lora_rank={cache.kv_lora_rank}")
    check_same_dtype("cache.latent", cache.latent, "x", x)
    end = check_start_pos(start_pos, t, cache.latent.shape[1])
    positions = check_positions(start_pos + np.arange(t), b, t, config.max_position_embeddings,
                                name="start_pos")                          # (B, T)
    q_nope, q_pe, _ = _queries(x, params, config, positions, project)   # (B, T, H, Dn), (B, T, H, Dr)
    c_kv, k_pe, _ = _latents(x, params, config, positions, project)     # (B, T, Dc), (B, T, Dr)
    cache.latent[:, start_pos:end, :dc] = c_kv
    cache.latent[:, start_pos:end, dc:] = k_pe
    lat, off = cache.latent[:, :end], start_pos                         # (B, S, Dc+Dr)
    if allowed is not None and t == 1:
        # decode under a key selection (DSA): gather the selected rows (the same count in every
        # row), so only those are read; the gathered set is all visible to the one query
        rows = np.nonzero(allowed[:, 0])[1].reshape(b, -1)              # (B, K) ascending positions
        lat = np.take_along_axis(lat, rows[..., None], axis=1)          # (B, K, Dc+Dr)
        off, allowed = rows.shape[1] - 1, None
    s_len = lat.shape[1]
    scale = softmax_scale(dn + dr, config.rope_scaling)
    if impl == "naive":
        kv = (lat[..., :dc] @ params["kv_b_proj"].T).reshape(b, s_len, h, dn + dv)  # (B, S, H, Dn+Dv)
        kh = np.concatenate([kv[..., :dn], np.broadcast_to(lat[:, :, None, dc:], (b, s_len, h, dr))],
                            axis=-1).transpose(0, 2, 1, 3)                # (B, H, S, Dn+Dr)
        qh = np.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)  # (B, H, T, Dn+Dr)
        oh, _ = attend(qh, kh, kv[..., dn:].transpose(0, 2, 1, 3), scale, t, off, allowed)  # (B, H, T, Dv)
        o = oh.transpose(0, 2, 1, 3)                                    # (B, T, H, Dv)
    else:
        w_uk, w_uv = absorbed_weights(params, config)                   # (H, Dn, Dc), (H, Dv, Dc)
        q_abs = _per_head(q_nope, w_uk)                                 # (B, T, H, Dc)
        qh = np.concatenate([q_abs, q_pe], axis=-1)                     # (B, T, H, Dc+Dr)
        qh = qh.transpose(0, 2, 1, 3).reshape(b, 1, h * t, dc + dr)     # (B, 1, H*T, Dc+Dr): MQA rows
        oh, _ = attend(qh, lat[:, None], lat[:, None, :, :dc], scale, t, off, allowed)  # (B, 1, H*T, Dc)
        o_lat = oh.reshape(b, h, t, dc).transpose(0, 2, 1, 3)           # (B, T, H, Dc)
        o = _per_head(o_lat, w_uv.transpose(0, 2, 1))                   # (B, T, H, Dv)
    return o.reshape(b, t, h * dv) @ params["o_proj"].T                 # (B, T, D)
