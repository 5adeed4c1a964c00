"""Attention: the MHA/GQA/MQA baselines, multi-head latent attention (MLA) and their KV caches.

DeepSeek-V2 §2.1 motivates MLA by the KV cache: :mod:`.kv_cache` counts what each scheme caches,
:mod:`.mha` is the baseline family (and the shared causal attention core), :mod:`.mla` is MLA with
its training backward and its naive and absorbed inference paths; :mod:`.indexer` and :mod:`.dsa`
are DeepSeek-V3.2's lightning indexer and sparse attention.
"""

from .dsa import (
    DSACache,
    dsa_backward,
    dsa_forward,
    dsa_indexer_loss,
    dsa_infer,
    init_dsa_cache,
    init_dsa_params,
)
from .indexer import index_dims, indexer_param_shapes, select_topk, uses_dsa
from .kv_cache import (
    SCHEMES,
    KVCache,
    LatentKVCache,
    default_head_dim,
    default_scheme,
    init_kv_cache,
    init_latent_cache,
    kv_cache_bytes,
    kv_cache_elements_per_token,
    uses_mla,
)
from .mha import (
    causal_mask,
    init_mha_params,
    mha_backward,
    mha_forward,
    mha_infer,
    mha_param_shapes,
    sdpa_backward,
    sdpa_forward,
)
from .mla import (
    LATENT_NORM_EPS,
    absorbed_weights,
    init_mla_params,
    mla_backward,
    mla_forward,
    mla_infer,
    mla_param_shapes,
)

__all__ = [
    "SCHEMES", "KVCache", "LatentKVCache", "default_head_dim", "default_scheme", "init_kv_cache",
    "init_latent_cache", "kv_cache_bytes", "kv_cache_elements_per_token", "uses_mla",
    "causal_mask", "init_mha_params", "mha_backward", "mha_forward", "mha_infer", "mha_param_shapes",
    "sdpa_backward", "sdpa_forward",
    "LATENT_NORM_EPS", "absorbed_weights", "init_mla_params", "mla_backward", "mla_forward", "mla_infer",
    "mla_param_shapes",
    "DSACache", "dsa_backward", "dsa_forward", "dsa_indexer_loss", "dsa_infer", "init_dsa_cache", "init_dsa_params",
    "index_dims", "indexer_param_shapes", "select_topk", "uses_dsa",
]
