r"""Checkpoints in the Hugging Face hub layout: ``config.json`` + ``*.safetensors`` with per-expert tensors.

:func:`~refimpl.model.pretrained.load_pretrained` reads a DeepSeek-V2 / V3 directory as the hub
stores it (``model_type`` ``deepseek_v2`` or ``deepseek_v3``; ``rope_scaling`` as the hub writes it, or
``rope_parameters`` as transformers >= 5 writes it) without pickle, and returns a
:class:`~refimpl.model.pretrained.Model`. :func:`save_pretrained` writes the same layout. The mapping
between refimpl's parameter tree and hub names is one table,
:func:`hub_spec`: every leaf has one name (``.weight`` appended, except the router's
``e_score_correction_bias``), and the stacked routed experts expand to
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``. Missing, unexpected or mis-shaped
tensors raise a ``ValueError`` naming the tensor and its file. Files are parsed directly and lazily
(:mod:`refimpl.model.safetensors_io`, one tensor at a time, straight into the target dtype; sharded
directories through :mod:`refimpl.model.shards`), so BF16 tensors (the released V2 / V2-Lite) and FP8 E4M3 weights
with 128 x 128 block scales ``weight_scale_inv`` (the released V3, DeepSeek-V3 §3.3) load too,
dequantized to the requested dtype.

Multi-token prediction (V3 §2.2; the released V3 stores it as ``model.layers.61``): the depth-``k``
module is ``model.layers.{N + k - 1}`` with ``enorm``, ``hnorm``, ``eh_proj``, a full decoder layer
and ``shared_head.norm``; the released files also repeat ``embed_tokens`` and ``shared_head.head``
there, which refimpl writes as copies and, on load, checks against the main model's. transformers
does not keep MTP weights, so a directory whose config asks for MTP but holds none of its tensors
loads without MTP (any partial set is an error).

The R1-Distill students (``model_type`` ``qwen2`` and ``llama``, DeepSeek-R1 §2.4) load through the
same table with standard attention: :mod:`refimpl.model.hub_dense` reads their configs, adds the
q/k/v biases and the tied head, and reorders the q/k rows for refimpl's RoPE layout.

DeepSeek-V3.2 (``model_type`` ``deepseek_v32``) is V3 plus, in every layer, the lightning indexer's
``self_attn.indexer.{wq_b, wk, k_norm (weight and bias), weights_proj}``; ``index_topk``,
``index_head_dim`` and ``index_n_heads`` are kept in ``ModelConfig.extra`` (:mod:`refimpl.attention.dsa`).

Semantics when reading a transformers config (transformers 5.24; reference §10): ``deepseek_v2``
routes with a softmax, never renormalises (``norm_topk_prob`` is forced False) and always multiplies
by ``routed_scaling_factor``; ``deepseek_v3`` routes with ``noaux_tc`` (sigmoid + bias, top-2 group
score, renormalised iff ``norm_topk_prob``). ``n_group``/``topk_group`` of ``None`` mean 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..fileio import atomic_write
from ..moe.gates import get_gate
from .hub_dense import (
    DENSE_MODEL_TYPES,
    REQUIRED,
    dense_attention_spec,
    dense_config_from_hf,
    dense_config_to_hf,
    dense_mlp_bias_spec,
    require_fields,
    rope_rows,
)
from .mtp import BLOCK_KEYS
from .shards import read_checkpoint, write_checkpoint

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
#: Every ``model_type`` :func:`load_pretrained` reads.
SUPPORTED_MODEL_TYPES = MODEL_TYPES + DENSE_MODEL_TYPES
_PROJ = ("gate_proj", "up_proj", "down_proj")


def config_from_hf(d: dict) -> ModelConfig:
    """A :class:`~refimpl.config.ModelConfig` from a hub / transformers ``config.json`` dict."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(d).__name__}")
    d = dict(d)
    mt = d.get("model_type")
    if mt in DENSE_MODEL_TYPES:
        return dense_config_from_hf(d)
    if mt not in MODEL_TYPES:
        raise ValueError(f"config.json: model_type must be one of {SUPPORTED_MODEL_TYPES}, got {mt!r}")
    require_fields(d, REQUIRED)
    rp = d.pop("rope_parameters", None)
    if rp is not None and d.get("rope_scaling") is None:
        rp = dict(rp)
        d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
        rp.pop("rope_theta", None)
        if rp.get("rope_type", rp.get("type", "default")) != "default":
            d["rope_scaling"] = rp
    d["n_group"] = d.get("n_group") or 1
    d["topk_group"] = d.get("topk_group") or 1
    if d.get("q_lora_rank") == 0:
        d["q_lora_rank"] = None
    if mt == "deepseek_v2":
        d.update(scoring_func="softmax", norm_topk_prob=False)
        d.setdefault("topk_method", "greedy")
    else:
        d.update(scoring_func="sigmoid", topk_method="noaux_tc")
    d.setdefault("num_nextn_predict_layers", 0)
    return ModelConfig.from_dict(d)


