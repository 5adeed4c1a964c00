r"""The R1-Distill students' hub format: Qwen2 and Llama ``config.json`` files and their tensor layout.

DeepSeek-R1 §2.4 distils R1 into open dense models: DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B
(transformers' ``qwen2``: q/k/v projection biases, no o_proj bias) and DeepSeek-R1-Distill-Llama-8B/70B
(``llama``: Llama 3.1/3.3 with ``rope_scaling`` of type ``llama3``). refimpl runs them with the same
dense decoder as its own students (:mod:`refimpl.attention.mha`, :mod:`refimpl.model.block`); this
module maps their files onto it, as transformers 5.24 reads them:

* ``config.json`` -> :class:`~refimpl.config.ModelConfig` (:func:`dense_config_from_hf`) with the
  model type, ``head_dim``, ``mlp_bias`` and every other unknown key kept in ``extra``; RoPE as the
  hub writes it (``rope_theta`` + ``rope_scaling``) or as transformers >= 5 writes it
  (``rope_parameters``), :func:`rope_from_hf`. Sliding-window attention (Qwen2's
  ``use_sliding_window: true``) is refused, not silently ignored.
* Tensor names: ``self_attn.{q,k,v,o}_proj.weight`` and ``.bias`` map to the attention params
  ``q_proj`` ... and ``q_proj_bias`` ...; with ``tie_word_embeddings`` the file has no
  ``lm_head.weight`` and the head *is* the embedding array.
* RoPE layout: transformers' Llama/Qwen2 rotate channel halves ``(i, i + Dh/2)``; refimpl rotates
  adjacent pairs ``(2i, 2i + 1)`` with the same frequency ``i``. Loading reorders each head's
  ``q_proj``/``k_proj`` rows (and Qwen2's q/k biases) to ``[0, Dh/2, 1, Dh/2 + 1, ...]``
  (:func:`rope_rows`); saving undoes it, so logits are identical and a round trip is exact. Cached
  keys are in refimpl's order.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig

DENSE_MODEL_TYPES = ("qwen2", "llama")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
#: Fields a config.json must give (transformers would default them; a reference must not guess).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
#: ModelConfig fields that only DeepSeek models use; a dense student's config.json does not carry them.
DEEPSEEK_ONLY = ("moe_intermediate_size", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                 "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "topk_method",
                 "n_group", "topk_group", "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace",
                 "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers")


def require_fields(d, names, source="config.json"):
    """``ValueError`` naming the first of ``names`` missing from (or null in) ``d``."""
    for name in names:
        if d.get(name) is None:
            raise ValueError(f"{source}: missing required field '{name}'")


def rope_from_hf(d):
    """``(rope_theta, rope_scaling or None)`` from a config dict in either form (reference §2.6):
    top-level ``rope_theta`` + ``rope_scaling`` (hub files; legacy key ``type`` accepted), or
    ``rope_parameters`` with ``rope_theta`` inside (transformers >= 5). ``original_max_position_embeddings``
    defaults to ``max_position_embeddings`` for ``llama3`` and ``yarn``, as transformers sets it."""
    rp = d.get("rope_parameters")
    scaling = d.get("rope_scaling") or (dict(rp) if isinstance(rp, dict) else None)
    theta = d.get("rope_theta")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ValueError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
        scaling = dict(scaling)
        inner = scaling.pop("rope_theta", None)          # the dict's own theta wins, as in transformers
        theta = theta if inner is None else inner
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        elif scaling.get("rope_type", scaling.get("type")) in ("llama3", "yarn") and d.get("max_position_embeddings"):
            scaling.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
    return float(10000.0 if theta is None else theta), scaling


def dense_config_from_hf(d):
    """A :class:`~refimpl.config.ModelConfig` from a ``qwen2`` or ``llama`` ``config.json`` dict.

    The result has no MoE layer and no MLA (``n_routed_experts=0``, ``model_type`` in ``extra``), so
    the model builds with standard GQA attention; ``ValueError`` names what it cannot represent.
    """
    d = dict(d)
    mt = d.get("model_type")
    if mt not in DENSE_MODEL_TYPES:
        raise ValueError(f"config.json: model_type must be one of {DENSE_MODEL_TYPES}, got {mt!r}")
    require_fields(d, REQUIRED)
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
    if d.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported (sliding-window attention is "
                         "not implemented; every R1-Distill student has use_sliding_window=false)")
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"config.json: layer_types {sorted(set(layer_types))} is not supported (only full_attention)")
    if mt == "qwen2" and d.get("attention_bias"):
        raise ValueError("config.json: attention_bias is not a Qwen2 field (its q/k/v biases are built in); "
                         "expected it absent or false")
    n = d["num_hidden_layers"]
    theta, scaling = rope_from_hf(d)
    d.pop("rope_parameters", None)
    for k in DEEPSEEK_ONLY:
        d.pop(k, None)
    d.update(rope_theta=theta, rope_scaling=scaling, q_lora_rank=None, n_routed_experts=0, n_shared_experts=0,
             first_k_dense_replace=n, n_group=1, topk_group=1, num_experts_per_tok=1, aux_loss_alpha=0.0,
             num_nextn_predict_layers=0)
    d.setdefault("architectures", [ARCHITECTURES[mt]])
    d["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
    d["attention_bias"] = bool(d.get("attention_bias", False))
    d["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
    if "dtype" in d and "torch_dtype" not in d:
        d["torch_dtype"] = d.pop("dtype")
    for k in [k for k, v in d.items() if v is None and k in ("rms_norm_eps", "max_position_embeddings",
                                                               "initializer_range")]:
        d.pop(k)
    return ModelConfig.from_dict(d)


def dense_config_to_hf(config):
    """The hub ``config.json`` dict of a dense config (``rope_theta`` + ``rope_scaling``, no DeepSeek fields)."""
    d = config.to_dict()
    for k in DEEPSEEK_ONLY:
        d.pop(k, None)
    if d.get("model_type") == "qwen2":
        d.pop("attention_bias", None)
        d.setdefault("use_sliding_window", False)
    d.setdefault("hidden_act", "silu")
    if d.get("model_type") in ARCHITECTURES:
        d.setdefault("architectures", [ARCHITECTURES[d["model_type"]]])
    return d


def dense_attention_spec(config, prefix, path):
    """``(hub name, tree path, shape, None)`` of one layer's attention weights and biases."""
    from ..attention.mha import mha_bias_names, mha_param_shapes
    shapes = mha_param_shapes(config)
    out = [(f"{prefix}self_attn.{k}.weight", path + ("self_attn", k), s, None) for k, s in shapes.items()]
    out += [(f"{prefix}self_attn.{b[:-5]}.bias", path + ("self_attn", b), shapes[b[:-5]][:1], None)
            for b in mha_bias_names(config)]
    return out


