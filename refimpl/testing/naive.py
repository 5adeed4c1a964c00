"""Deliberately naive references for equivalence tests: slow, obvious, and independent of the fast paths.

* :func:`naive_gate_matrix` routes one token at a time with Python sorting, written from the papers'
  equations (DeepSeek-V2 eq. 20-22 with device-limited routing §2.2.2; DeepSeek-V3 eq. 12-16 with
  node-limited routing §2.1.2), sharing no code with :mod:`refimpl.moe.gating`.
* :func:`moe_dense_reference` runs **every** routed expert on **every** token and multiplies by the
  dense gate matrix (zero outside each token's top-K), summing experts in ascending id and adding the
  shared experts last, as DeepSeek's and HF's code do.

Sparse dispatch must agree with these to float64 rounding (``tol("equiv64")``).
"""

from __future__ import annotations

import math

import numpy as np


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _ffn(x, gate_proj, up_proj, down_proj):
    return (_silu(x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T


def naive_gate_matrix(x, gate_params, config, *, mask_value=-math.inf):
    """Dense gate values G (N, E): ``G[t, i]`` is token t's weight on expert i, 0 if not selected.

    Ties are broken towards the lower expert id. Shapes: x (N, D) -> G (N, E).
    """
    w = gate_params["weight"]
    bias = gate_params.get("e_score_correction_bias")
    e, k = config.n_routed_experts, config.num_experts_per_tok
    n_group, per = config.n_group, config.n_routed_experts // config.n_group
    out = np.zeros((x.shape[0], e), dtype=x.dtype)
    for t in range(x.shape[0]):
        logits = [float(np.dot(x[t], w[i])) for i in range(e)]
        if config.scoring_func == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
        choice = [s + float(bias[i]) for i, s in enumerate(scores)] if config.topk_method == "noaux_tc" else scores
        if config.topk_method != "greedy" and n_group > 1:
            groups = [choice[g * per:(g + 1) * per] for g in range(n_group)]
            if config.topk_method == "group_limited_greedy":
                gscore = [max(g) for g in groups]                        # V2: the group's best expert
            else:
                gscore = [sum(sorted(g)[-2:]) for g in groups]           # V3: sum of the 2 best
            kept = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:config.topk_group]
            choice = [c if i // per in kept else mask_value for i, c in enumerate(choice)]
        chosen = sorted(range(e), key=lambda i: (-choice[i], i))[:k]
        sel = [scores[i] for i in chosen]
        denom = sum(sel) + 1e-20 if config.norm_topk_prob else 1.0
        for i, s in zip(chosen, sel, strict=True):
            out[t, i] = s / denom * config.routed_scaling_factor
    return out


def moe_dense_reference(x, params, config, *, mask_value=-math.inf, gate_matrix=None):
    r"""The MoE layer computed densely: :math:`\sum_i G_{t,i}\,\mathrm{FFN}_i(u_t) + \mathrm{Shared}(u_t)`.

    ``params`` as :func:`refimpl.moe.layer.moe_forward` takes them (stacked experts). ``gate_matrix``
    (N, E), if given, replaces the naive router's G (e.g. to apply a token-dropping mask).
    Shapes: x (..., D) -> y (..., D).
    """
    u = x.reshape(-1, x.shape[-1])
    g = naive_gate_matrix(u, params["gate"], config, mask_value=mask_value) if gate_matrix is None else gate_matrix
    ex = params["experts"]
    y = np.zeros_like(u)
    for i in range(config.n_routed_experts):                             # ascending expert id
        y = y + g[:, i:i + 1] * _ffn(u, ex["gate_proj"][i], ex["up_proj"][i], ex["down_proj"][i])
    if config.n_shared_experts:
        sh = params["shared_experts"]
        y = y + _ffn(u, sh["gate_proj"], sh["up_proj"], sh["down_proj"])
    return y.reshape(x.shape)
