r"""The whole DeepSeek-V2/V3 decoder: embedding, N pre-norm layers, final RMSNorm, untied LM head.

DeepSeek-V2 §2 and DeepSeek-V3 §2.1: token embeddings (unscaled, untied from the head) go through
``num_hidden_layers`` decoder layers (:mod:`refimpl.model.block`; dense SwiGLU FFN in the first
``first_k_dense_replace`` layers, DeepSeekMoE after), a final RMSNorm and the LM head. Training
minimises the next-token cross-entropy plus the MoE balance loss (V3's complementary sequence-wise
loss, §2.1.2 eq. 17-20, or V2's expert-level loss, §2.2.3 eq. 23-25) plus, for V3, the
multi-token-prediction loss (§2.2, :mod:`refimpl.model.mtp`). Everything has a hand-written
backward pass; :func:`loss_forward` / :func:`loss_backward` are the training pair.

A config whose HF ``model_type`` is not a DeepSeek one (:func:`refimpl.attention.uses_mla` False)
and that has no routed experts builds a dense Llama-style decoder with standard MHA/GQA attention
instead, with the same functions (training, :func:`init_caches` / :func:`model_infer` decoding):
the dense students of DeepSeek-R1 §2.4 (:func:`refimpl.recipes.distill.dense_student_config`).

The parameter tree maps 1:1 onto hub tensor names (:func:`refimpl.model.checkpoint.param_names`)::

    {"model": {"embed_tokens": (V, D), "layers": [block params, ...], "norm": (D,)},
     "lm_head": (V, D),
     "mtp": [depth-module params, ...]}          # only with num_nextn_predict_layers > 0
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_int, check_upstream
from ..config import check_config
from ..core.cross_entropy import IGNORE_INDEX, CEGrad, cross_entropy
from ..core.linear import embedding_backward, embedding_forward, linear_backward, linear_forward
from ..core.rmsnorm import rmsnorm_backward, rmsnorm_forward
from ..moe import balance_backward, expert_balance_forward, seq_balance_forward
from ..tree import tree_map
from .block import block_backward, block_forward, block_infer
from .structure import check_params, init_params  # noqa: F401  (init_params: its old home)

BALANCE = ("auto", "seq", "expert", "none")


def check_input_ids(input_ids, config, name="input_ids"):
    """Token ids as a (B, T) int64 array in ``[0, vocab_size)`` with T <= max_position_embeddings."""
    check_config(config)
    ids = check_int(name, input_ids, low=0, high=config.vocab_size)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (B, T) with B >= 1 and T >= 1, got {ids.shape}")
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{name}: sequence length {ids.shape[1]} exceeds the configured maximum "
                         f"(max_position_embeddings={config.max_position_embeddings})")
    return ids


class ModelCache(NamedTuple):
    embed: object      # EmbeddingCache
    blocks: list       # BlockCache per layer
    norm: object       # RMSNormCache of the final norm
    head: object       # LinearCache of lm_head
    keys: tuple        # the params' top-level keys


def model_forward(input_ids, params, config, positions=None, *, backend=None, routes=None, validate=True):
    r"""Logits of every position (DeepSeek-V3 §2.1): :math:`z = W_{head}\,\mathrm{RMSNorm}(h^{(N)})`.

    Returns ``(logits, cache, info)``: ``info["moe"]`` is a list with one MoE info dict per layer
    (None for dense layers); ``info["hidden"]`` (B, T, D) is the final-normed hidden state that the
    head reads (what the MTP modules take as :math:`h^0`, as vLLM's DeepSeek MTP does).
    ``routes``: Keep Routing (DeepSeek-V3.2 §3.1), a list with one (B, T, K) array of recorded
    experts (e.g. ``info["moe"][n]["idx"]`` of the sampling policy) or None per layer.

    ``params`` is checked against ``config`` (:func:`~refimpl.model.structure.check_params`) unless
    ``validate=False`` (for callers that checked it once already).

    Shapes: input_ids (B, T) int64 -> logits (B, T, V) in the params' dtype.
    """
    ids = check_input_ids(input_ids, config)
    if validate:
        check_params(params, config)
    m = params["model"]
    h, c_emb = embedding_forward(ids, m["embed_tokens"])                 # (B, T, D)
    caches, infos = [], []
    if routes is not None and len(routes) != len(m["layers"]):
        raise ValueError(f"routes: expected one entry per layer ({len(m['layers'])}), got {len(routes)}")
    for n, lp in enumerate(m["layers"]):
        r = None if routes is None else routes[n]
        h, c, info = block_forward(h, lp, config, n, positions, backend=backend, routes=r)  # (B, T, D)
        caches.append(c)
        infos.append(info)
    hn, c_norm = rmsnorm_forward(h, m["norm"], config.rms_norm_eps)      # (B, T, D)
    logits, c_head = linear_forward(hn, params["lm_head"])               # (B, T, V)
    return logits, ModelCache(c_emb, caches, c_norm, c_head, tuple(params)), {"moe": infos, "hidden": hn}


def model_backward(dlogits, cache, dhidden=None, dscores=None):
    """Gradients of :func:`model_forward` for every parameter (a tree like ``params``; ``mtp``, if
    present in params, is not touched here: :func:`loss_backward` adds it).

    ``dhidden`` (B, T, D): extra gradient at ``info["hidden"]`` (from MTP); ``dscores``: list with
    one (B, T, E) array or None per layer (from the balance losses).
    """
    n_layers = len(cache.blocks)
    dscores = dscores or [None] * n_layers
    grads = {"model": {}}
    # forward: logits = hn @ lm_head.T
    dhn, grads["lm_head"], _ = linear_backward(dlogits, cache.head)      # (B, T, D)
    if dhidden is not None:
        dhn = dhn + dhidden                                              # (B, T, D)
    # forward: hn = rmsnorm(h, norm)
    dh, grads["model"]["norm"] = rmsnorm_backward(dhn, cache.norm)       # (B, T, D)
    layers = [None] * n_layers
    for n in reversed(range(n_layers)):
        # forward: h = block_n(h)
        dh, layers[n] = block_backward(dh, cache.blocks[n], dscores[n])  # (B, T, D)
    # forward: h = embed_tokens[ids]
    grads["model"]["embed_tokens"] = embedding_backward(dh, cache.embed)  # (V, D)
    grads["model"]["layers"] = layers
    grads["model"] = {k: grads["model"][k] for k in ("embed_tokens", "layers", "norm")}
    return grads


def shift_labels(labels):
    """Next-token targets: position t is trained to predict ``labels[t + 1]``; the last gets -100."""
    labels = check_int("labels", labels)
    if labels.ndim != 2:
        raise ValueError(f"labels: expected shape (B, T), got {labels.shape}")
    b = labels.shape[0]
    return np.concatenate([labels[:, 1:], np.full((b, 1), IGNORE_INDEX, dtype=np.int64)], axis=1)  # (B, T)


def _balance_kind(balance, config):
    if balance not in BALANCE:
        raise ValueError(f"balance: expected one of {BALANCE}, got {balance!r}")
    if balance == "auto":
        if not config.aux_loss_alpha:
            return "none"
        return "seq" if config.topk_method == "noaux_tc" else "expert"
    return balance


class LossCache(NamedTuple):
    model: ModelCache
    ce: CEGrad         # the next-token loss's dlogits (B, T, V) at dloss = 1, and its target count
    balance: list      # (layer, BalanceCache) per MoE layer with a balance loss
    mtp: object        # MTPCache or None
    n_layers: int


def loss_forward(input_ids, params, config, labels=None, *, positions=None, balance="auto", mtp_lambda=0.3,
                 backend=None, grad=True):
    r"""Training loss :math:`\mathcal{L} = \mathcal{L}_{LM} + \sum_{\ell\in MoE} \mathcal{L}^{(\ell)}_{Bal}
    + \mathcal{L}_{MTP}` (DeepSeek-V3 §2.1.2 eq. 17, §2.2 eq. 25).

    * :math:`\mathcal{L}_{LM}`: mean next-token cross-entropy, position t predicting ``labels[t+1]``
      (``labels`` default ``input_ids``; -100 is ignored, the HF convention).
    * ``balance``: ``"seq"`` is V3's sequence-wise loss with :math:`\alpha` = ``aux_loss_alpha``,
      ``"expert"`` V2's expert-level loss with :math:`\alpha_1` = ``aux_loss_alpha``, ``"none"``;
      ``"auto"`` picks seq for ``noaux_tc`` routers and expert otherwise (none if alpha is 0). Both are
      computed per sequence over all T tokens (``seq_aux=True``) using the routed experts.
    * :math:`\mathcal{L}_{MTP} = \tfrac{\lambda}{D}\sum_k \mathcal{L}^k_{MTP}` when params has ``"mtp"``
      and ``mtp_lambda > 0`` (V3 trains with :math:`\lambda` = 0.3, then 0.1).

    The cross-entropy is :func:`refimpl.core.cross_entropy`, whose gradient is computed here and
    kept in the cache; ``grad=False`` skips it (evaluation: :func:`loss_backward` then refuses).

    Returns ``(loss, cache, info)`` with ``info``: ``lm_loss``, ``balance_loss``, ``mtp_loss``,
    ``mtp_losses`` (per depth), ``load`` (list of (E,) expert loads of the MoE layers, in order),
    ``moe`` (per-layer info dicts).
    """
    ids = check_input_ids(input_ids, config)
    labels = ids if labels is None else check_int("labels", labels, low=0, high=config.vocab_size,
                                                   allow=IGNORE_INDEX)
    if labels.shape != ids.shape:
        raise ValueError(f"labels: expected shape {ids.shape} like input_ids, got {labels.shape}")
    check_params(params, config)
    logits, mcache, minfo = model_forward(ids, params, config, positions, backend=backend, validate=False)
    targets = shift_labels(labels)                                       # (B, T)
    lm_loss, dlogits = cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, backend=backend,
                                     grad=grad)                          # (), (B, T, V) or None
    c_ce = CEGrad(dlogits, int((targets != IGNORE_INDEX).sum()))
    kind = _balance_kind(balance, config)
    bal, c_bal = 0.0, []
    for n, info in enumerate(minfo["moe"]):
        if info is None or kind == "none":
            continue
        fwd = seq_balance_forward if kind == "seq" else expert_balance_forward
        lb, cb = fwd(info["scores"], info["idx"], config.aux_loss_alpha)
        bal += float(lb)
        c_bal.append((n, cb))
    info = {"lm_loss": float(lm_loss), "balance_loss": bal, "mtp_loss": 0.0, "mtp_losses": [],
            "load": [i["load"] for i in minfo["moe"] if i is not None], "moe": minfo["moe"]}
    c_mtp = None
    if params.get("mtp") and mtp_lambda > 0:
        from .mtp import mtp_forward
        mtp_loss, c_mtp, info_mtp = mtp_forward(minfo["hidden"], ids, labels, params, config, mtp_lambda,
                                                backend=backend, grad=grad)
        info.update(mtp_loss=float(mtp_loss), mtp_losses=info_mtp["losses"], mtp_load=info_mtp["load"])
    loss = info["lm_loss"] + bal + info["mtp_loss"]
    return np.asarray(loss, dtype=logits.dtype), LossCache(mcache, c_ce, c_bal, c_mtp, len(mcache.blocks)), info


def loss_backward(dloss, cache, params=None):
    """Gradients of :func:`loss_forward` for every parameter, a tree with the params' structure.

    ``dloss``: the upstream gradient of the loss (1.0 for the loss itself). ``params`` is needed
    only to give the MTP modules zero gradients when they were not used (``mtp_lambda=0``); without
    it the gradient tree then has no ``"mtp"`` entry.
    """
    if not isinstance(cache, LossCache):
        raise TypeError(f"cache: expected the LossCache of loss_forward, got {type(cache).__name__} "
                        f"(the signature is loss_backward(dloss, cache, params=None))")
    dloss = float(check_upstream("dloss", dloss, ()))
    if cache.ce.dlogits is None:
        raise ValueError("cache: loss_forward ran with grad=False (evaluation), so there is no gradient to return")
    dscores = [None] * cache.n_layers
    for n, cb in cache.balance:
        # forward: L += balance(scores_n, idx_n)
        dscores[n] = balance_backward(dloss, cb)                         # (B, T, E)
    dhidden, g_mtp = None, None
    if cache.mtp is not None:
        from .mtp import mtp_backward
        # forward: L += mtp(hidden, embed_tokens, lm_head, mtp params)
        dhidden, g_mtp, d_embed, d_head = mtp_backward(dloss, cache.mtp)  # (B, T, D)
    # forward: L = cross_entropy(logits[:, t], labels[:, t + 1])
    g = cache.ce.dlogits                                                 # (B, T, V) at dloss = 1
    dlogits = g if dloss == 1.0 else g * g.dtype.type(dloss)             # (B, T, V)
    grads = model_backward(dlogits, cache.model, dhidden, dscores)
    if g_mtp is not None:
        grads["model"]["embed_tokens"] = grads["model"]["embed_tokens"] + d_embed
        grads["lm_head"] = grads["lm_head"] + d_head
        grads["mtp"] = g_mtp
    elif params is not None and "mtp" in params:
        grads["mtp"] = tree_map(np.zeros_like, params["mtp"])
    return {k: grads[k] for k in cache.model.keys if k in grads}


def init_caches(config, batch_size, max_len, dtype=np.float64, n_layers=None):
    """One empty cache per layer: :class:`~refimpl.attention.LatentKVCache` for MLA, or a per-head
    :class:`~refimpl.attention.KVCache` (rotated keys and values of ``num_key_value_heads`` heads)
    for a standard-attention config (:func:`~refimpl.attention.uses_mla` False)."""
    from ..attention import init_kv_cache, init_latent_cache, uses_mla
    check_config(config)
    n = config.num_hidden_layers if n_layers is None else n_layers
    if not uses_mla(config):
        return [init_kv_cache(config, batch_size, max_len, dtype=dtype) for _ in range(n)]
    from ..attention import init_dsa_cache, uses_dsa
    if uses_dsa(config):                 # DeepSeek-V3.2: latent cache + indexer key cache per layer
        return [init_dsa_cache(config, batch_size, max_len, dtype) for _ in range(n)]
    return [init_latent_cache(config, batch_size, max_len, dtype) for _ in range(n)]


def model_infer(input_ids, params, config, caches, start_pos=0, *, impl="absorb", backend=None, validate=True):
    """Prefill / decode step with the caches of :func:`init_caches` (filled in place; latent caches
    for MLA, per-head KV caches for standard attention): logits and final-normed hidden of the new
    tokens at positions ``start_pos + arange(T)``.

    Shapes: input_ids (B, T) -> logits (B, T, V), hidden (B, T, D).
    """
    ids = check_input_ids(input_ids, config)
    if validate:   # generate checks once and decodes with validate=False
        check_params(params, config)
    if not isinstance(caches, list | tuple) or len(caches) != len(params["model"]["layers"]):
        raise TypeError(f"caches: expected one cache per layer from init_caches, got {type(caches).__name__}")
    for i, c in enumerate(caches):
        if not hasattr(c, "_fields"):
            raise TypeError(f"caches[{i}]: expected a cache from init_caches, got {type(c).__name__}")
    m = params["model"]
    h = m["embed_tokens"][ids]                                           # (B, T, D)
    for n, lp in enumerate(m["layers"]):
        h = block_infer(h, lp, config, n, caches[n], start_pos, impl=impl, backend=backend)  # (B, T, D)
    hn, _ = rmsnorm_forward(h, m["norm"], config.rms_norm_eps)           # (B, T, D)
    return hn @ params["lm_head"].T, hn                                  # (B, T, V), (B, T, D)
