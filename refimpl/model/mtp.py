r"""Multi-token prediction (MTP), DeepSeek-V3 §2.2 (eq. 21-25), and MTP as a speculative-decoding draft.

V3 adds ``D`` sequential depth modules after the main model. Depth ``k`` combines the previous
depth's representation of position ``i`` with the embedding of token ``i + k`` and predicts token
``i + k + 1``, keeping the causal chain (unlike parallel heads). Module ``k`` owns two RMSNorms, a
projection :math:`M_k \in \mathbb{R}^{D\times 2D}` and a full decoder layer; the embedding and the
output head are shared with the main model:

.. math::
    h'^k_i = M_k[\mathrm{RMSNorm}(\mathrm{Emb}(t_{i+k})); \mathrm{RMSNorm}(h^{k-1}_i)],\quad
    h^k = \mathrm{TRM}_k(h'^k),\quad P^k_{i+k+1} = \mathrm{softmax}(\mathrm{Head}(\mathrm{RMSNorm}(h^k_i)))

with :math:`\mathcal{L}_{MTP} = \frac{\lambda}{D}\sum_k \mathcal{L}^k_{MTP}`, each a mean
cross-entropy over its positions. Implementation choices (reference §5): the **embedding comes
first** in the concatenation (the paper writes :math:`[h; \mathrm{emb}]`; the released weights and
vLLM use ``eh_proj(cat[enorm(emb), hnorm(h)])``); the head is preceded by the module's
``shared_head.norm`` (as the released weights); :math:`h^0` is the main model's final-normed hidden
state (vLLM). Checkpoint names live under ``model.layers.{N + k - 1}`` (``enorm``, ``hnorm``,
``eh_proj``, the layer's usual tensors, ``shared_head.norm``); see :mod:`refimpl.model.checkpoint`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_upstream
from ..core.cross_entropy import IGNORE_INDEX, CEGrad, cross_entropy
from ..core.linear import embedding_backward, embedding_forward, linear_backward, linear_forward
from ..core.rmsnorm import rmsnorm_backward, rmsnorm_forward
from .block import block_backward, block_forward, block_infer, init_block_params

BLOCK_KEYS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def init_mtp_params(config, rng, dtype=np.float64):
    """``num_nextn_predict_layers`` depth modules (layer index ``N + k - 1`` decides dense vs MoE)."""
    d, std, n = config.hidden_size, config.initializer_range, config.num_hidden_layers
    out = []
    for k in range(max(config.num_nextn_predict_layers, 1)):
        p = {"enorm": np.ones(d, dtype=dtype), "hnorm": np.ones(d, dtype=dtype),
             "eh_proj": (std * rng.standard_normal((d, 2 * d))).astype(dtype)}   # (D, 2D)
        p.update(init_block_params(config, n + k, rng, dtype))
        p["shared_head"] = {"norm": np.ones(d, dtype=dtype)}
        out.append(p)
    return out


class DepthCache(NamedTuple):
    embed: object
    enorm: object
    hnorm: object
    proj: object
    block: object
    norm: object
    head: object
    ce: object             # CEGrad: dlogits (B, Tk, V) of this depth's scaled loss at dloss = 1, target count
    t_prev: int        # length of h^{k-1}


class MTPCache(NamedTuple):
    depths: list
    scale: float       # lambda / D
    keys: list         # per-depth param keys, for the gradient tree's order


def mtp_forward(hidden, input_ids, labels, params, config, mtp_lambda=0.3, *, backend=None, grad=True):
    r"""The MTP loss :math:`\frac{\lambda}{D}\sum_k \mathcal{L}^k_{MTP}` (DeepSeek-V3 eq. 21-25).

    Depth ``k`` runs on ``T - k`` positions: position ``i`` reads ``hidden``/:math:`h^{k-1}` at ``i``
    and ``input_ids[:, i + k]`` and predicts ``labels[:, i + k + 1]`` (the last position has no
    target). Returns ``(loss, cache, info)`` with ``info["losses"]`` (per depth, unweighted) and
    ``info["load"]`` (expert loads of MoE depth blocks).

    Shapes: hidden (B, T, D), input_ids / labels (B, T) -> loss ().
    """
    depths = params["mtp"]
    b, t, _ = hidden.shape
    if t <= len(depths):
        raise ValueError(f"input_ids: MTP with {len(depths)} depths needs T > {len(depths)}, got T={t}")
    emb, head, eps = params["model"]["embed_tokens"], params["lm_head"], config.rms_norm_eps
    scale = mtp_lambda / len(depths)
    h_prev, caches, losses, loads, total = hidden, [], [], [], 0.0
    for k, mp in enumerate(depths, start=1):
        tk = t - k
        e, c_e = embedding_forward(input_ids[:, k:], emb)                  # (B, Tk, D)
        en, c_en = rmsnorm_forward(e, mp["enorm"], eps)                    # (B, Tk, D)
        hh, c_hn = rmsnorm_forward(h_prev[:, :tk], mp["hnorm"], eps)       # (B, Tk, D)
        x, c_p = linear_forward(np.concatenate([en, hh], axis=-1), mp["eh_proj"])  # (B, Tk, D)
        y, c_b, info = block_forward(x, mp, config, config.num_hidden_layers + k - 1, backend=backend)
        yn, c_n = rmsnorm_forward(y, mp["shared_head"]["norm"], eps)       # (B, Tk, D)
        logits, c_h = linear_forward(yn, head)                             # (B, Tk, V)
        tgt = np.concatenate([labels[:, k + 1:], np.full((b, 1), IGNORE_INDEX, dtype=np.int64)], axis=1)  # (B, Tk)
        # the depth's loss enters L with weight scale: its gradient is made with dloss = scale
        lk, dlogits = cross_entropy(logits, tgt, scale, backend=backend, grad=grad)  # (), (B, Tk, V) or None
        c_ce = CEGrad(dlogits, int((tgt != IGNORE_INDEX).sum()))
        losses.append(float(lk))
        total += scale * float(lk)
        if info is not None:
            loads.append(info["load"])
        caches.append(DepthCache(c_e, c_en, c_hn, c_p, c_b, c_n, c_h, c_ce, h_prev.shape[1]))
        h_prev = y
    return (np.asarray(total, dtype=hidden.dtype), MTPCache(caches, scale, [list(mp) for mp in depths]),
            {"losses": losses, "load": loads})


def mtp_backward(dloss, cache):
    """Gradients of :func:`mtp_forward`: ``(dhidden, dparams_mtp, dembed_tokens, dlm_head)``."""
    dloss = float(check_upstream("dloss", dloss, ()))
    if cache.depths and cache.depths[0].ce.dlogits is None:
        raise ValueError("cache: mtp_forward ran with grad=False (evaluation), so there is no gradient to return")
    d = cache.depths[0].enorm.x.shape[-1]
    grads, dembed, dhead, dy_next = [None] * len(cache.depths), 0.0, 0.0, None
    for k in reversed(range(len(cache.depths))):
        c, g = cache.depths[k], {}
        # forward: L += scale * cross_entropy(head(shared_head.norm(y)), tgt)
        d1 = c.ce.dlogits                                                 # (B, Tk, V) at dloss = 1
        dlogits = d1 if dloss == 1.0 else d1 * d1.dtype.type(dloss)       # (B, Tk, V)
        dyn, dh_k, _ = linear_backward(dlogits, c.head)                   # (B, Tk, D)
        dhead = dhead + dh_k
        dy, dnorm = rmsnorm_backward(dyn, c.norm)                         # (B, Tk, D)
        g["shared_head"] = {"norm": dnorm}
        if dy_next is not None:
            dy = dy + dy_next                                             # h^k also feeds depth k+1
        # forward: y = block(x)
        dx, gb = block_backward(dy, c.block)                              # (B, Tk, D)
        g.update(gb)
        # forward: x = eh_proj(cat[enorm(emb), hnorm(h_prev[:, :Tk])])
        dcat, g["eh_proj"], _ = linear_backward(dx, c.proj)               # (B, Tk, 2D)
        de, g["enorm"] = rmsnorm_backward(dcat[..., :d], c.enorm)         # (B, Tk, D)
        dhh, g["hnorm"] = rmsnorm_backward(dcat[..., d:], c.hnorm)        # (B, Tk, D)
        dembed = dembed + embedding_backward(de, c.embed)                 # (V, D)
        dy_next = np.zeros(dhh.shape[:1] + (c.t_prev,) + dhh.shape[2:], dtype=dhh.dtype)  # (B, T_{k-1}, D)
        dy_next[:, :dhh.shape[1]] = dhh
        grads[k] = {key: g[key] for key in cache.keys[k]}
    return dy_next, grads, dembed, dhead


def mtp_draft_step(hidden, next_ids, params, config, depth_cache, start_pos, *, impl="absorb"):
    """Depth-1 module at inference: logits for the token after ``next_ids`` from the main model's
    hidden states at positions ``start_pos + arange(T)`` (fills ``depth_cache`` in place).

    Shapes: hidden (B, T, D), next_ids (B, T) -> logits (B, T, V).
    """
    mp, eps = params["mtp"][0], config.rms_norm_eps
    en, _ = rmsnorm_forward(params["model"]["embed_tokens"][next_ids], mp["enorm"], eps)  # (B, T, D)
    hh, _ = rmsnorm_forward(hidden, mp["hnorm"], eps)                   # (B, T, D)
    x = np.concatenate([en, hh], axis=-1) @ mp["eh_proj"].T               # (B, T, D)
    y = block_infer(x, mp, config, config.num_hidden_layers, depth_cache, start_pos, impl=impl)  # (B, T, D)
    yn, _ = rmsnorm_forward(y, mp["shared_head"]["norm"], eps)           # (B, T, D)
    return yn @ params["lm_head"].T                                       # (B, T, V)
