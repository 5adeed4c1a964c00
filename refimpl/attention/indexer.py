r"""DeepSeek-V3.2's lightning indexer: which earlier tokens each query should attend to.

DeepSeek Sparse Attention (DSA; DeepSeek-V3.2 §2.1 eq. 1-2, V3.2-Exp report §1) lets every query
read only the ``index_topk`` keys a small scorer ranks highest. The scorer, the *lightning
indexer*, gives query token t and key token s the score

.. math:: I_{t,s} = (d^I)^{-1/2} \sum_{j=1}^{H^I} w_{t,j}\,\mathrm{ReLU}(q^I_{t,j}\cdot k^I_s),
          \qquad w_{t,j} = (H^I)^{-1/2} (W^{IW} x_t)_j

with ``index_n_heads`` :math:`H^I` query heads :math:`q^I_{t,j}` (read from MLA's normalised query
latent :math:`c^Q_t` by ``wq_b``), **one** key :math:`k^I_s` per token shared by all heads (``wk``
on the layer input x, then a LayerNorm *with bias*, ``k_norm``), and a per-token head weight
``weights_proj``. The first ``qk_rope_head_dim`` dims of each q/k head are rotated with
**half-split** (NeoX) RoPE, the rest are position-free; MLA puts its rope slice *last* and rotates
adjacent pairs. DeepSeek fixed exactly this layout on 2025-11-17 (their README note; the first
release rotated the indexer interleaved). The RoPE table is MLA's (YaRN-corrected) with amplitude 1.
DeepSeek's Hadamard rotation and FP8 rounding of q and k are precision-only (an orthogonal
rotation of both leaves every dot product unchanged) and are omitted here.

Selection (:func:`select_topk`): the top ``min(k, S)`` of :math:`I_{t,s} + C_{t,s}` (causal
mask), intersected with the causal mask again. **Tie rule**: among equal scores the lower position
wins. ReLU makes a score exactly 0 whenever every head's dot product is <= 0, so exact ties are
common in small models; a rule keyed on (score, position) only keeps each row's selection
independent of the row's length, which causality, prefix consistency and cached decoding need
(``torch.topk`` does not promise this). The indexer is trained only by its own KL loss
(:func:`indexer_kl_forward`, V3.2 §2.1.1 eq. 3-4); :func:`indexer_backward` gives its weight
gradients with the inputs treated as constants (frozen in warm-up, detached in sparse training).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_integer
from ..core.linear import linear_backward, linear_forward
from ..core.rmsnorm import rmsnorm_forward
from ..core.rope import deinterleave_perm, rope_backward, rope_forward, rope_inv_freq

#: eps of the indexer's ``k_norm`` LayerNorm (DeepSeek's ``LayerNorm`` default; transformers too).
INDEX_NORM_EPS = 1e-6
#: Released V3.2 values (``config_671B_v3.2.json``; transformers' DeepseekV32Config defaults).
INDEX_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}


def uses_dsa(config) -> bool:
    """True iff the config's HF ``model_type`` is ``"deepseek_v32"`` (every layer then uses DSA)."""
    return config.extra.get("model_type") == "deepseek_v32"


def index_dims(config):
    """``(index_n_heads, index_head_dim, index_topk)`` from ``config.extra`` (defaults: the released V3.2)."""
    hi, di, k = (int(config.extra.get(n, INDEX_DEFAULTS[n])) for n in INDEX_DEFAULTS)
    if hi < 1 or k < 1:
        raise ValueError(f"config.index_n_heads / index_topk: expected positive integers, got {hi}, {k}")
    if not (di > config.qk_rope_head_dim and di % 2 == 0):
        raise ValueError(f"config.index_head_dim: expected an even number > qk_rope_head_dim="
                         f"{config.qk_rope_head_dim}, got {di}")
    if not config.q_lora_rank:
        raise ValueError("config.q_lora_rank: the indexer reads MLA's query latent, so it must be > 0")
    return hi, di, k


