"""Hypothesis strategies for MoE tests: small configs, parameters and inputs without routing near-ties.

A top-k choice is discontinuous: if two selection scores are within the finite-difference step the
choice flips while perturbing, and a gradient check compares two different functions. ``margin``
measures the smallest gap at any selection boundary (group choice and expert choice) and the
strategies reject draws whose gap is under ``MIN_MARGIN``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from refimpl.core.activations import sigmoid
from refimpl.core.softmax import softmax_forward
from refimpl.moe import init_moe_params
from refimpl.moe.gating import GROUP_SCORE
from refimpl.testing import strategies as rst

MIN_MARGIN = 1e-4


def margin(x, gate, cfg):
    """Smallest gap between the last kept and the first rejected candidate, over groups and experts."""
    logits = x.reshape(-1, x.shape[-1]) @ gate["weight"].T
    s = softmax_forward(logits)[0] if cfg.scoring_func == "softmax" else sigmoid(logits)
    c = s + gate["e_score_correction_bias"] if cfg.topk_method == "noaux_tc" else s
    n, e = c.shape
    gaps = [np.inf]
    mode = GROUP_SCORE[cfg.topk_method]
    if mode is not None and cfg.n_group > 1:
        g = c.reshape(n, cfg.n_group, -1)
        gs = g.max(-1) if mode == "max" else np.sort(g, -1)[..., -2:].sum(-1)
        ranked = -np.sort(-gs, axis=1)
        if cfg.topk_group < cfg.n_group:
            gaps.append(np.min(ranked[:, cfg.topk_group - 1] - ranked[:, cfg.topk_group]))
        kept = np.argsort(-gs, axis=1, kind="stable")[:, :cfg.topk_group]
        mask = np.zeros((n, cfg.n_group), bool)
        np.put_along_axis(mask, kept, True, axis=1)
        c = np.where(np.repeat(mask, e // cfg.n_group, axis=1), c, -np.inf)
    cs = -np.sort(-c, axis=1)
    k = cfg.num_experts_per_tok
    if k < e:
        nxt = cs[:, k]
        gaps.append(np.min(np.where(np.isfinite(nxt), cs[:, k - 1] - nxt, np.inf)))
    # distinct scores among the kept ones too, so that "best first" order is stable
    if k > 1:
        gaps.append(np.min(cs[:, :k - 1] - cs[:, 1:k]))
    return float(min(gaps))


@st.composite
def moe_configs(draw, norm=None):
    """A small MoE ModelConfig from the shared strategy, with norm_topk_prob also drawn."""
    cfg = draw(rst.model_configs(moe=True))
    if norm is None:
        norm = draw(st.booleans())
    return cfg.replace(norm_topk_prob=norm, scoring_func=draw(st.sampled_from([cfg.scoring_func, "softmax",
                                                                               "sigmoid"])))


@st.composite
def moe_cases(draw, configs=None, max_tokens=6, dtype=np.float64, lead=None):
    """(cfg, params, x) with random gate/bias/expert weights and tokens; no near-ties in routing."""
    cfg = draw(configs if configs is not None else moe_configs())
    rng = draw(rst.seeds())
    params = init_moe_params(cfg, rng, std=0.4, dtype=dtype)
    # logits of std ~1.5: varied routing, but no saturated sigmoid whose tiny gradient would drown in
    # the finite differences' rounding
    params["gate"]["weight"] = (1.5 / np.sqrt(cfg.hidden_size) *
                                rng.standard_normal(params["gate"]["weight"].shape)).astype(dtype)
    if cfg.topk_method == "noaux_tc":
        params["gate"]["e_score_correction_bias"] = (0.3 * rng.standard_normal(cfg.n_routed_experts)
                                                     ).astype(dtype)
    shape = lead if lead is not None else (draw(st.integers(1, 2)), draw(st.integers(1, max_tokens)))
    x = rng.standard_normal((*shape, cfg.hidden_size)).astype(dtype)
    assume(margin(x, params["gate"], cfg) > MIN_MARGIN)
    return cfg, params, x