def _layer_spec(config, layer, prefix, path):
    """(hub name, tree path, shape, expert index or None) for one decoder layer."""
    from ..attention import mla_param_shapes, uses_mla
    d, out = config.hidden_size, []
    out += [(f"{prefix}input_layernorm.weight", path + ("input_layernorm",), (d,), None),
            (f"{prefix}post_attention_layernorm.weight", path + ("post_attention_layernorm",), (d,), None)]
    if uses_mla(config):
        out += [(f"{prefix}self_attn.{k}.weight", path + ("self_attn", k), s, None)
                for k, s in mla_param_shapes(config).items()]
        out += _indexer_spec(config, prefix, path)
    else:
        out += dense_attention_spec(config, prefix, path)
    mlp = path + ("mlp",)
    if config.is_moe_layer(layer):
        e, i, ns = config.n_routed_experts, config.moe_intermediate_size, config.n_shared_experts
        out += [(f"{prefix}mlp.gate.{k}", mlp + ("gate", k), s, None)   # the router's own tensors
                for k, s in get_gate(config.gate_type).param_shapes(config).items()]
        shapes = {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}
        out += [(f"{prefix}mlp.experts.{x}.{p}.weight", mlp + ("experts", p), shapes[p], x)
                for x in range(e) for p in _PROJ]
        if ns:
            sh = {"gate_proj": (ns * i, d), "up_proj": (ns * i, d), "down_proj": (d, ns * i)}
            out += [(f"{prefix}mlp.shared_experts.{p}.weight", mlp + ("shared_experts", p), sh[p], None)
                    for p in _PROJ]
    else:
        i = config.intermediate_size
        sh = {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}
        out += [(f"{prefix}mlp.{p}.weight", mlp + (p,), sh[p], None) for p in _PROJ]
        out += dense_mlp_bias_spec(config, prefix, path)
    return out


def _indexer_spec(config, prefix, path):
    """DeepSeek-V3.2's ``self_attn.indexer.{wq_b, wk, k_norm (weight, bias), weights_proj}`` (none before V3.2)."""
    from ..attention import indexer_param_shapes, uses_dsa
    if not uses_dsa(config):
        return []
    pre, p = f"{prefix}self_attn.indexer.", path + ("self_attn", "indexer")
    s = indexer_param_shapes(config)
    return [(f"{pre}wq_b.weight", p + ("wq_b",), s["wq_b"], None), (f"{pre}wk.weight", p + ("wk",), s["wk"], None),
            (f"{pre}k_norm.weight", p + ("k_norm", "weight"), s["k_norm"]["weight"], None),
            (f"{pre}k_norm.bias", p + ("k_norm", "bias"), s["k_norm"]["bias"], None),
            (f"{pre}weights_proj.weight", p + ("weights_proj",), s["weights_proj"], None)]


