r"""One pre-norm decoder layer of DeepSeek-V2/V3: RMSNorm -> MLA -> residual, RMSNorm -> FFN -> residual.

DeepSeek-V2 §2 (Figure 2) and DeepSeek-V3 §2.1 (Figure 2) stack identical layers whose attention is
multi-head latent attention and whose feed-forward network is a dense SwiGLU in the first
``first_k_dense_replace`` layers and DeepSeekMoE after that:

.. math:: u = h + \mathrm{MLA}(\mathrm{RMSNorm}(h)), \qquad h' = u + \mathrm{FFN}(\mathrm{RMSNorm}(u))

The same layer with standard attention (:mod:`refimpl.attention.mha`: MHA/GQA/MQA with RoPE) in
place of MLA is a Llama-style layer: that is what a config whose ``model_type`` is not a DeepSeek
one (:func:`~refimpl.attention.uses_mla`) builds, e.g. the dense students of DeepSeek-R1 §2.4
(Llama 3; Qwen2.5 with its q/k/v biases, see :func:`~refimpl.attention.mha.mha_bias_names`). Its
inference path keeps a per-head
:class:`~refimpl.attention.KVCache` instead of the latent one.

Parameters carry the HF names of one ``model.layers.N`` entry (leaves without the ``.weight``
suffix, as everywhere in refimpl)::

    {"input_layernorm": (D,), "self_attn": {MLA weights} or {"q_proj", "k_proj", "v_proj", "o_proj"},
     "post_attention_layernorm": (D,),
     "mlp": {"gate_proj", "up_proj", "down_proj"}            # dense layer
         or {"gate": {...}, "experts": {...}, "shared_experts": {...}}}   # MoE layer (stacked experts)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..attention import (
    init_mha_params,
    init_mla_params,
    mha_backward,
    mha_forward,
    mha_infer,
    mla_backward,
    mla_forward,
    mla_infer,
    uses_mla,
)
from ..attention.dsa import DSATrainCache, dsa_backward, dsa_forward, dsa_infer, init_dsa_params
from ..attention.indexer import uses_dsa
from ..attention.mha import MHACache, project
from ..core.activations import swiglu_forward, swiglu_mlp_backward, swiglu_mlp_forward
from ..core.rmsnorm import rmsnorm_backward, rmsnorm_forward
from ..moe import init_moe_params, moe_backward, moe_forward


class BlockCache(NamedTuple):
    norm1: object      # RMSNormCache of input_layernorm
    attn: object       # MLACache, or MHACache for a standard-attention layer
    norm2: object      # RMSNormCache of post_attention_layernorm
    ffn: object        # SwiGLUMLPCache (dense) or MoECache
    moe: bool          # which kind of FFN


def init_block_params(config, layer, rng, dtype=np.float64):
    """Random weights of layer ``layer`` (dense or MoE by :meth:`~refimpl.config.ModelConfig.is_moe_layer`;
    MLA, or MHA/GQA when :func:`~refimpl.attention.uses_mla` is False)."""
    d, i, std = config.hidden_size, config.intermediate_size, config.initializer_range
    normal = lambda *s: (std * rng.standard_normal(s)).astype(dtype)
    if config.is_moe_layer(layer):
        mlp = init_moe_params(config, rng, dtype=dtype)
    else:
        mlp = {"gate_proj": normal(i, d), "up_proj": normal(i, d), "down_proj": normal(d, i)}  # (I, D), (D, I)
        if config.extra.get("mlp_bias"):
            mlp.update(gate_proj_bias=np.zeros(i, dtype), up_proj_bias=np.zeros(i, dtype),
                       down_proj_bias=np.zeros(d, dtype))
    if uses_mla(config) and config.attention_bias:
        raise ValueError("config.attention_bias: MLA has no projection biases (DeepSeek-V2/V3); expected False")
    attn = init_mla_params(config, rng, dtype) if uses_mla(config) else init_mha_params(config, rng, dtype=dtype)
    if uses_dsa(config):                 # DeepSeek-V3.2: MLA plus the lightning indexer
        attn = init_dsa_params(config, rng, dtype)
    return {"input_layernorm": np.ones(d, dtype=dtype), "self_attn": attn,
            "post_attention_layernorm": np.ones(d, dtype=dtype), "mlp": mlp}


def block_forward(x, params, config, layer, positions=None, *, backend=None, routes=None):
    r"""Decoder layer ``layer`` (0-based) for training: :math:`h' = u + \mathrm{FFN}(\mathrm{RMSNorm}(u))`,
    :math:`u = h + \mathrm{MLA}(\mathrm{RMSNorm}(h))` (DeepSeek-V3 §2.1, Figure 2).

    Returns ``(y, cache, info)``; ``info`` is the MoE layer's info dict (``idx``, ``weights``,
    ``scores``, ``load``) or None for a dense layer. ``routes`` (B, T, K): recorded experts for an
    MoE layer (Keep Routing, :func:`~refimpl.moe.moe_forward`); ignored by a dense layer.

    Shapes: x (B, T, D), positions (T,) or (B, T) -> y (B, T, D).
    """
    eps = config.rms_norm_eps
    h1, c1 = rmsnorm_forward(x, params["input_layernorm"], eps)          # (B, T, D)
    attend = mla_forward if uses_mla(config) else mha_forward
    if uses_dsa(config):                 # DeepSeek-V3.2 sparse attention (refimpl.attention.dsa)
        attend = lambda *a: dsa_forward(*a)[:2]
    a, ca = attend(h1, params["self_attn"], config, positions)           # (B, T, D)
    u = x + a                                                            # (B, T, D)
    h2, c2 = rmsnorm_forward(u, params["post_attention_layernorm"], eps)  # (B, T, D)
    moe = config.is_moe_layer(layer)
    if moe:
        f, cf, info = moe_forward(h2, params["mlp"], config, backend=backend, routes=routes)  # (B, T, D)
    else:
        (f, cf), info = swiglu_mlp_forward(h2, params["mlp"]), None      # (B, T, D)
    return u + f, BlockCache(c1, ca, c2, cf, moe), info


def block_backward(dy, cache, dscores=None):
    """Gradients of :func:`block_forward`; ``dscores`` (B, T, E) from a balance loss (MoE layers only).

    Shapes: dy (B, T, D) -> dx (B, T, D), dparams with the layer's tree.
    """
    grads = {}
    # forward: y = u + ffn(rmsnorm(u))
    if cache.moe:
        dh2, grads["mlp"] = moe_backward(dy, cache.ffn, dscores)         # (B, T, D)
    else:
        dh2, grads["mlp"] = swiglu_mlp_backward(dy, cache.ffn)           # (B, T, D)
    dx_n2, grads["post_attention_layernorm"] = rmsnorm_backward(dh2, cache.norm2)  # (B, T, D)
    du = dy + dx_n2                                                      # (B, T, D)
    # forward: u = x + attention(rmsnorm(x))   (MLA, or MHA/GQA)
    attend_backward = mha_backward if isinstance(cache.attn, MHACache) else mla_backward
    if isinstance(cache.attn, DSATrainCache):
        attend_backward = dsa_backward
    dh1, grads["self_attn"] = attend_backward(du, cache.attn)            # (B, T, D)
    dx_n1, grads["input_layernorm"] = rmsnorm_backward(dh1, cache.norm1)  # (B, T, D)
    dx = du + dx_n1                                                      # (B, T, D)
    order = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    return dx, {k: grads[k] for k in order}


def block_infer(x, params, config, layer, kv_cache, start_pos=0, *, impl="absorb", backend=None):
    """The same layer for inference: MLA against a latent cache (:func:`~refimpl.attention.mla_infer`),
    or standard attention against a per-head :class:`~refimpl.attention.KVCache`
    (:func:`~refimpl.attention.mha_infer`; ``impl`` is then unused), filled in place at rows
    ``[start_pos, start_pos + T)``.

    Shapes: x (B, T, D), kv_cache.latent (B, Tmax, Dc + Dr) or kv_cache.k, .v (B, Hk, Tmax, Dh) -> y (B, T, D).
    """
    eps = config.rms_norm_eps
    h1, _ = rmsnorm_forward(x, params["input_layernorm"], eps)           # (B, T, D)
    if uses_dsa(config):                 # MLA latent cache + indexer key cache (a DSACache)
        a = dsa_infer(h1, params["self_attn"], config, kv_cache, start_pos, impl=impl)  # (B, T, D)
    elif uses_mla(config):               # by the config, as block_forward: a wrong cache is a TypeError
        a = mla_infer(h1, params["self_attn"], config, kv_cache, start_pos, impl=impl)  # (B, T, D)
    else:
        a = mha_infer(h1, params["self_attn"], config, kv_cache, start_pos)  # (B, T, D)
    u = x + a                                                            # (B, T, D)
    h2, _ = rmsnorm_forward(u, params["post_attention_layernorm"], eps)  # (B, T, D)
    if config.is_moe_layer(layer):
        f = moe_forward(h2, params["mlp"], config, backend=backend)[0]   # (B, T, D)
    else:
        f = dense_mlp_infer(h2, params["mlp"])                           # (B, T, D)
    return u + f


def dense_mlp_infer(x, params):
    """:func:`~refimpl.core.swiglu_mlp_forward` for inference: the same values without scanning the
    weights for NaN/inf at every call (which, at one decoded token, would read each weight three
    times instead of once) and without a cache. Shapes: x (B, T, D) -> (B, T, D)."""
    g, _ = project(x, params["gate_proj"], params.get("gate_proj_bias"))  # (B, T, I)
    u, _ = project(x, params["up_proj"], params.get("up_proj_bias"))    # (B, T, I)
    h, _ = swiglu_forward(g, u)                                          # (B, T, I)
    return project(h, params["down_proj"], params.get("down_proj_bias"))[0]  # (B, T, D)
