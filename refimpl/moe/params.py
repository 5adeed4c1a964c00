r"""MoE parameters: initialisation, layout conversions, and total vs active parameter counts.

The layer keeps routed experts stacked (see :mod:`refimpl.moe.layer`); this module converts to and
from the per-expert layout of the checkpoints (``mlp.experts.{i}.gate_proj.weight``) and the fused
``gate_up_proj`` of transformers >= 5, relabels experts, splits the shared MLP into its ``Es``
experts, and counts parameters from a config: the *total* a checkpoint stores and the *active*
ones a token's forward pass multiplies with (DeepSeek-V2 §1: 236B total, 21B activated).
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float
from .gates import get_gate
from .gating import check_router_config

_PROJ = ("gate_proj", "up_proj", "down_proj")


def init_moe_params(config, rng=None, *, dtype=np.float64, std=None):
    """Random MoE parameters for ``config``: normal(0, ``std``) weights (default
    ``config.initializer_range``; V2/V3 use 0.006); the router's parameters come from its entry in
    :data:`~refimpl.moe.gates.GATES` (DeepSeek's: a zero correction bias for ``noaux_tc`` only)."""
    check_router_config(config)
    rng = np.random.default_rng(rng)
    std = config.initializer_range if std is None else std
    e, d, i, ns = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.n_shared_experts
    normal = lambda *shape: (std * rng.standard_normal(shape)).astype(dtype)
    gate = get_gate(config.gate_type).init(config, normal, dtype)         # the router's own parameters
    params = {"gate": gate,
              "experts": {"gate_proj": normal(e, i, d), "up_proj": normal(e, i, d),  # (E, I, D)
                          "down_proj": normal(e, d, i)}}                  # (E, D, I)
    if ns:
        params["shared_experts"] = {"gate_proj": normal(ns * i, d), "up_proj": normal(ns * i, d),  # (Es*I, D)
                                    "down_proj": normal(d, ns * i)}       # (D, Es*I)
    return params


def experts_from_list(experts):
    """Stack a per-expert list ``[{gate_proj, up_proj, down_proj}, ...]`` (checkpoint layout)."""
    if not isinstance(experts, list | tuple) or not experts:
        raise ValueError("experts: expected a non-empty list of {gate_proj, up_proj, down_proj} dicts")
    return {p: np.stack([ex[p] for ex in experts]) for p in _PROJ}        # (E, ...)


def experts_to_list(experts):
    """Inverse of :func:`experts_from_list`: one ``{gate_proj, up_proj, down_proj}`` dict per expert."""
    return [{p: experts[p][e] for p in _PROJ} for e in range(experts["gate_proj"].shape[0])]


def experts_from_fused(gate_up_proj, down_proj):
    """From transformers >= 5 ``gate_up_proj`` (E, 2I, D) (gate rows first) and ``down_proj`` (E, D, I)."""
    check_float("gate_up_proj", gate_up_proj, ndim=3)
    check_float("down_proj", down_proj, ndim=3)
    i = gate_up_proj.shape[1] // 2
    if gate_up_proj.shape[1] != 2 * i or down_proj.shape[2] != i:
        raise ValueError(f"down_proj: expected shape (E, D, {i}) for gate_up_proj {gate_up_proj.shape}, "
                         f"got {down_proj.shape}")
    return {"gate_proj": gate_up_proj[:, :i].copy(), "up_proj": gate_up_proj[:, i:].copy(),  # (E, I, D)
            "down_proj": down_proj.copy()}                                # (E, D, I)


def permute_experts(params, perm):
    """Relabel routed experts: new expert ``j`` is old expert ``perm[j]`` (gate rows, bias, weights)."""
    perm = np.asarray(perm, dtype=np.int64)
    e = params["gate"]["weight"].shape[0]
    if sorted(perm.tolist()) != list(range(e)):
        raise ValueError(f"perm: expected a permutation of 0..{e - 1}, got {perm.tolist()}")
    out = dict(params)
    out["gate"] = {k: v[perm] for k, v in params["gate"].items()}
    out["experts"] = {k: v[perm] for k, v in params["experts"].items()}
    return out


def split_shared_experts(shared, n_shared):
    """The ``Es`` shared experts hidden in one MLP of width ``Es*I``: slice gate/up rows, down columns."""
    width = shared["gate_proj"].shape[0]
    if n_shared < 1 or width % n_shared:
        raise ValueError(f"n_shared: expected a divisor of the shared width {width}, got {n_shared}")
    i = width // n_shared
    return [{"gate_proj": shared["gate_proj"][s * i:(s + 1) * i], "up_proj": shared["up_proj"][s * i:(s + 1) * i],
             "down_proj": shared["down_proj"][:, s * i:(s + 1) * i]} for s in range(n_shared)]


def count_parameters(config):
    r"""Total and active parameters of a DeepSeek-V2/V3 model, counted from its config fields.

    Counted per layer: MLA (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` or ``q_proj``;
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), two RMSNorms, and a dense
    SwiGLU FFN (the first ``first_k_dense_replace`` layers) or an MoE layer (gate, its bias for
    ``noaux_tc``, ``E`` routed and one shared MLP of width ``Es*I``); plus the embedding, the final
    norm and the untied LM head. Multi-token-prediction modules are not counted (V3's 671B excludes
    its 14B MTP module, §4.2 / README).

    *Active* counts what one token's forward pass multiplies with: only ``K`` of the ``E`` routed
    experts, and not the input embedding (a row lookup), but the LM head. With this convention the
    counts round to the published ones: V2-Lite 15.7B / 2.4B, V2 236B / 21B, V3 671B / 37B.

    Returns a dict: ``total``, ``active``, and the parts ``embedding``, ``lm_head``, ``attention``,
    ``dense_ffn``, ``moe_routed``, ``moe_shared``, ``moe_gate``, ``norms`` (totals over layers) and
    ``moe_routed_active``.
    """
    c = check_router_config(config) if config.n_routed_experts else config.validate()
    d, h = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank:
        attn = c.q_lora_rank * d + c.q_lora_rank + h * qk * c.q_lora_rank
    else:
        attn = h * qk * d
    attn += (c.kv_lora_rank + c.qk_rope_head_dim) * d + c.kv_lora_rank
    attn += h * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank + d * h * c.v_head_dim
    n_moe = sum(c.is_moe_layer(layer) for layer in range(c.num_hidden_layers))
    n_dense = c.num_hidden_layers - n_moe
    expert = 3 * d * c.moe_intermediate_size
    gate = c.n_routed_experts * d + (c.n_routed_experts if c.topk_method == "noaux_tc" else 0)
    parts = {
        "embedding": c.vocab_size * d,
        "lm_head": 0 if c.tie_word_embeddings else c.vocab_size * d,
        "attention": c.num_hidden_layers * attn,
        "dense_ffn": n_dense * 3 * d * c.intermediate_size,
        "moe_routed": n_moe * c.n_routed_experts * expert,
        "moe_shared": n_moe * c.n_shared_experts * expert,
        "moe_gate": n_moe * gate,
        "norms": (2 * c.num_hidden_layers + 1) * d,
    }
    parts["moe_routed_active"] = n_moe * c.num_experts_per_tok * expert
    total = sum(v for k, v in parts.items() if k != "moe_routed_active")
    lookup_only = 0 if c.tie_word_embeddings else parts["embedding"]    # a tied table is also the head
    active = total - lookup_only - parts["moe_routed"] + parts["moe_routed_active"]
    return {"total": int(total), "active": int(active), **{k: int(v) for k, v in parts.items()}}
