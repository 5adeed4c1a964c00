r"""DeepSeek Sparse Attention (DSA): MLA reading only the keys the lightning indexer selects.

DeepSeek-V3.2 (arXiv 2512.02556 §2.1 eq. 2; V3.2-Exp report §1) keeps V3's MLA and adds, in every
layer, a lightning indexer (:mod:`.indexer`) whose scores pick ``index_topk`` keys per query
(2,048 in the released model). Because MLA in its absorbed (MQA) form shares one latent key per
token across all heads, there is one selected set :math:`\mathcal S_t` per query token, common to
all heads, and the attention is

.. math:: o_{t,h} = \sum_{s \in \mathcal S_t,\ s \le t}
          \mathrm{softmax}_s\bigl(\sigma\, q_{t,h}\cdot k_{s,h}\bigr)\, v_{s,h}

so the core attention costs O(T k) instead of O(T^2); the indexer is still O(T^2) but ~17x
cheaper per key than absorbed MLA (reference §5). Selected ∩ causal matters: for rows with fewer
than k causal keys the top-k returns future positions too, and only the causal mask removes them.

* Training pair :func:`dsa_forward` / :func:`dsa_backward`: MLA under a fixed selection (top-k is
  piecewise constant, so the LM loss gives the indexer exactly zero gradient). ``sparse=False`` is
  the dense warm-up (attention stays dense; the selection is still reported).
* :func:`dsa_indexer_loss`: the indexer's own loss and weight gradients, with the main attention's
  head-mean probabilities as the (detached) target: over causal keys in warm-up (V3.2 eq. 3), over
  :math:`\mathcal S_t` in sparse training (eq. 4). In the sparse stage the target is the head-mean
  of the *sparse* softmaxes, which already sums to 1 on :math:`\mathcal S_t` (an unpublished
  detail; reference §3.2).
* Inference :func:`dsa_infer` against a :class:`DSACache`: MLA's latent cache plus the indexer's
  key cache (post-LayerNorm, post-RoPE :math:`k^I`, ``index_head_dim`` values per token), for
  prefill from any ``start_pos`` (beyond DeepSeek's code, which masks only T x T) and decode.

``index_topk >= T`` reduces to dense MLA exactly. Parameters: MLA's plus ``{"indexer": ...}``
(hub names ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_same_dtype
from .indexer import (
    index_dims,
    index_scores,
    indexer_backward,
    indexer_kl_backward,
    indexer_kl_forward,
    indexer_qkw,
    init_indexer_params,
    query_latent,
    select_topk,
)
from .kv_cache import LatentKVCache, check_positions, init_latent_cache
from .mha import check_start_pos, project
from .mla import init_mla_params, mla_backward, mla_forward, mla_infer


def split_params(params):
    """``(mla_params, indexer_params)`` from a DSA ``self_attn`` dict."""
    if not isinstance(params, dict) or "indexer" not in params:
        raise ValueError("params: expected MLA weights plus an 'indexer' dict (a deepseek_v32 layer)")
    return {k: v for k, v in params.items() if k != "indexer"}, params["indexer"]


def init_dsa_params(config, rng, dtype=np.float64):
    """MLA weights (:func:`~refimpl.attention.init_mla_params`) plus ``"indexer"``."""
    p = init_mla_params(config, rng, dtype)
    p["indexer"] = init_indexer_params(config, rng, dtype)
    return p


class DSATrainCache(NamedTuple):
    mla: object        # MLACache
    indexer: object    # IndexerCache
    scores: np.ndarray  # (B, T, T) index scores I (no mask)
    allowed: np.ndarray  # (B, T, T) bool: the indexer-loss support (selected in sparse, causal in dense)
    sparse: bool
    keys: tuple        # the params' keys


def dsa_forward(x, params, config, positions=None, *, sparse=True):
    r"""DSA training forward (V3.2 §2.1): indexer scores, top-k ∩ causal selection, masked MLA.

    ``sparse=False`` keeps attention dense (the warm-up stage, V3.2 §2.1.1). Returns
    ``(y, cache, info)`` with ``info["scores"]`` (B, T, T) and ``info["selected"]`` (B, T, T) bool
    (the top-k ∩ causal set, reported in both stages).

    Shapes: x (B, T, D), positions (T,) or (B, T) -> y (B, T, D).
    """
    mla_p, idx_p = split_params(params)
    b, t, _ = x.shape
    _, _, topk = index_dims(config)
    pos = check_positions(positions, b, t, config.max_position_embeddings)  # (B, T)
    cq = query_latent(x, mla_p)                                         # (B, T, Dq)
    q, k, w, icache = indexer_qkw(x, cq, idx_p, config, pos)            # (B, T, HI, DI), (B, T, DI), (B, T, HI)
    scores = index_scores(q, k, w)                                      # (B, T, T)
    selected = select_topk(scores, topk)                                # (B, T, T)
    allowed = selected if sparse and topk < t else None
    y, mcache = mla_forward(x, mla_p, config, positions, allowed=allowed)  # (B, T, D)
    support = selected if sparse else select_topk(scores, t)            # (B, T, T)
    cache = DSATrainCache(mcache, icache, scores, support, sparse, tuple(params))
    return y, cache, {"scores": scores, "selected": selected}


def dsa_backward(dy, cache):
    """Gradients of :func:`dsa_forward` under its fixed selection: ``dx`` and the params' tree.

    The indexer's gradient from this path is exactly zero (selection is piecewise constant in I);
    its training signal is :func:`dsa_indexer_loss`.
    """
    dx, grads = mla_backward(dy, cache.mla)                             # (B, T, D)
    grads["indexer"] = indexer_grads_like(cache.indexer)
    return dx, {k: grads[k] for k in cache.keys}


def indexer_grads_like(icache):
    """A zero gradient tree shaped like the indexer params of ``icache``."""
    wq, wk, ww = icache.wq.w, icache.wk.w, icache.ww.w
    di = icache.k.shape[-1]
    return {"wq_b": np.zeros_like(wq), "wk": np.zeros_like(wk),
            "k_norm": {"weight": np.zeros(di, wk.dtype), "bias": np.zeros(di, wk.dtype)},
            "weights_proj": np.zeros_like(ww)}


def attention_target(cache):
    r"""The indexer's target :math:`p_{t,s} = \frac1H\sum_h A_{t,h,s}` (B, T, T), detached (V3.2 eq. 3)."""
    return cache.mla.attn.p.mean(axis=1)                                # (B, T, T)


