r"""What it costs: parameters, FLOPs, KV-cache bytes, memory and GPU-hours from a config.

Every figure here is computed from a :class:`~refimpl.config.ModelConfig`, so the published claims
can be checked from the configs themselves: 236B total / 21B active (DeepSeek-V2 §1, App. B), 671B /
37B plus a 14B MTP module (DeepSeek-V3 §1, §4.2), the 93.3% smaller KV cache than DeepSeek 67B
(DeepSeek-V2 §1, §3.2.3: the deployed cache is quantised to about 6 bits per element), and
2.788M H800 GPU-hours = $5.576M at $2 per GPU-hour (DeepSeek-V3 §1, Table 1). V3's precision plan
(FP32 master weights and gradient accumulation, BF16 AdamW moments) is DeepSeek-V3 §3.3.3.

Conventions. A multiply-add is 2 FLOPs; norms, activations, softmax and residual adds are not
counted (they are O(D) per token, not O(D^2)). *Active* parameters are those one token's forward pass
multiplies with: ``K`` of ``E`` routed experts and the LM head, not the embedding row lookup
(:func:`refimpl.moe.count_parameters`). The 6N estimate is ``2 N_active`` forward and ``6 N_active``
training (backward = 2x forward). The exact count adds attention's context term: per layer and
token, scores and values cost ``2 T_ctx H (Dqk + Dv)`` for MLA computed naively (training), and
``2 T_ctx H (2 Dc + Dr)`` absorbed (decoding against the latent cache). In causal training token ``t``
of ``T`` attends to ``t`` keys, so the average context is ``(T + 1) / 2`` (an ideal causal kernel
that skips masked pairs). Multi-token prediction (V3 §2.2) is counted apart.

Presets: :func:`get_config` reads :data:`refimpl.config.PRESETS` (DeepSeek 67B, V2-Lite, V2, V3) and
:data:`DENSE_PRESETS` (a Llama-3-70B-like and a Qwen2.5-32B-like dense GQA peer).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .attention.kv_cache import default_head_dim, kv_cache_bytes, uses_mla
from .config import PRESETS, ModelConfig
from .moe.params import count_parameters

#: Bytes per element of each precision name; ``"6bit"`` is DeepSeek-V2's quantised KV cache (§3.2.3).
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "6bit": 0.75}

#: Dense tensor-core peaks (FLOP/s, no sparsity) of an H800 SXM, equal to the H100 SXM's: the H800
#: differs in NVLink bandwidth, not compute (NVIDIA H100 datasheet).
H800_PEAK_FLOPS = {"bf16": 989e12, "fp8": 1979e12}

#: DeepSeek-V3 Table 1: H800 GPU-hours by stage (total 2.788M) and the assumed rental price.
V3_GPU_HOURS = {"pre_training": 2_664_000, "context_extension": 119_000, "post_training": 5_000}
V3_USD_PER_GPU_HOUR = 2.0
V3_TRAINING_TOKENS = 14.8e12

_GQA = dict(q_lora_rank=None, n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0, n_group=1,
            topk_group=1, num_experts_per_tok=1, rope_scaling=None, head_dim=128)
#: Dense GQA peers, expressed as the ``"deepseek-67b"`` preset expresses a dense model (no experts,
#: HF ``model_type`` in ``extra``). Shapes from their HF ``config.json``; "-like": only the fields
#: accounting needs are meant to be faithful.
DENSE_PRESETS = {
    "llama-3-70b-like": dict(_GQA, model_type="llama", vocab_size=128256, hidden_size=8192,
                             intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                             num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                             rms_norm_eps=1e-5),
    # Qwen2 has biases on the q/k/v projections (not on o_proj): attention_bias=True.
    "qwen2.5-32b-like": dict(_GQA, model_type="qwen2", vocab_size=152064, hidden_size=5120,
                             intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                             num_key_value_heads=8, attention_bias=True, rope_theta=1e6,
                             max_position_embeddings=32768, rms_norm_eps=1e-6),
}

COMPONENTS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "norms_router",
              "lm_head")


def get_config(name: str) -> ModelConfig:
    """A preset from :data:`refimpl.config.PRESETS` or :data:`DENSE_PRESETS`."""
    if name in DENSE_PRESETS:
        return ModelConfig.from_dict(DENSE_PRESETS[name])
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {sorted(PRESETS) + sorted(DENSE_PRESETS)}, got {name!r}")
    return ModelConfig.preset(name)


def _attention_layer(c):
    """(parameters, of which matmul weights) of one attention layer: MLA, or MHA/GQA/MQA."""
    if uses_mla(c):
        per_layer = count_parameters(c)["attention"] // c.num_hidden_layers
        return per_layer, per_layer - (c.q_lora_rank or 0) - c.kv_lora_rank   # minus the two latent norms
    h, hk, dh, d = c.num_attention_heads, c.num_key_value_heads, default_head_dim(c), c.hidden_size
    weights = 2 * h * dh * d + 2 * hk * dh * d                                 # q, o; k, v
    return weights + ((h + 2 * hk) * dh if c.attention_bias else 0), weights   # q/k/v biases (Qwen2)


def parameter_counts(config: ModelConfig) -> dict:
    """Total and active parameters, by component, with the MTP module counted apart.

    Returns ``{"total": N, "active": N_active, "components": {name: {"total", "active"}}, "mtp":
    {"total", "active"}}`` with ``name`` in :data:`COMPONENTS`. For MLA models the totals are those
    of :func:`refimpl.moe.count_parameters`; for MHA/GQA models the attention is re-counted (q, k, v,
    o and any q/k/v biases). ``norms_router`` holds every RMSNorm outside attention and the MoE gates.
    MTP ``total`` is its unique parameters (``enorm``, ``hnorm``, ``eh_proj``, one MoE decoder layer,
    ``shared_head.norm``; embedding and head are shared, V3 README_WEIGHTS); ``active`` adds the
    shared head, which the MTP pass multiplies with again.
    """
    c = config
    p = count_parameters(c)
    attn, _ = _attention_layer(c)
    active_routed = p["moe_routed_active"]
    comp = {
        "embedding": (p["embedding"], 0),
        "attention": (attn * c.num_hidden_layers,) * 2,
        "dense_ffn": (p["dense_ffn"],) * 2,
        "routed_experts": (p["moe_routed"], active_routed),
        "shared_experts": (p["moe_shared"],) * 2,
        "norms_router": (p["norms"] + p["moe_gate"],) * 2,
        "lm_head": (p["lm_head"],) * 2,
    }
    if c.tie_word_embeddings:                         # the tied table is the head: it multiplies
        comp["embedding"] = (p["embedding"], p["embedding"])
    total, active = (sum(v[i] for v in comp.values()) for i in (0, 1))
    d, i, e, k = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    n = c.num_nextn_predict_layers
    gate = e * d + (e if c.topk_method == "noaux_tc" else 0)
    shared = 3 * d * i * c.n_shared_experts + gate + attn + 2 * d * d + 5 * d  # 5 norms: e/h, 2 block, head
    mtp_total = n * (shared + 3 * d * i * e)
    mtp_active = n * (shared + 3 * d * i * k + c.vocab_size * d)
    return {"total": int(total), "active": int(active),
            "components": {name: {"total": int(t), "active": int(a)} for name, (t, a) in comp.items()},
            "mtp": {"total": int(mtp_total), "active": int(mtp_active)}}


def _attention_context_flops(c, context, attention_impl):
    h = c.num_attention_heads
    if not uses_mla(c):
        return 2 * context * h * 2 * default_head_dim(c)
    if attention_impl == "naive":
        return 2 * context * h * (c.qk_head_dim + c.v_head_dim)
    if attention_impl == "absorbed":
        return 2 * context * h * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    raise ValueError(f"attention_impl: expected 'naive' or 'absorbed', got {attention_impl!r}")


def forward_flops_per_token(config: ModelConfig, context: float = 0.0, *, attention_impl: str = "naive") -> dict:
    r"""Exact forward FLOPs of one token attending to ``context`` keys, by component.

    :math:`2 \times` the active matmul weights per component (norm gains, biases and the
    ``noaux_tc`` gate bias excluded), plus ``attention_context`` (see the module docstring). Keys:
    ``attention``, ``attention_context``, ``dense_ffn``, ``routed_experts``, ``shared_experts``,
    ``router``, ``lm_head``, ``total``, and ``mtp`` (one MTP pass incl. its head and context term;
    not in ``total``).
    """
    c = config
    if not context >= 0:
        raise ValueError(f"context: expected a non-negative number of keys, got {context!r}")
    comp = parameter_counts(c)["components"]
    _, attn_w = _attention_layer(c)
    n_moe = sum(c.is_moe_layer(layer) for layer in range(c.num_hidden_layers))
    ctx = _attention_context_flops(c, context, attention_impl)
    out = {"attention": 2 * attn_w * c.num_hidden_layers, "attention_context": ctx * c.num_hidden_layers,
           "dense_ffn": 2 * comp["dense_ffn"]["active"], "routed_experts": 2 * comp["routed_experts"]["active"],
           "shared_experts": 2 * comp["shared_experts"]["active"],
           "router": 2 * n_moe * c.n_routed_experts * c.hidden_size,
           "lm_head": 2 * c.vocab_size * c.hidden_size}
    out["total"] = sum(out.values())
    d, i = c.hidden_size, c.moe_intermediate_size
    per_mtp = attn_w + 2 * d * d + 3 * d * i * (c.num_experts_per_tok + c.n_shared_experts)
    per_mtp += c.n_routed_experts * d + c.vocab_size * d
    out["mtp"] = c.num_nextn_predict_layers * (2 * per_mtp + ctx)
    return out


def training_flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True, mtp: bool = False) -> float:
    """Exact training FLOPs per token: 3x the forward (backward = 2x forward) on sequences of
    ``seq_len``, at average context ``(seq_len + 1) / 2`` if ``causal`` else ``seq_len``; naive MLA."""
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len!r}")
    f = forward_flops_per_token(config, (seq_len + 1) / 2 if causal else seq_len)
    return 3 * (f["total"] + (f["mtp"] if mtp else 0))


def six_n_flops_per_token(config: ModelConfig) -> dict:
    """The 6N-style estimate: ``forward = 2 N_active``, ``training = 6 N_active`` (no context term)."""
    n = parameter_counts(config)["active"]
    return {"forward": 2 * n, "training": 6 * n}


def _bytes(name, precision):
    if isinstance(precision, str) and precision in PRECISION_BYTES:
        return PRECISION_BYTES[precision]
    raise ValueError(f"{name}: expected one of {sorted(PRECISION_BYTES)}, got {precision!r}")


def kv_cache_bytes_per_token(config: ModelConfig, cache_dtype: str = "bf16", *, scheme: str | None = None) -> float:
    """KV-cache bytes per token over all layers (:func:`refimpl.attention.kv_cache.kv_cache_bytes`)."""
    return kv_cache_bytes(config, 1, bytes_per_element=_bytes("cache_dtype", cache_dtype), scheme=scheme)


@dataclass(frozen=True)
class PrecisionPlan:
    """Storage precision of each training-state tensor; ``master=None`` means no separate master copy."""
    weights: str = "bf16"
    master: str | None = "fp32"
    grads: str = "fp32"
    adam_m: str = "bf16"
    adam_v: str = "bf16"

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not (f.name == "master" and v is None):
                _bytes(f.name, v)


#: DeepSeek-V3 §3.3.3: BF16 working weights (cast to FP8 per GEMM), FP32 master weights and gradient
#: accumulation, BF16 AdamW moments.
V3_PLAN = PrecisionPlan()
#: The classic mixed-precision plan (bf16 weights + fp32 master, grads and both Adam moments): 18 bytes/parameter.
FP32_ADAM_PLAN = PrecisionPlan(weights="bf16", master="fp32", grads="fp32", adam_m="fp32", adam_v="fp32")


def training_memory_bytes(config: ModelConfig, plan: PrecisionPlan = V3_PLAN, *, mtp: bool = False) -> dict:
    """Bytes of weights, master copy, gradients and AdamW moments over all (total) parameters.

    Activations, KV cache and framework buffers are not included; nor is any sharding.
    """
    if not isinstance(plan, PrecisionPlan):
        raise ValueError(f"plan: expected a PrecisionPlan, got {type(plan).__name__}")
    p = parameter_counts(config)
    n = p["total"] + (p["mtp"]["total"] if mtp else 0)
    out = {"weights": n * _bytes("weights", plan.weights),
           "master": 0.0 if plan.master is None else n * _bytes("master", plan.master),
           "grads": n * _bytes("grads", plan.grads),
           "optimizer": n * (_bytes("adam_m", plan.adam_m) + _bytes("adam_v", plan.adam_v))}
    out["total"] = sum(out.values())
    return out


def _positive(name, v):
    if not (isinstance(v, int | float) and v > 0):
        raise ValueError(f"{name}: expected a positive number, got {v!r}")


def gpu_hours(tokens: float, flops_per_token: float, *, peak_flops: float, utilisation: float) -> float:
    r"""GPU-hours :math:`= \text{tokens} \cdot \text{FLOPs/token} / (\text{peak} \cdot \text{MFU}) / 3600`."""
    if not (isinstance(tokens, int | float) and tokens >= 0):
        raise ValueError(f"tokens: expected a non-negative number, got {tokens!r}")
    _positive("flops_per_token", flops_per_token)
    _positive("peak_flops", peak_flops)
    if not (isinstance(utilisation, int | float) and 0 < utilisation <= 1):
        raise ValueError(f"utilisation: expected a fraction in (0, 1], got {utilisation!r}")
    return tokens * flops_per_token / (peak_flops * utilisation) / 3600


def implied_utilisation(tokens: float, flops_per_token: float, hours: float, *, peak_flops: float) -> float:
    """The MFU at which ``tokens`` x ``flops_per_token`` takes ``hours`` GPU-hours at ``peak_flops``."""
    _positive("tokens", tokens)
    _positive("flops_per_token", flops_per_token)
    _positive("hours", hours)
    _positive("peak_flops", peak_flops)
    return tokens * flops_per_token / (hours * 3600 * peak_flops)


def training_cost(hours: float, *, usd_per_gpu_hour: float, n_gpus: int | None = None) -> dict:
    """Price ``usd = hours x usd_per_gpu_hour`` and, given ``n_gpus``, wall-clock ``days``."""
    if not (isinstance(hours, int | float) and hours >= 0):
        raise ValueError(f"hours: expected a non-negative number, got {hours!r}")
    _positive("usd_per_gpu_hour", usd_per_gpu_hour)
    if n_gpus is not None and not (isinstance(n_gpus, int) and n_gpus >= 1):
        raise ValueError(f"n_gpus: expected a positive integer, got {n_gpus!r}")
    return {"gpu_hours": hours, "usd": hours * usd_per_gpu_hour,
            "days": None if n_gpus is None else hours / n_gpus / 24}


def summary(config: ModelConfig, *, seq_len: int = 4096, cache_dtype: str = "bf16") -> dict:
    """The headline figures of one config (for tables): parameters, FLOPs/token, KV bytes/token."""
    p, six = parameter_counts(config), six_n_flops_per_token(config)
    return {"total": p["total"], "active": p["active"], "mtp": p["mtp"]["total"],
            "forward_6n": six["forward"], "training_6n": six["training"],
            "training_exact": training_flops_per_token(config, seq_len),
            "kv_bytes_per_token": kv_cache_bytes_per_token(config, cache_dtype)}


# ------------------------------------------------------------------------------------------------
# DeepSeek-V3.2's sparse attention (DSA): attention FLOPs and cache bytes against context length
# ------------------------------------------------------------------------------------------------

#: Bytes one token occupies per layer in the deployed caches (reference deepseek-v32.md §2.5, §5):
#: FlashMLA's FP8 latent entry (512 FP8 values + 4 FP32 scales + 64 BF16 rope values = 656 B) and
#: the indexer's FP8 key (128 values + one FP32 scale = 132 B).
MLA_FP8_ENTRY_BYTES = 656
INDEXER_FP8_ENTRY_BYTES = 132

#: DeepSeek-V3.2 Fig. 3 (= V3.2-Exp report Fig. 3; H800 service at 2 USD per GPU-hour): cost in USD per
#: million tokens at token position 128K, **read off the plot by eye** (reference §5), so approximate.
V32_PRICE_AT_128K = {"prefill": {"v3.1-terminus": 0.66, "v3.2": 0.19},
                     "decode": {"v3.1-terminus": 2.15, "v3.2": 0.25}}


def indexer_parameters(config: ModelConfig) -> int:
    """Lightning-indexer parameters of all layers (``wq_b``, ``wk``, ``k_norm`` gain and bias, ``weights_proj``)."""
    from .attention.indexer import index_dims
    hi, di, _ = index_dims(config)
    per_layer = hi * di * config.q_lora_rank + di * config.hidden_size + 2 * di + hi * config.hidden_size
    return per_layer * config.num_hidden_layers


def dsa_attention_costs(config: ModelConfig, context: float, *, phase: str = "decode") -> dict:
    r"""Per-token attention FLOPs and cache bytes read, dense MLA vs DSA, at ``context`` keys, all layers.

    Per layer and (query, key) pair (reference §5, a textbook estimate, not DeepSeek's numbers):
    MLA costs :math:`2H(2D_c + D_r)` in the absorbed/MQA form used for ``phase="decode"`` (278,528
    for V3) and :math:`2H(D_{qk} + D_v)` in the MHA form of ``"prefill"`` (81,920); the indexer
    costs :math:`2 H^I d^I` (16,384). Dense MLA scores all ``context`` keys; DSA scores
    ``min(index_topk, context)`` keys plus the indexer over all of them. Bytes read per decoded
    token: ``context x 656`` dense; ``min(k, context) x 656 + context x 132`` sparse. Returns
    ``{"dense_flops", "sparse_flops", "indexer_flops", "dsa_flops", "dense_bytes", "dsa_bytes"}``.
    """
    from .attention.indexer import index_dims
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase: expected 'decode' or 'prefill', got {phase!r}")
    if not context >= 0:
        raise ValueError(f"context: expected a non-negative number, got {context!r}")
    hi, di, k = index_dims(config)
    n = config.num_hidden_layers
    impl = "absorbed" if phase == "decode" else "naive"
    dense = n * _attention_context_flops(config, context, impl)
    sparse = n * _attention_context_flops(config, min(k, context), impl)
    indexer = n * 2 * hi * di * context
    return {"dense_flops": dense, "sparse_flops": sparse, "indexer_flops": indexer, "dsa_flops": sparse + indexer,
            "dense_bytes": n * context * MLA_FP8_ENTRY_BYTES,
            "dsa_bytes": n * (min(k, context) * MLA_FP8_ENTRY_BYTES + context * INDEXER_FP8_ENTRY_BYTES)}
