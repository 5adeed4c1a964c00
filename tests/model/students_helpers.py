"""Tiny R1-Distill-style students for the tests: hub config dicts, random weights, and an independent
NumPy forward of the hub layout (rotate-half RoPE, biases, tied heads), written from transformers'
Qwen2/Llama modelling as the reference spec describes it, not from refimpl's code."""

import math

import numpy as np

from refimpl.model.checkpoint import config_from_hf
from refimpl.model.transformer import init_params

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def hub_config(arch="qwen2", *, tied=False, hk=2, h=4, dh=8, d=16, layers=2, vocab=37, rope_scaling=None, **kw):
    """A hub ``config.json`` dict of a tiny student."""
    cfg = {"model_type": arch, "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
           "vocab_size": vocab, "hidden_size": d, "intermediate_size": 24, "num_hidden_layers": layers,
           "num_attention_heads": h, "num_key_value_heads": hk, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}
    if dh != d // h:
        cfg["head_dim"] = dh
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=4096, max_window_layers=layers)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    cfg.update(kw)
    return cfg


def random_student(cfgd, seed=0):
    """``(config, params)`` with non-trivial norms and biases (float64)."""
    config = config_from_hf(cfgd)
    rng = np.random.default_rng(seed)
    params = init_params(config.replace(tie_word_embeddings=False), rng)
    for lp in params["model"]["layers"]:
        for k in ("input_layernorm", "post_attention_layernorm"):
            lp[k] = 1 + 0.3 * rng.standard_normal(config.hidden_size)
        for part in ("self_attn", "mlp"):
            for k in [k for k in lp[part] if k.endswith("_bias")]:
                lp[part][k] = 0.3 * rng.standard_normal(lp[part][k].shape)
    params["model"]["norm"] = 1 + 0.3 * rng.standard_normal(config.hidden_size)
    if config.tie_word_embeddings:
        params["lm_head"] = params["model"]["embed_tokens"]
    return config, params


def _inv_freq(cfgd, dh):
    theta = cfgd.get("rope_theta", 10000.0)
    inv = [theta ** (-2 * i / dh) for i in range(dh // 2)]
    rs = cfgd.get("rope_scaling")
    if rs and rs.get("rope_type") == "linear":
        inv = [f / rs["factor"] for f in inv]
    elif rs and rs.get("rope_type") == "llama3":
        s, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        l0 = rs["original_max_position_embeddings"]
        out = []
        for f in inv:
            lam = 2 * math.pi / f
            if lam < l0 / hi:
                out.append(f)
            elif lam > l0 / lo:
                out.append(f / s)
            else:
                r = (l0 / lam - lo) / (hi - lo)
                out.append((1 - r) * f / s + r * f)
        inv = out
    return np.array(inv)


def numpy_forward(hub, cfgd, ids):
    """Logits (T, V) of one sequence from hub tensors ``{name: array}`` and the config dict."""
    d, h, hk = cfgd["hidden_size"], cfgd["num_attention_heads"], cfgd["num_key_value_heads"]
    dh, eps = cfgd.get("head_dim", d // h), cfgd["rms_norm_eps"]
    t = len(ids)
    ang = np.arange(t)[:, None] * _inv_freq(cfgd, dh)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rms(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    def lin(x, name):
        y = x @ hub[name + ".weight"].T
        return y + hub[name + ".bias"] if name + ".bias" in hub else y

    def rot(x):                                             # (T, heads, dh), rotate-half
        x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
        return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

    x = hub["model.embed_tokens.weight"][ids]
    for n in range(cfgd["num_hidden_layers"]):
        p = f"model.layers.{n}."
        u = rms(x, hub[p + "input_layernorm.weight"])
        q = rot(lin(u, p + "self_attn.q_proj").reshape(t, h, dh))
        k = rot(lin(u, p + "self_attn.k_proj").reshape(t, hk, dh))
        v = lin(u, p + "self_attn.v_proj").reshape(t, hk, dh)
        o = np.zeros((t, h, dh))
        for head in range(h):
            g = head // (h // hk)
            s = q[:, head] @ k[:, g].T / math.sqrt(dh)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            o[:, head] = (pr / pr.sum(-1, keepdims=True)) @ v[:, g]
        x = x + lin(o.reshape(t, h * dh), p + "self_attn.o_proj")
        u = rms(x, hub[p + "post_attention_layernorm.weight"])
        gate, up = lin(u, p + "mlp.gate_proj"), lin(u, p + "mlp.up_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    head = hub.get("lm_head.weight", hub["model.embed_tokens.weight"])
    return rms(x, hub["model.norm.weight"]) @ head.T