def dsa_indexer_loss(cache, weight=1.0):
    r"""Indexer KL loss (V3.2 eq. 3 in warm-up, eq. 4 in sparse training) and its weight gradients.

    Inputs and target are detached: only the indexer params receive gradient. Returns
    ``(loss, grads)`` with ``grads`` shaped like ``params["indexer"]``, both scaled by ``weight``.
    """
    loss, c = indexer_kl_forward(cache.scores, attention_target(cache), cache.allowed)
    return weight * loss, indexer_backward(indexer_kl_backward(weight, c), cache.indexer)


class DSACache(NamedTuple):
    """One DSA layer's inference cache: MLA's latent cache and the indexer's key cache."""
    latent: LatentKVCache
    index_k: np.ndarray  # (B, Tmax, DI) indexer keys after LayerNorm and half-split RoPE

    @property
    def values_per_token(self) -> int:
        return self.latent.values_per_token + self.index_k.shape[-1]


def init_dsa_cache(config, batch_size, max_len, dtype=np.float64) -> DSACache:
    """Empty caches: ``kv_lora_rank + qk_rope_head_dim`` latent and ``index_head_dim`` indexer values per token."""
    _, di, _ = index_dims(config)
    lat = init_latent_cache(config, batch_size, max_len, dtype)
    return DSACache(lat, np.zeros((batch_size, max_len, di), dtype=dtype))


def dsa_infer(x, params, config, cache, start_pos=0, *, impl="absorb", return_selection=False):
    r"""Prefill (any ``start_pos``) or decode with DSA; fills both caches in place at ``[start_pos, start_pos+T)``.

    The new queries score every cached indexer key ``[0, start_pos + T)``, select top-k ∩ causal
    with the same tie rule as training, and MLA (:func:`~refimpl.attention.mla_infer`, naive or
    absorbed) reads only those latent rows. Equals :func:`dsa_forward` on the whole sequence.

    Shapes: x (B, T, D) -> y (B, T, D) (and the (B, T, start_pos + T) selection if ``return_selection``).
    """
    if not isinstance(cache, DSACache):
        raise TypeError(f"cache: expected a DSACache, got {type(cache).__name__}")
    mla_p, idx_p = split_params(params)
    b, t, _ = x.shape
    _, di, topk = index_dims(config)
    end = check_start_pos(start_pos, t, cache.index_k.shape[1])
    if cache.index_k.shape[0] != b or cache.index_k.shape[2] != di:
        raise ValueError(f"cache: expected index_k of shape ({b}, Tmax, {di}), got {cache.index_k.shape}")
    check_same_dtype("cache.index_k", cache.index_k, "x", x)
    pos = check_positions(start_pos + np.arange(t), b, t, config.max_position_embeddings, name="start_pos")
    cq = query_latent(x, mla_p)                                         # (B, T, Dq)
    q, k, w, _ = indexer_qkw(x, cq, idx_p, config, pos, lin=project)    # (B, T, HI, DI), (B, T, DI), (B, T, HI)
    cache.index_k[:, start_pos:end] = k
    scores = index_scores(q, cache.index_k[:, :end], w)                 # (B, T, S)
    selected = select_topk(scores, topk, start_pos)                     # (B, T, S)
    y = mla_infer(x, mla_p, config, cache.latent, start_pos, impl=impl,
                  allowed=selected if topk < end else None)             # (B, T, D)
    return (y, selected) if return_selection else y