def hub_spec(config, mtp=None):
    """The whole name table: list of ``(hub name, tree path, shape, expert)``; MTP entries if ``mtp``
    (default ``num_nextn_predict_layers > 0``)."""
    v, d, n = config.vocab_size, config.hidden_size, config.num_hidden_layers
    spec = [("model.embed_tokens.weight", ("model", "embed_tokens"), (v, d), None)]
    for layer in range(n):
        spec += _layer_spec(config, layer, f"model.layers.{layer}.", ("model", "layers", layer))
    spec.append(("model.norm.weight", ("model", "norm"), (d,), None))
    if not config.tie_word_embeddings:                 # tied: the file has no lm_head.weight
        spec.append(("lm_head.weight", ("lm_head",), (v, d), None))
    if config.num_nextn_predict_layers if mtp is None else mtp:
        for k in range(max(config.num_nextn_predict_layers, 1)):
            pre, path = f"model.layers.{n + k}.", ("mtp", k)
            spec += [(f"{pre}enorm.weight", path + ("enorm",), (d,), None),
                     (f"{pre}hnorm.weight", path + ("hnorm",), (d,), None),
                     (f"{pre}eh_proj.weight", path + ("eh_proj",), (d, 2 * d), None)]
            spec += _layer_spec(config, n + k, pre, path)
            spec.append((f"{pre}shared_head.norm.weight", path + ("shared_head", "norm"), (d,), None))
    return spec


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def to_hub(params, config):
    """Flatten a parameter tree into ``{hub name: array}`` (per-expert tensors, MTP copies included)."""
    out = {}
    for name, path, _, expert in hub_spec(config, mtp="mtp" in params):
        a = _get(params, path)
        out[name] = rope_rows(np.ascontiguousarray(a if expert is None else a[expert]), name, config, to_hub=True)
    for k in range(len(params.get("mtp", []))):
        pre = f"model.layers.{config.num_hidden_layers + k}."
        out[pre + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[pre + "shared_head.head.weight"] = out["lm_head.weight"]
    return out


def from_hub(tensors, config, dtype=np.float64):
    """Build the parameter tree from ``{hub name: array}``, checking names and shapes strictly."""
    n = config.num_hidden_layers
    mtp_names = {name for name, *_ in hub_spec(config, mtp=True)} - {name for name, *_ in hub_spec(config, mtp=False)}
    has_mtp = bool(config.num_nextn_predict_layers) and any(k in tensors for k in mtp_names)
    spec = hub_spec(config, mtp=has_mtp)
    params = {"model": {"layers": [{} for _ in range(n)]}}
    if has_mtp:
        params["mtp"] = [{} for _ in range(config.num_nextn_predict_layers)]
    stacked = {}
    for name, path, shape, expert in spec:
        if name not in tensors:
            raise ValueError(f"checkpoint: missing tensor '{name}' (expected shape {shape})")
        a = tensors[name]
        where = f" in {a.file}" if hasattr(a, "file") else ""
        if tuple(a.shape) != shape:
            raise ValueError(f"checkpoint: tensor '{name}'{where} has shape {tuple(a.shape)}, expected {shape} "
                             "from config.json")
        # one tensor at a time, read straight into the target dtype (lazy refs) or copied (arrays)
        a = a.read(dtype) if hasattr(a, "read") else np.array(a, dtype=dtype)
        a = rope_rows(a, name, config)
        if expert is not None:
            stacked.setdefault(path, []).append(a)
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
        node[path[-1]] = a
    for path, arrays in stacked.items():
        _get(params, path[:-2]).setdefault("experts", {})[path[-1]] = np.stack(arrays)  # (E, out, in)
    known = {name for name, *_ in spec}
    shared = {"model.embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}
    for k in range(len(params.get("mtp", []))):
        for main, local in shared.items():
            name = f"model.layers.{n + k}.{local}"
            if name in tensors:
                known.add(name)
                ref = _get(params, tuple(main.split(".")[:-1]))
                if not np.array_equal(np.asarray(tensors[name], dtype=dtype), ref):
                    raise ValueError(f"checkpoint: tensor '{name}' differs from '{main}' (MTP shares it)")
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        known.add("lm_head.weight")               # some tied files repeat the head: it must be the embedding
        if not np.array_equal(np.asarray(tensors["lm_head.weight"], dtype=dtype), params["model"]["embed_tokens"]):
            raise ValueError("checkpoint: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but "
                             "config.json has tie_word_embeddings=true")
    extra = sorted(set(tensors) - known)
    if extra:
        where = f" in {tensors[extra[0]].file}" if hasattr(tensors[extra[0]], "file") else ""
        raise ValueError(f"checkpoint: unexpected tensor '{extra[0]}'{where} ({len(extra)} unexpected in all) for "
                         f"this config.json")
    if config.tie_word_embeddings:
        params["lm_head"] = params["model"]["embed_tokens"]               # one array: the head is the embedding
    for lp in params["model"]["layers"] + params.get("mtp", []):
        if "experts" in lp["mlp"]:
            lp["mlp"] = {k: lp["mlp"][k] for k in ("gate", "experts", "shared_experts") if k in lp["mlp"]}
    params["model"]["layers"] = [{k: lp[k] for k in BLOCK_KEYS} for lp in params["model"]["layers"]]
    params["model"] = {k: params["model"][k] for k in ("embed_tokens", "layers", "norm")}
    if has_mtp:
        params["mtp"] = [{k: mp[k] for k in ("enorm", "hnorm", "eh_proj", *BLOCK_KEYS, "shared_head")}
                         for mp in params["mtp"]]
    out = {"model": params["model"], "lm_head": params["lm_head"]}
    if has_mtp:
        out["mtp"] = params["mtp"]
    return out


def hf_config_dict(config):
    """The ``config.json`` dict :func:`save_pretrained` writes (hub form for the dense students)."""
    from ..attention import uses_mla
    if not uses_mla(config):
        return dense_config_to_hf(config)
    d = config.to_dict()
    d.setdefault("model_type", "deepseek_v3")
    if d["model_type"] == "deepseek_v32":
        d.setdefault("architectures", ["DeepseekV32ForCausalLM"])
    d.setdefault("architectures", ["DeepseekV3ForCausalLM" if d["model_type"] == "deepseek_v3"
                                   else "DeepseekV2ForCausalLM"])
    return d


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, path + (i,))
    else:
        yield path, tree


def check_params_for_save(params, config):
    """``ValueError`` (naming the parameter) unless ``params`` is exactly what :func:`load_pretrained`
    would rebuild for ``config``: every tensor of :func:`hub_spec`, float32/float64, of the right shape,
    and nothing else; with tied embeddings the head must equal the embedding."""
    if not isinstance(params, dict) or "model" not in params:
        raise ValueError("params: expected a parameter tree with a 'model' entry")
    if "mtp" in params and len(params["mtp"]) != config.num_nextn_predict_layers:
        raise ValueError(f"params: {len(params['mtp'])} MTP modules but config.num_nextn_predict_layers is "
                         f"{config.num_nextn_predict_layers} (load_pretrained could not read them back)")
    spec = hub_spec(config, mtp="mtp" in params)
    want = {}
    for name, path, shape, expert in spec:
        want[path] = (name, shape if expert is None else (config.n_routed_experts,) + shape)
    if config.tie_word_embeddings:
        want[("lm_head",)] = ("lm_head.weight", (config.vocab_size, config.hidden_size))
    have = dict(_leaves(params))
    for path, (name, shape) in want.items():
        if path not in have:
            raise ValueError(f"params: missing {'/'.join(map(str, path))} (hub tensor '{name}', shape {shape})")
        a = have[path]
        if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
            raise ValueError(f"params: {'/'.join(map(str, path))} must be a float32/float64 array, "
                             f"got {getattr(a, 'dtype', type(a).__name__)}")
        if a.shape != shape:
            raise ValueError(f"params: {'/'.join(map(str, path))} has shape {a.shape}, expected {shape} ('{name}')")
    extra = sorted(map(str, set(have) - set(want)))
    if extra:
        raise ValueError(f"params: unexpected parameter {extra[0]} that config.json cannot describe "
                         f"(load_pretrained could not read it back)")
    if config.tie_word_embeddings and not np.array_equal(params["lm_head"], params["model"]["embed_tokens"]):
        raise ValueError("params: lm_head differs from model/embed_tokens but config.tie_word_embeddings is true")


def save_pretrained(path, params, config, *, dtype=None, max_shard_bytes=None):
    """Write ``config.json`` and the weights in the hub layout (hub names, per-expert tensors; for the
    dense students rotate-half q/k rows, biases, no ``lm_head.weight`` when tied).

    ``dtype``: store floats as ``"bfloat16"`` (the hub's format), ``np.float32``, ... (default: the
    params' own dtype, so a reload is exact). ``max_shard_bytes``: split into shards with a
    ``model.safetensors.index.json`` above this size. Refuses (``ValueError``) a config or params
    that :func:`load_pretrained` could not read back. Every file is written atomically.
    """
    d = hf_config_dict(config)
    config_from_hf(json.loads(json.dumps(d)))                    # the file must read back
    from .structure import check_params
    check_params(params, config)             # the tree against the config, as at every entry point
    check_params_for_save(params, config)    # and what the hub layout can hold
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / "config.json", "w") as f:
        json.dump(d, f, indent=2)
    write_checkpoint(path, to_hub(params, config), dtype=dtype, max_shard_bytes=max_shard_bytes)


def read_safetensors(path):
    """All tensors of a checkpoint directory read eagerly as ``{name: array}`` (BF16 and FP8 widened
    to float32; FP8 weights with ``<name>_scale_inv`` dequantized, ``W = W_fp8 * scale_inv[i // 128,
    j // 128]``, and the scales dropped). :func:`load_pretrained` reads lazily instead."""
    return {k: r.read() for k, r in read_checkpoint(path).items()}


def read_config(path):
    """``config.json`` of a checkpoint directory as a :class:`~refimpl.config.ModelConfig`; ``ValueError``
    naming the file for a missing file or invalid JSON, naming the field for a missing one."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"path: expected a directory with config.json, got {os.fspath(path)!r}")
    try:
        with open(cfg, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    try:
        return config_from_hf(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg}: {e}") from None



def __getattr__(name):
    # ``refimpl.model.checkpoint.load_pretrained`` was its home; it returns a Model and so lives in
    # :mod:`.pretrained` (Model.save_pretrained imports this module: no cycle that way round)
    if name == "load_pretrained":
        from .pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