def indexer_param_shapes(config):
    """Shapes ``[out, in]`` by the hub names under ``self_attn.indexer`` (reference §2.1)."""
    hi, di, _ = index_dims(config)
    return {"wq_b": (hi * di, config.q_lora_rank), "wk": (di, config.hidden_size),
            "k_norm": {"weight": (di,), "bias": (di,)}, "weights_proj": (hi, config.hidden_size)}


def init_indexer_params(config, rng, dtype=np.float64):
    """Weights ~ N(0, ``initializer_range``), LayerNorm gain 1 and bias 0 (the init is unpublished)."""
    s = indexer_param_shapes(config)
    std = config.initializer_range
    normal = lambda shape: (std * rng.standard_normal(shape)).astype(dtype)
    return {"wq_b": normal(s["wq_b"]), "wk": normal(s["wk"]),
            "k_norm": {"weight": np.ones(s["k_norm"]["weight"], dtype), "bias": np.zeros(s["k_norm"]["bias"], dtype)},
            "weights_proj": normal(s["weights_proj"])}


def query_latent(x, mla_params):
    r"""MLA's normalised query latent :math:`c^Q = \mathrm{RMSNorm}(W^{DQ} x)` (the indexer's q input)."""
    from .mla import LATENT_NORM_EPS
    cq = x @ mla_params["q_a_proj"].T                                   # (B, T, Dq)
    return rmsnorm_forward(cq, mla_params["q_a_layernorm"], LATENT_NORM_EPS)[0]  # (B, T, Dq)


def rope_half_forward(x, positions, inv_freq):
    r"""Half-split RoPE: pairs ``(i, i + Dr/2)`` rotated by :math:`p\theta_i` (amplitude 1).

    Computed as refimpl's adjacent-pair rotation of the interleaved reorder
    :math:`v'_{2i} = v_i, v'_{2i+1} = v_{i+D_r/2}`, then the reorder undone (reference §2.3).
    Shapes: x (..., Dr), positions broadcastable to x.shape[:-1] -> y (..., Dr).
    """
    perm = deinterleave_perm(x.shape[-1])                              # (Dr,)
    y, cache = rope_forward(x[..., np.argsort(perm)], positions, inv_freq)  # (..., Dr)
    return y[..., perm], cache


def rope_half_backward(dy, cache):
    """Gradient of :func:`rope_half_forward` (the transposed rotation)."""
    perm = deinterleave_perm(dy.shape[-1])                             # (Dr,)
    return rope_backward(dy[..., np.argsort(perm)], cache)[..., perm]


class LayerNormCache(NamedTuple):
    xhat: np.ndarray   # (..., N) normalised input
    rstd: np.ndarray   # (..., 1) 1 / sqrt(var + eps)
    w: np.ndarray      # (N,) gain


def layernorm_forward(x, w, b, eps=INDEX_NORM_EPS):
    r""":math:`y = \gamma \odot (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta` over the last axis (Ba et al. 2016)."""
    mu = x.mean(axis=-1, keepdims=True)                                 # (..., 1)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = (x - mu) * rstd                                              # (..., N)
    return xhat * w + b, LayerNormCache(xhat, rstd, w)


