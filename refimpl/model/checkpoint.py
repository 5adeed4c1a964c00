r"""Checkpoints in the Hugging Face hub layout: ``config.json`` + ``*.safetensors`` with per-expert tensors.

:func:`load_pretrained` reads a DeepSeek-V2 / V3 directory as the hub stores it (``model_type``
``deepseek_v2`` or ``deepseek_v3``; ``rope_scaling`` as the hub writes it, or ``rope_parameters`` as
transformers >= 5 writes it) without pickle, and returns a :class:`Model`. :func:`save_pretrained`
writes the same layout. The mapping between refimpl's parameter tree and hub names is one table,
:func:`hub_spec`: every leaf has one name (``.weight`` appended, except the router's
``e_score_correction_bias``), and the stacked routed experts expand to
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``. Missing, unexpected or mis-shaped
tensors raise a ``ValueError`` naming the tensor. Files are parsed directly
(:func:`read_safetensors_file`), so BF16 tensors (the released V2 / V2-Lite) and FP8 E4M3 weights
with 128 x 128 block scales ``weight_scale_inv`` (the released V3, DeepSeek-V3 §3.3) load too,
dequantized to the requested dtype.

Multi-token prediction (V3 §2.2; the released V3 stores it as ``model.layers.61``): the depth-``k``
module is ``model.layers.{N + k - 1}`` with ``enorm``, ``hnorm``, ``eh_proj``, a full decoder layer
and ``shared_head.norm``; the released files also repeat ``embed_tokens`` and ``shared_head.head``
there, which refimpl writes as copies and, on load, checks against the main model's. transformers
does not keep MTP weights, so a directory whose config asks for MTP but holds none of its tensors
loads without MTP (any partial set is an error).

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
from .mtp import BLOCK_KEYS

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_PROJ = ("gate_proj", "up_proj", "down_proj")


def config_from_hf(d: dict) -> ModelConfig:
    """A :class:`~refimpl.config.ModelConfig` from a hub / transformers ``config.json`` dict."""
    d = dict(d)
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"config.json: model_type must be one of {MODEL_TYPES}, got {mt!r}")
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
    from ..attention import mla_param_shapes
    d, out = config.hidden_size, []
    out += [(f"{prefix}input_layernorm.weight", path + ("input_layernorm",), (d,), None),
            (f"{prefix}post_attention_layernorm.weight", path + ("post_attention_layernorm",), (d,), None)]
    out += [(f"{prefix}self_attn.{k}.weight", path + ("self_attn", k), s, None)
            for k, s in mla_param_shapes(config).items()]
    mlp = path + ("mlp",)
    if config.is_moe_layer(layer):
        e, i, ns = config.n_routed_experts, config.moe_intermediate_size, config.n_shared_experts
        out.append((f"{prefix}mlp.gate.weight", mlp + ("gate", "weight"), (e, d), None))
        if config.topk_method == "noaux_tc":
            out.append((f"{prefix}mlp.gate.e_score_correction_bias", mlp + ("gate", "e_score_correction_bias"),
                        (e,), None))
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
    return out


def hub_spec(config, mtp=None):
    """The whole name table: list of ``(hub name, tree path, shape, expert)``; MTP entries if ``mtp``
    (default ``num_nextn_predict_layers > 0``)."""
    v, d, n = config.vocab_size, config.hidden_size, config.num_hidden_layers
    spec = [("model.embed_tokens.weight", ("model", "embed_tokens"), (v, d), None)]
    for layer in range(n):
        spec += _layer_spec(config, layer, f"model.layers.{layer}.", ("model", "layers", layer))
    spec += [("model.norm.weight", ("model", "norm"), (d,), None), ("lm_head.weight", ("lm_head",), (v, d), None)]
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
        out[name] = np.ascontiguousarray(a if expert is None else a[expert])
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
        if tuple(a.shape) != shape:
            raise ValueError(f"checkpoint: tensor '{name}' has shape {tuple(a.shape)}, expected {shape} "
                             "from config.json")
        a = np.array(a, dtype=dtype)                                      # a copy: never a view of the file
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
    extra = sorted(set(tensors) - known)
    if extra:
        raise ValueError(f"checkpoint: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all) for "
                         f"this config.json")
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


def _hf_config_dict(config):
    d = config.to_dict()
    d.setdefault("model_type", "deepseek_v3")
    d.setdefault("architectures", ["DeepseekV3ForCausalLM" if d["model_type"] == "deepseek_v3"
                                   else "DeepseekV2ForCausalLM"])
    return d


def save_pretrained(path, params, config):
    """Write ``config.json`` and ``model.safetensors`` (hub names, per-expert tensors)."""
    from safetensors.numpy import save_file

    from .structure import check_params
    check_params(params, config)   # a tree load_pretrained could not read back is never written
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(_hf_config_dict(config), f, indent=2)
    save_file(to_hub(params, config), str(path / "model.safetensors"), metadata={"format": "pt"})


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}


def _e4m3_table():
    """float32 value of every E4M3 (fn) byte: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * mag).astype(np.float32)


def read_safetensors_file(path):
    """One ``.safetensors`` file as ``{name: array}``, parsed directly (8-byte header length, JSON
    header, raw little-endian data): no pickle, and also BF16 (widened to float32) and F8_E4M3
    (decoded to float32), which NumPy has no dtype for. Arrays are read-only memory maps where possible.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        (start, end), dt, shape = info["data_offsets"], info["dtype"], tuple(info["shape"])
        raw = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))
               if end > start else np.zeros(0, dtype=np.uint8))
        if dt in _DTYPES:
            a = raw.view(_DTYPES[dt])
        elif dt == "BF16":
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F8_E4M3":
            a = _e4m3_table()[raw]
        else:
            raise ValueError(f"checkpoint: tensor '{name}' has unsupported dtype {dt} in {path}")
        out[name] = a.reshape(shape)
    return out


def read_safetensors(path):
    """All tensors of every ``*.safetensors`` file in ``path`` (no pickle); names must be unique.

    FP8 weights with a ``<name>_scale_inv`` tensor (DeepSeek-V3's released format: one float32
    scale per 128 x 128 block) are dequantized, ``W = W_fp8 * scale_inv[i // 128, j // 128]``
    (:func:`refimpl.quant.fp8.dequantize_weight`), and the scale tensors dropped.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"path: no *.safetensors files in {os.fspath(path)!r}")
    tensors = {}
    for f in files:
        for k, v in read_safetensors_file(f).items():
            if k in tensors:
                raise ValueError(f"checkpoint: tensor '{k}' appears in more than one shard ({f.name})")
            tensors[k] = v
    scales = [k for k in tensors if k.endswith(".weight_scale_inv")]
    if scales:
        from ..quant.fp8 import dequantize_weight
        for k in scales:
            w = k[:-len("_scale_inv")]
            if w not in tensors:
                raise ValueError(f"checkpoint: '{k}' has no weight '{w}' to scale")
            tensors[w] = dequantize_weight(np.asarray(tensors[w], dtype=np.float32), tensors.pop(k))
    return tensors


def load_pretrained(path, dtype=np.float64):
    """Load a hub-layout DeepSeek-V2/V3 directory into a :class:`Model` (float64 by default)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path: expected a directory with config.json, got {os.fspath(path)!r}")
    with open(path / "config.json") as f:
        config = config_from_hf(json.load(f))
    from .generate import Model
    return Model(config, from_hub(read_safetensors(path), config, dtype))
