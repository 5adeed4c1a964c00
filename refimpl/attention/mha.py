"""Causal multi-head attention with RoPE, and its grouped-query and multi-query variants.

These are the baselines MLA is measured against (DeepSeek-V2 §2.1.1, Table 1). Multi-head
attention (MHA, Vaswani et al. 2017) gives every query head its own key and value head, so a
decoder caches ``2 H Dh`` numbers per token per layer. Grouped-query attention (GQA, Ainslie et
al. 2023) lets ``H / Hk`` query heads share each of ``Hk`` key/value heads; multi-query attention
(MQA, Shazeer 2019) is the extreme ``Hk = 1``. One function covers all three through
``num_key_value_heads``; query head ``h`` reads key/value head ``h // (H / Hk)``, as transformers'
``repeat_kv`` does. DeepSeek LLM 67B, the dense model DeepSeek-V2 is compared with, is GQA with
8 KV heads.

The attention core :func:`sdpa_forward` is shared with MLA: MLA's naive path is MHA on decompressed
keys and values, and its absorbed path is MQA with one 576-wide key head (DeepSeek-V2 App. C;
the FlashMLA view). RoPE rotates adjacent channel pairs ``(2i, 2i+1)``
(:func:`refimpl.core.rope_forward`), the layout of DeepSeek's released weights. transformers'
Llama / Qwen2 / Mistral rotate halves ``(i, i + Dh/2)`` with the same frequency ``i``, so a
checkpoint of theirs loads by reordering each head's ``q_proj`` and ``k_proj`` rows to
``[0, Dh/2, 1, Dh/2 + 1, ...]`` (the inverse of :func:`refimpl.core.deinterleave_perm`); scores,
outputs and logits are then identical (``tests/model/test_dense_student.py`` checks a whole
LlamaForCausalLM and Qwen2ForCausalLM this way).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_integer, check_real, check_same_dtype
from ..config import check_config
from ..core.linear import linear_backward, linear_forward
from ..core.rope import rope_attention_factor, rope_backward, rope_forward, rope_inv_freq
from .kv_cache import KVCache, check_positions, default_head_dim

MHA_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Optional projection biases, keyed ``<projection>_bias`` (hub name ``self_attn.<projection>.bias``):
#: Qwen2 always has q/k/v biases (none on o_proj); Llama's ``attention_bias`` adds all four.
MHA_BIASES = tuple(f"{k}_bias" for k in MHA_PARAMS)


# ----------------------------------------------------------------------------------------------
# The attention core: softmax(scale * q k^T + causal mask) v, with grouped key/value heads
# ----------------------------------------------------------------------------------------------

class SDPACache(NamedTuple):
    qh: np.ndarray     # (B, Hk, Gq*T, Dk) queries, head-major, rows ordered (group, t)
    kh: np.ndarray     # (B, Hk, S, Dk) keys, head-major
    vh: np.ndarray     # (B, Hk, S, Dv) values, head-major
    p: np.ndarray      # (B, Hk, Gq*T, S) attention probabilities
    scale: float
    shape: tuple       # (B, T, H, Hk, Gq)


def causal_mask(t, s, q_offset=0):
    """Boolean (T, S) mask: query i (at sequence index ``q_offset + i``) may see key j iff j <= q_offset + i.

    DeepSeek's inference code builds a (T, T) mask only, which is right for a prefill at
    ``start_pos = 0``; a chunked prefill at ``start_pos > 0`` needs this (T, S) form.
    """
    t, s = check_integer("t", t, low=0), check_integer("s", s, low=0)
    q_offset = check_integer("q_offset", q_offset, low=0)
    return np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None]   # (T, S)


def _softmax_inplace(s):
    """Row softmax over the last axis, overwriting ``s`` (the values of ``core.softmax_forward``).

    The score tensor (B, Hk, Gq*T, S) is attention's largest array; the core primitive validates it
    and allocates three more of its size, this makes three passes and allocates nothing. Every row
    has a finite entry (a causal mask always keeps key 0), so no all-masked special case is needed.
    """
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def attend(qh, kh, vh, scale, t, q_offset, allowed=None):
    """Causal attention, head-major (shared by MHA/GQA and MLA's naive and absorbed paths).

    Shapes: ``qh (B, Hk, Gq*T, Dk)``, ``kh (B, Hk, S, Dk)``, ``vh (B, Hk, S, Dv)`` -> ``o (B, Hk, Gq*T, Dv)``
    and the attention probabilities ``p (B, Hk, Gq*T, S)``.

    ``allowed`` (B, T, S) bool, optional: a per-query key set (DSA's top-k selection) intersected
    with the causal mask; it must keep at least one causal key per row.
    """
    qs = qh * scale                                                     # (B, Hk, Gq*T, Dk)
    if 4 * qh.shape[2] <= kh.shape[2]:
        # few query rows against a long cache (decode): OpenBLAS streams a long row-major
        # operand about twice as fast as a long transposed one, so compute (k q^T)^T
        s = np.ascontiguousarray((kh @ qs.swapaxes(-1, -2)).swapaxes(-1, -2))  # (B, Hk, Gq*T, S)
    else:
        s = qs @ kh.swapaxes(-1, -2)                                    # (B, Hk, Gq*T, S)
    keep = causal_mask(t, kh.shape[2], q_offset)                        # (T, S)
    if allowed is not None:
        keep = keep & allowed                                           # (B, T, S)
        s += np.where(np.tile(keep, (1, qh.shape[2] // t, 1))[:, None], 0.0, -np.inf).astype(s.dtype)
    elif not keep.all():
        rows = np.tile(keep, (qh.shape[2] // t, 1))                     # (Gq*T, S)
        s += np.where(rows, 0.0, -np.inf).astype(s.dtype)               # masked logits -> -inf
    p = _softmax_inplace(s)                                             # (B, Hk, Gq*T, S)
    return p @ vh, p                                                    # (B, Hk, Gq*T, Dv)


def sdpa_forward(q, k, v, scale, *, q_offset=0, allowed=None):
    r"""Causal scaled dot-product attention with grouped key/value heads.

    .. math:: o_{t,h} = \sum_{j \le t_0 + t} \mathrm{softmax}_j\bigl(s\, q_{t,h}\cdot k_{j,g(h)}\bigr)\, v_{j,g(h)},
              \qquad g(h) = \lfloor h / (H/H_k) \rfloor

    (Vaswani et al. 2017 eq. 1; GQA grouping as in Ainslie et al. 2023.) Query ``i`` sits at
    sequence index ``q_offset + i`` (:func:`causal_mask`); the softmax runs in the input dtype.

    Shapes: q (B, T, H, Dk), k (B, S, Hk, Dk), v (B, S, Hk, Dv) with H % Hk == 0 and
    S >= q_offset + T -> o (B, T, H, Dv). ``allowed`` (B, T, S) bool, optional, further restricts
    each query's keys (DeepSeek-V3.2's sparse attention, :mod:`refimpl.attention.dsa`); masked
    probabilities are exactly 0, so :func:`sdpa_backward` needs no change.
    """
    check_float("q", q, ndim=4)
    check_real("scale", scale, low=0.0, low_open=True)
    check_float("k", k, ndim=4)
    check_float("v", v, ndim=4)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    b, t, h, dk = q.shape
    s_len, hk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk or hk == 0 or h % hk:
        raise ValueError(f"k: expected shape ({b}, S, Hk, {dk}) with Hk dividing H={h}, got {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected leading shape {k.shape[:3]} to match k, got {v.shape}")
    if not 0 <= q_offset <= s_len - t:
        raise ValueError(f"q_offset: expected 0 <= q_offset <= S - T = {s_len - t}, got {q_offset}")
    g = h // hk
    qh = q.reshape(b, t, hk, g, dk).transpose(0, 2, 3, 1, 4).reshape(b, hk, g * t, dk)  # (B, Hk, Gq*T, Dk)
    kh = k.transpose(0, 2, 1, 3)                                        # (B, Hk, S, Dk)
    vh = v.transpose(0, 2, 1, 3)                                        # (B, Hk, S, Dv)
    if allowed is not None and np.shape(allowed) != (b, t, s_len):
        raise ValueError(f"allowed: expected shape ({b}, {t}, {s_len}), got {np.shape(allowed)}")
    oh, p = attend(qh, kh, vh, scale, t, q_offset, allowed)            # (B, Hk, Gq*T, Dv)
    o = oh.reshape(b, hk, g, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, h, -1)  # (B, T, H, Dv)
    return o, SDPACache(qh, kh, vh, p, scale, (b, t, h, hk, g))


def sdpa_backward(do, cache):
    """Gradients of :func:`sdpa_forward`. Shapes: do (B, T, H, Dv) -> dq, dk, dv like q, k, v."""
    qh, kh, vh, p, scale, (b, t, h, hk, g) = cache
    doh = do.reshape(b, t, hk, g, -1).transpose(0, 2, 3, 1, 4).reshape(b, hk, g * t, -1)  # (B, Hk, Gq*T, Dv)
    # forward: o = p @ v
    dp = doh @ vh.swapaxes(-1, -2)                                      # (B, Hk, Gq*T, S)
    dvh = p.swapaxes(-1, -2) @ doh                                      # (B, Hk, S, Dv)
    # forward: p = softmax(s)   so: ds = p * (dp - sum_j p_j dp_j)   (masked: p = 0, so ds = 0)
    dp -= np.einsum("...ij,...ij->...i", p, dp)[..., None]              # in place: dp is ours
    ds = np.multiply(dp, p, out=dp)                                     # (B, Hk, Gq*T, S)
    # forward: s = scale * q @ k^T
    dqh = (ds @ kh) * scale                                             # (B, Hk, Gq*T, Dk)
    dkh = (ds.swapaxes(-1, -2) @ qh) * scale                            # (B, Hk, S, Dk)
    dq = dqh.reshape(b, hk, g, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, h, -1)  # (B, T, H, Dk)
    return dq, dkh.transpose(0, 2, 1, 3), dvh.transpose(0, 2, 1, 3)     # (B, S, Hk, Dk), (B, S, Hk, Dv)


# ----------------------------------------------------------------------------------------------
# MHA / GQA / MQA with RoPE
# ----------------------------------------------------------------------------------------------

def mha_param_shapes(config, head_dim=None):
    """Weight shapes ``[out, in]`` for :func:`mha_forward` (transformers' Llama names)."""
    d, h, hk = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    dh = default_head_dim(config) if head_dim is None else head_dim
    return {"q_proj": (h * dh, d), "k_proj": (hk * dh, d), "v_proj": (hk * dh, d), "o_proj": (d, h * dh)}


def mha_bias_names(config):
    """The bias keys a standard-attention config has: ``q/k/v_proj_bias`` for ``model_type`` qwen2
    (hard-coded in Qwen2, transformers' ``Qwen2Attention``), all four for ``attention_bias=True``
    (transformers' ``LlamaAttention``), none otherwise."""
    if config.extra.get("model_type") == "qwen2":
        return MHA_BIASES[:3]
    return MHA_BIASES if config.attention_bias else ()


def init_mha_params(config, rng, *, head_dim=None, dtype=np.float64):
    """Draw baseline attention weights ~ N(0, ``initializer_range``), as transformers initialises them;
    the biases of :func:`mha_bias_names` start at zero (as transformers' ``nn.Linear`` init does)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    std = config.initializer_range
    shapes = mha_param_shapes(config, head_dim)
    params = {k: (std * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    params.update({b: np.zeros(shapes[b[:-5]][0], dtype=dtype) for b in mha_bias_names(config)})
    return params


def check_weight(name, w, x, ndim, scan=True):
    """A weight's type, dtype (that of ``x``) and rank; its values are scanned for NaN/inf only if ``scan``.

    The inference paths pass ``scan=False``: scanning every weight at every decoded token would cost
    as much as the projections themselves (the training forward and ``init_*`` scan or create them).
    """
    if scan:
        check_float(name, w, ndim=ndim)
    elif not isinstance(w, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(w).__name__}")
    elif w.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {w.shape}")
    check_same_dtype(name, w, "x", x)


def _mha_dims(x, params, config, scan=True):
    """Validate and return (Dh, H, Hk) for the baseline."""
    check_float("x", x, ndim=3)
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict with keys {MHA_PARAMS}, got {type(params).__name__}")
    h, hk, d = config.num_attention_heads, config.num_key_value_heads, x.shape[-1]
    if hk < 1 or h % hk:
        raise ValueError(f"config.num_key_value_heads: expected a divisor of num_attention_heads={h}, got {hk}")
    for name in MHA_PARAMS:
        if name not in params:
            raise ValueError(f"params: missing '{name}' (expected keys {MHA_PARAMS})")
        check_weight(f"params['{name}']", params[name], x, 2, scan)
    rows = params["q_proj"].shape[0]
    if rows % h:
        raise ValueError(f"params['q_proj']: expected H*Dh rows with H={h}, got shape {params['q_proj'].shape}")
    dh = rows // h
    if dh % 2:
        raise ValueError(f"params['q_proj']: head dim {dh} is odd, but RoPE rotates channel pairs")
    for name, shape in mha_param_shapes(config, dh).items():
        if params[name].shape != shape:
            raise ValueError(f"params['{name}']: expected shape {shape} (H={h}, Hk={hk}, Dh={dh}, D={d}), "
                             f"got {params[name].shape}")
        if name + "_bias" in params:
            check_weight(f"params['{name}_bias']", params[name + "_bias"], x, 1, scan)
            if params[name + "_bias"].shape != shape[:1]:
                raise ValueError(f"params['{name}_bias']: expected shape {shape[:1]}, "
                                 f"got {params[name + '_bias'].shape}")
    unknown = sorted(set(params) - set(MHA_PARAMS) - set(MHA_BIASES))
    if unknown:
        raise ValueError(f"params: unexpected key '{unknown[0]}' (expected {MHA_PARAMS} and optional {MHA_BIASES})")
    return dh, h, hk


def project(x, w, b=None):
    """``(x @ w.T + b, None)``: :func:`~refimpl.core.linear_forward` without its checks or cache.

    The inference paths use it: ``linear_forward`` scans its weight for NaN/inf on every call,
    which at one decoded token costs more than the product itself; no backward needs a cache there.
    """
    y = x @ w.T                                                         # (..., Dout)
    if b is not None:
        y += b
    return y, None


def _rope_tables(config, dim):
    return rope_inv_freq(dim, config.rope_theta, config.rope_scaling), rope_attention_factor(config.rope_scaling)


def _mha_qkv(x, params, config, positions, dh, h, hk, lin=linear_forward):
    b, t, _ = x.shape
    inv_freq, amp = _rope_tables(config, dh)
    q, cq = lin(x, params["q_proj"], params.get("q_proj_bias"))         # (B, T, H*Dh)
    k, ck = lin(x, params["k_proj"], params.get("k_proj_bias"))         # (B, T, Hk*Dh)
    v, cv = lin(x, params["v_proj"], params.get("v_proj_bias"))         # (B, T, Hk*Dh)
    q, rq = rope_forward(q.reshape(b, t, h, dh), positions[..., None], inv_freq, amp)   # (B, T, H, Dh)
    k, rk = rope_forward(k.reshape(b, t, hk, dh), positions[..., None], inv_freq, amp)  # (B, T, Hk, Dh)
    return q, k, v.reshape(b, t, hk, dh), (cq, ck, cv, rq, rk)


class MHACache(NamedTuple):
    q: object          # LinearCache of q_proj
    k: object          # LinearCache of k_proj
    v: object          # LinearCache of v_proj
    q_rope: object     # RopeCache
    k_rope: object     # RopeCache
    attn: SDPACache
    o: object          # LinearCache of o_proj
    dims: tuple        # (B, T, H, Hk, Dh)
    keys: tuple        # the params' keys, in their order (gradients come back in it)


def mha_forward(x, params, config, positions=None):
    r"""Causal MHA / GQA / MQA with RoPE on the whole head (training forward).

    .. math:: q = R_p W_Q x,\ k = R_p W_K x,\ v = W_V x,\qquad
              y = W_O\,[\mathrm{softmax}(q k^\top / \sqrt{D_h} + M)\, v]_{h=1..H}

    (DeepSeek-V2 §2.1.1 eqs. 1-8; GQA when ``config.num_key_value_heads`` < H, MQA when it is 1.)
    ``params = {"q_proj", "k_proj", "v_proj", "o_proj"}``, weights ``[out, in]``, plus optional
    biases ``"<proj>_bias"`` (:data:`MHA_BIASES`; Qwen2's q/k/v biases are added before RoPE). RoPE uses
    ``config.rope_theta``; with YaRN ``rope_scaling`` the frequencies are corrected and cos/sin
    scaled by :func:`~refimpl.core.rope_attention_factor` while the logit scale stays
    :math:`D_h^{-1/2}` (transformers' Llama semantics). The causal mask is over sequence index;
    ``positions`` only feeds RoPE.

    Shapes: x (B, T, D), positions (T,) or (B, T) int64 (default arange(T)) -> y (B, T, D).
    """
    check_config(config)
    check_float("x", x, ndim=3)
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x: expected shape (B, T, D) with B >= 1 and T >= 1, got {x.shape}")
    dh, h, hk = _mha_dims(x, params, config)
    b, t, _ = x.shape
    positions = check_positions(positions, b, t, config.max_position_embeddings)  # (B, T)
    q, k, v, (cq, ck, cv, rq, rk) = _mha_qkv(x, params, config, positions, dh, h, hk)
    o, ca = sdpa_forward(q, k, v, dh ** -0.5)                           # (B, T, H, Dh)
    y, co = linear_forward(o.reshape(b, t, h * dh), params["o_proj"], params.get("o_proj_bias"))  # (B, T, D)
    return y, MHACache(cq, ck, cv, rq, rk, ca, co, (b, t, h, hk, dh), tuple(params))


def mha_backward(dy, cache):
    """Gradients of :func:`mha_forward`: ``dx`` (B, T, D) and a dict with the params' keys."""
    b, t, h, hk, dh = cache.dims
    # forward: y = o_proj(o)
    do, dwo, dbo = linear_backward(dy, cache.o)                         # (B, T, H*Dh)
    # forward: o = attention(q, k, v)
    dq, dk, dv = sdpa_backward(do.reshape(b, t, h, dh), cache.attn)     # (B, T, H|Hk, Dh)
    # forward: q = rope(q_proj(x)), k = rope(k_proj(x))
    dq = rope_backward(dq, cache.q_rope).reshape(b, t, h * dh)          # (B, T, H*Dh)
    dk = rope_backward(dk, cache.k_rope).reshape(b, t, hk * dh)         # (B, T, Hk*Dh)
    # forward: q, k, v = q_proj(x), k_proj(x), v_proj(x)
    # (with biases: q = rope(x Wq^T + bq), ...   so: dbq = sum over tokens of dq, before RoPE's inverse)
    dx_q, dwq, dbq = linear_backward(dq, cache.q)                       # (B, T, D)
    dx_k, dwk, dbk = linear_backward(dk, cache.k)                       # (B, T, D)
    dx_v, dwv, dbv = linear_backward(dv.reshape(b, t, hk * dh), cache.v)  # (B, T, D)
    grads = {"q_proj": dwq, "k_proj": dwk, "v_proj": dwv, "o_proj": dwo, "q_proj_bias": dbq,
             "k_proj_bias": dbk, "v_proj_bias": dbv, "o_proj_bias": dbo}
    return dx_q + dx_k + dx_v, {k: grads[k] for k in cache.keys}


def mha_infer(x, params, config, cache, start_pos=0):
    """Prefill, chunked prefill or one-token decode of the baseline against a per-head KV cache.

    Writes the new rotated keys and the values into rows ``[start_pos, start_pos + T)`` of
    ``cache`` (in place, as DeepSeek's and every serving code's cache does) and attends causally
    over rows ``[0, start_pos + T)``. Equals :func:`mha_forward` on the whole sequence.

    Shapes: x (B, T, D), cache :class:`~refimpl.attention.KVCache` -> y (B, T, D).
    """
    dh, h, hk = _mha_dims(x, params, config, scan=False)
    b, t, _ = x.shape
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
    if cache.k.shape[0] != b or cache.k.shape[1] != hk or cache.k.shape[3] != dh:
        raise ValueError(f"cache: expected k of shape ({b}, {hk}, Tmax, {dh}), got {cache.k.shape}")
    check_same_dtype("cache.k", cache.k, "x", x)
    end = check_start_pos(start_pos, t, cache.k.shape[2])
    positions = check_positions(start_pos + np.arange(t), b, t, config.max_position_embeddings,
                                name="start_pos")                          # (B, T)
    q, k, v, _ = _mha_qkv(x, params, config, positions, dh, h, hk, lin=project)
    cache.k[:, :, start_pos:end] = k.transpose(0, 2, 1, 3)              # (B, Hk, T, Dh)
    cache.v[:, :, start_pos:end] = v.transpose(0, 2, 1, 3)              # (B, Hk, T, Dh)
    g = h // hk
    qh = q.reshape(b, t, hk, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, hk, g * t, dh)  # (B, Hk, Gq*T, Dh)
    oh, _ = attend(qh, cache.k[:, :, :end], cache.v[:, :, :end], dh ** -0.5, t, start_pos)  # (B, Hk, Gq*T, Dh)
    o = oh.reshape(b, hk, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)  # (B, T, H*Dh)
    return project(o, params["o_proj"], params.get("o_proj_bias"))[0]  # (B, T, D)


def check_start_pos(start_pos, t, capacity):
    """The end of the cache window a decode step writes: ``start_pos + T``, checked against ``capacity``."""
    start_pos = check_integer("start_pos", start_pos, low=0)
    if t < 1:
        raise ValueError(f"x: expected at least one token, got T={t}")
    end = start_pos + t
    if end > capacity:
        raise ValueError(f"start_pos: start_pos + T = {end} exceeds the cache's capacity {capacity}")
    return end