def layernorm_backward(dy, cache):
    """``dx``, ``dgamma``, ``dbeta`` of :func:`layernorm_forward`."""
    xhat, rstd, w = cache
    lead = tuple(range(dy.ndim - 1))
    a = dy * w                                                          # (..., N)
    dx = rstd * (a - a.mean(axis=-1, keepdims=True) - xhat * (a * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


class IndexerCache(NamedTuple):
    wq: object         # LinearCache of wq_b (input c^Q)
    wk: object         # LinearCache of wk (input x)
    norm: LayerNormCache
    q_rope: object     # RopeCache of the queries' rope slice
    k_rope: object     # RopeCache of the keys' rope slice
    ww: object         # LinearCache of weights_proj
    q: np.ndarray      # (B, T, HI, DI) final queries
    k: np.ndarray      # (B, S, DI) final keys
    w: np.ndarray      # (B, T, HI) head weights, scale (HI DI)^-1/2 folded in
    dims: tuple        # (B, T, HI, DI, Dr)


def indexer_qkw(x, cq, params, config, positions, lin=linear_forward):
    r"""Indexer queries q (B, T, HI, DI), keys k (B, T, DI) and head weights w (B, T, HI).

    ``w`` already carries both constants :math:`(H^I d^I)^{-1/2}` (reference §2.2), so
    :math:`I_{t,s} = \sum_j w_{t,j}\mathrm{ReLU}(q_{t,j}\cdot k_s)`. Returns ``(q, k, w, cache)``.
    """
    b, t, _ = x.shape
    hi, di, _ = index_dims(config)
    dr = config.qk_rope_head_dim
    inv_freq = rope_inv_freq(dr, config.rope_theta, config.rope_scaling)
    q, c_wq = lin(cq, params["wq_b"])                                   # (B, T, HI*DI)
    q = q.reshape(b, t, hi, di)                                         # (B, T, HI, DI)
    q_pe, c_qr = rope_half_forward(q[..., :dr], positions[..., None], inv_freq)  # (B, T, HI, Dr)
    q = np.concatenate([q_pe, q[..., dr:]], axis=-1)                    # (B, T, HI, DI)
    u, c_wk = lin(x, params["wk"])                                      # (B, T, DI)
    n, c_n = layernorm_forward(u, params["k_norm"]["weight"], params["k_norm"]["bias"])  # (B, T, DI)
    k_pe, c_kr = rope_half_forward(n[..., :dr], positions, inv_freq)    # (B, T, Dr)
    k = np.concatenate([k_pe, n[..., dr:]], axis=-1)                    # (B, T, DI)
    w, c_ww = lin(x, params["weights_proj"])                            # (B, T, HI)
    w = w * (hi * di) ** -0.5                                           # (B, T, HI)
    return q, k, w, IndexerCache(c_wq, c_wk, c_n, c_qr, c_kr, c_ww, q, k, w, (b, t, hi, di, dr))


def index_scores(q, k, w):
    r""":math:`I_{t,s} = \sum_j w_{t,j}\,\mathrm{ReLU}(q_{t,j}\cdot k_s)`, every key (no mask).

    Shapes: q (B, T, HI, DI), k (B, S, DI), w (B, T, HI) -> I (B, T, S).
    """
    z = q @ k[:, None].swapaxes(-1, -2)                                 # (B, T, HI, S) BLAS, not einsum
    return (w[:, :, None, :] @ np.maximum(z, 0.0, out=z))[:, :, 0]      # (B, T, S)


def select_topk(scores, index_topk, q_offset=0):
    r"""Boolean (B, T, S) mask of each query's selected ∩ causal keys (reference §2.5, §8.2).

    Query i sits at sequence index ``q_offset + i``; it keeps the ``min(index_topk, S)`` keys of
    highest :math:`I_{t,s} + C_{t,s}` (C the causal -inf mask), **ties going to the lower
    position**, then drops the non-causal ones, so it attends to exactly ``min(index_topk,
    q_offset + i + 1)`` keys. Implemented in O(S) per row: find the k-th largest value, keep every
    key above it and the lowest-position keys equal to it, which is the first ``k`` of
    ``argsort(-(I + C), kind="stable")``.
    """
    check_float("scores", scores, ndim=3, allow_inf=True)
    check_integer("index_topk", index_topk, low=1)
    check_integer("q_offset", q_offset, low=0)
    b, t, s = scores.shape
    causal = np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None]  # (T, S)
    kk = min(int(index_topk), s)
    if kk >= s:
        return np.broadcast_to(causal, (b, t, s)).copy()                # (B, T, S)
    sc = np.where(causal, scores, -np.inf)                              # (B, T, S)
    kth = np.partition(sc, s - kk, axis=-1)[..., s - kk : s - kk + 1]   # (B, T, 1) k-th largest
    above = sc > kth                                                    # (B, T, S)
    need = kk - above.sum(axis=-1, keepdims=True)                       # (B, T, 1) ties to take
    tied = sc == kth                                                    # (B, T, S)
    return (above | (tied & (np.cumsum(tied, axis=-1) <= need))) & causal  # (B, T, S)


def indexer_kl_forward(scores, target, allowed):
    r"""Indexer loss :math:`\sum_t \mathrm{KL}(p_{t,:}\,\|\,\mathrm{Softmax}(I_{t,:}))` over the allowed keys.

    (V3.2 §2.1.1 eq. 3 with ``allowed`` = causal keys: dense warm-up; eq. 4 with ``allowed`` = the
    selected keys: sparse stage.) ``target`` p is the head-mean of the main attention probabilities
    (rows summing to 1 on ``allowed``). Summed over tokens, averaged over the batch (an
    unpublished choice, reference §3.3). Returns ``(loss, cache)``; ``cache`` holds pi - p.

    Shapes: scores, target (B, T, S) float, allowed (B, T, S) bool -> scalar.
    """
    z = np.where(allowed, scores, -np.inf)                              # (B, T, S)
    z = z - z.max(axis=-1, keepdims=True)                               # (B, T, S)
    logpi = np.where(allowed, z - np.log(np.exp(z).sum(axis=-1, keepdims=True)), 0.0)  # (B, T, S)
    p = np.where(allowed, target, 0.0)                                  # (B, T, S)
    logp = np.log(np.where(p > 0, p, 1.0))                              # (B, T, S) 0 log 0 = 0
    b = scores.shape[0]
    loss = (p * (logp - logpi)).sum() / b
    return loss, (np.exp(logpi) * allowed - p) / b                      # (B, T, S) dL/dI


def indexer_kl_backward(dloss, cache):
    r""":math:`\partial\mathcal L/\partial I_{t,s} = (\pi_{t,s} - p_{t,s})/B` on allowed keys, 0 elsewhere."""
    return dloss * cache                                                # (B, T, S)


def indexer_backward(dscores, cache):
    r"""Weight gradients of :math:`I` from ``dscores`` (B, T, S) (reference §3.4); inputs are constants.

    .. math:: \partial w_{t,j} = \sum_s G_{t,s}\mathrm{ReLU}(z_{t,j,s}),\quad
              Z_{t,j,s} = G_{t,s} w_{t,j} 1[z_{t,j,s} > 0],\quad
              \partial q_{t,j} = \sum_s Z_{t,j,s} k_s,\quad \partial k_s = \sum_{t,j} Z_{t,j,s} q_{t,j}

    then back through RoPE (un-rotation), LayerNorm and the three linears. Returns a dict shaped
    like the indexer params.
    """
    b, t, hi, di, dr = cache.dims
    z = cache.q @ cache.k[:, None].swapaxes(-1, -2)                     # (B, T, HI, S)
    # forward: I = sum_j w_j relu(z_j)
    dw = (np.maximum(z, 0.0) @ dscores[..., None])[..., 0]              # (B, T, HI)
    dz = dscores[:, :, None, :] * cache.w[..., None] * (z > 0)          # (B, T, HI, S)
    dq = dz @ cache.k[:, None]                                          # (B, T, HI, DI)
    dk = dz.reshape(b, t * hi, -1).swapaxes(-1, -2) @ cache.q.reshape(b, t * hi, di)  # (B, S, DI)
    # forward: q = [rope_half(q_raw[:Dr]); q_raw[Dr:]],  k = [rope_half(n[:Dr]); n[Dr:]]
    dq = np.concatenate([rope_half_backward(dq[..., :dr], cache.q_rope), dq[..., dr:]], axis=-1)
    dn = np.concatenate([rope_half_backward(dk[..., :dr], cache.k_rope), dk[..., dr:]], axis=-1)
    # forward: n = layernorm(wk(x));  q_raw = wq_b(cq);  w = (HI DI)^-1/2 weights_proj(x)
    du, dgam, dbeta = layernorm_backward(dn, cache.norm)               # (B, S, DI)
    _, g_wk, _ = linear_backward(du, cache.wk)
    _, g_wq, _ = linear_backward(dq.reshape(b, t, hi * di), cache.wq)
    _, g_ww, _ = linear_backward(dw * (hi * di) ** -0.5, cache.ww)
    return {"wq_b": g_wq, "wk": g_wk, "k_norm": {"weight": dgam, "bias": dbeta}, "weights_proj": g_ww}