def dense_mlp_bias_spec(config, prefix, path):
    """Entries of the SwiGLU biases when ``mlp_bias`` is true (transformers' Llama), else none."""
    if not config.extra.get("mlp_bias"):
        return []
    i, d = config.intermediate_size, config.hidden_size
    sizes = {"gate_proj": i, "up_proj": i, "down_proj": d}
    return [(f"{prefix}mlp.{p}.bias", path + ("mlp", f"{p}_bias"), (n,), None) for p, n in sizes.items()]


def interleave_perm(dim):
    """``[0, dim/2, 1, dim/2 + 1, ...]``: row ``j`` of a refimpl head is row ``perm[j]`` of a rotate-half
    head (the inverse of :func:`refimpl.core.deinterleave_perm`)."""
    return np.stack([np.arange(dim // 2), np.arange(dim // 2, dim)], axis=1).reshape(-1)


def rope_rows(a, name, config, to_hub=False):
    """Reorder a q/k projection weight or bias between the hub's rotate-half layout and refimpl's
    adjacent pairs (identity for every other tensor and for MLA models). Shapes: a (Hx*Dh[, D]) -> same."""
    from ..attention import default_head_dim, uses_mla
    parts = name.split(".")
    if uses_mla(config) or parts[-3:-1] not in (["self_attn", "q_proj"], ["self_attn", "k_proj"]):
        return a
    dh = default_head_dim(config)
    perm = interleave_perm(dh)
    if to_hub:
        perm = np.argsort(perm)
    heads = a.shape[0] // dh
    return np.ascontiguousarray(a.reshape(heads, dh, *a.shape[1:])[:, perm].reshape(a.shape))
