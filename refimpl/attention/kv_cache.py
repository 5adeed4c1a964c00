"""KV caches for decoding, and how many bytes each attention scheme caches per token.

A decoder generating token ``t`` needs every earlier token's keys and values in every layer, so
it keeps them in a cache whose size grows with context x batch x layers. That cache, not the
weights, is what limits batch size and context length when serving (DeepSeek-V2 §2.1). Per
token and layer the schemes cache (DeepSeek-V2 Table 1):

==========  ======================  ==========================================
MHA         ``2 H Dh``              a key and a value for every head
GQA         ``2 Hk Dh``             one key/value head per group of H/Hk heads
MQA         ``2 Dh``                one key/value head for all heads
MLA         ``Dc + Dr``             the KV latent and the shared rope key
==========  ======================  ==========================================

MLA's cache is :class:`LatentKVCache`: per token the latent ``c_KV`` *after* ``kv_a_layernorm``
and the rope key ``k_R`` *after* rotation, 512 + 64 = 576 values for V2/V3 whatever the head
count (DeepSeek-V2 §2.1.2 eq. 9-17). The baselines use :class:`KVCache` with rotated keys.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import FLOAT_DTYPES, check_int, check_integer, check_real
from ..config import check_config

#: ``model_type`` values whose attention is MLA; any other (e.g. ``"llama"`` for DeepSeek LLM 67B)
#: means standard MHA/GQA/MQA with ``num_key_value_heads`` key/value heads.
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
SCHEMES = ("mha", "gqa", "mqa", "mla", "mla_naive")


def uses_mla(config) -> bool:
    """True unless the config's HF ``model_type`` (kept in ``config.extra``) names a non-MLA model.

    A :class:`~refimpl.config.ModelConfig` is a DeepSeek-V2/V3 config, so MLA is the default;
    the ``"deepseek-67b"`` preset carries ``model_type="llama"`` as its HF ``config.json`` does.
    """
    return config.extra.get("model_type", "deepseek_v3") in MLA_MODEL_TYPES


def default_head_dim(config) -> int:
    """Per-head dimension ``Dh`` of the paper's MHA/GQA/MQA formulas for ``config``.

    For a standard-attention model: ``extra["head_dim"]`` if present, else
    ``hidden_size // num_attention_heads`` (transformers' Llama rule; 128 for DeepSeek LLM 67B).
    For an MLA model: ``v_head_dim``, the paper's :math:`d_h` (= ``qk_nope_head_dim`` = 128 in
    every released model; DeepSeek-V2 §2.1.2 sets :math:`d_c = 4 d_h`, :math:`d_h^R = d_h / 2`).
    """
    if uses_mla(config):
        return int(config.v_head_dim)
    return int(config.extra.get("head_dim") or config.hidden_size // config.num_attention_heads)


def default_scheme(config) -> str:
    """The scheme ``config`` describes: ``"mla"``, or ``"mha"``/``"gqa"``/``"mqa"`` by its KV heads."""
    if uses_mla(config):
        return "mla"
    hk = config.num_key_value_heads
    return "mha" if hk == config.num_attention_heads else "mqa" if hk == 1 else "gqa"


def kv_cache_elements_per_token(config, scheme=None, *, per_layer=False) -> int:
    r"""Values cached per token (all layers, or one with ``per_layer=True``).

    ``scheme`` (default :func:`default_scheme`) is one of:

    * ``"mha"``: :math:`2 H D_h`; ``"gqa"``: :math:`2 H_k D_h` (``num_key_value_heads``);
      ``"mqa"``: :math:`2 D_h` (DeepSeek-V2 Table 1, :math:`D_h` from :func:`default_head_dim`);
    * ``"mla"``: :math:`D_c + D_r` (``kv_lora_rank + qk_rope_head_dim``; 576 for V2/V3);
    * ``"mla_naive"``: :math:`H (D_n + D_r + D_v)`, per-head decompressed keys and values, what
      DeepSeek's ``attn_impl="naive"`` caches (40,960 for V3).
    """
    h, dh = config.num_attention_heads, default_head_dim(config)
    scheme = default_scheme(config) if scheme is None else scheme
    if scheme == "mha":
        n = 2 * h * dh
    elif scheme == "gqa":
        n = 2 * config.num_key_value_heads * dh
    elif scheme == "mqa":
        n = 2 * dh
    elif scheme == "mla":
        n = config.kv_lora_rank + config.qk_rope_head_dim
    elif scheme == "mla_naive":
        n = h * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    return n if per_layer else n * config.num_hidden_layers


def kv_cache_bytes(config, context=1, *, batch_size=1, bytes_per_element=2.0, scheme=None) -> float:
    """Cache bytes for ``batch_size`` sequences of ``context`` tokens through all layers.

    ``bytes_per_element`` is 2 for bf16/fp16 (the default), 4 for float32, 1 for FP8, and 0.75
    for the "6 bits on average" quantised cache DeepSeek-V2 deployed (§3.2.3).
    """
    check_config(config)
    check_real("bytes_per_element", bytes_per_element, low=0.0, low_open=True)
    check_real("context", context, low=0.0)
    check_real("batch_size", batch_size, low=0.0)
    return kv_cache_elements_per_token(config, scheme) * context * batch_size * bytes_per_element


def check_positions(positions, b, t, max_position_embeddings, name="positions"):
    """Broadcast positions to (B, T) int64 in ``[0, max_position_embeddings)``; default arange(T)."""
    if positions is None:
        positions = np.arange(t)
    positions = check_int(name, positions, low=0)
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"{name}: expected shape ({t},) or ({b}, {t}), got {positions.shape}")
    if positions.size and positions.max() >= max_position_embeddings:
        raise ValueError(f"{name}: position {int(positions.max())} is past the configured maximum "
                         f"(max_position_embeddings={max_position_embeddings})")
    return np.broadcast_to(positions, (b, t))                           # (B, T)


class KVCache(NamedTuple):
    """Per-head rotated keys and values of one layer (MHA/GQA/MQA), head-major for fast decode."""
    k: np.ndarray      # (B, Hk, Tmax, Dh) keys after RoPE
    v: np.ndarray      # (B, Hk, Tmax, Dh) values

    @property
    def values_per_token(self) -> int:
        return self.k.shape[1] * (self.k.shape[3] + self.v.shape[3])


class LatentKVCache(NamedTuple):
    """MLA's cache for one layer: each row is ``[c_KV (Dc) | k_R (Dr)]``.

    ``c_KV`` is the KV latent after ``kv_a_layernorm``; ``k_R`` is the shared rope key after
    rotation, in refimpl's adjacent-pair layout (transformers' DeepSeek-V3 stores it permuted by
    :func:`~refimpl.core.deinterleave_perm`). One contiguous row lets the absorbed path score
    against ``[c_KV | k_R]`` in one product and read values from its first ``Dc`` columns, the
    layout of FlashMLA's 576-wide key / 512-wide value.
    """
    latent: np.ndarray  # (B, Tmax, Dc + Dr)
    kv_lora_rank: int

    @property
    def c_kv(self) -> np.ndarray:
        return self.latent[..., :self.kv_lora_rank]                     # (B, Tmax, Dc)

    @property
    def k_pe(self) -> np.ndarray:
        return self.latent[..., self.kv_lora_rank:]                     # (B, Tmax, Dr)

    @property
    def values_per_token(self) -> int:
        return self.latent.shape[-1]


def _check_alloc(batch_size, max_len, dtype):
    for name, v in (("batch_size", batch_size), ("max_len", max_len)):
        check_integer(name, v, low=1)
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {np.dtype(dtype)}")


def init_latent_cache(config, batch_size, max_len, dtype=np.float64) -> LatentKVCache:
    """An empty (zero) MLA cache for one layer: ``kv_lora_rank + qk_rope_head_dim`` values per token."""
    check_config(config)
    _check_alloc(batch_size, max_len, dtype)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    return LatentKVCache(np.zeros((batch_size, max_len, width), dtype=dtype), int(config.kv_lora_rank))


def init_kv_cache(config, batch_size, max_len, *, head_dim=None, dtype=np.float64) -> KVCache:
    """An empty per-head cache for the baseline with ``num_key_value_heads`` heads."""
    _check_alloc(batch_size, max_len, dtype)
    dh = default_head_dim(config) if head_dim is None else head_dim
    shape = (batch_size, config.num_key_value_heads, max_len, dh)
    return KVCache(np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype))
