"""DeepSeekMoE routers: which experts see a token, and with what weight.

A router scores every routed expert for a token, keeps the top ``K`` and turns the kept scores
into gate values :math:`g_{i,t}` that multiply the experts' outputs (DeepSeek-V2 §2.2 eq. 20-22;
DeepSeek-V3 §2.1.2 eq. 12-16). Two generations are implemented exactly as the released models
compute them:

* **V2 / V2-Lite** (``scoring_func="softmax"``): scores are a softmax over all experts; top-K is
  greedy or *group-limited* (``topk_method="group_limited_greedy"``: a group is scored by its best
  expert, only the best ``topk_group`` groups stay eligible, which is V2's device-limited routing,
  §2.2.2). The kept scores are not renormalised; they are multiplied by ``routed_scaling_factor``.
* **V3** (``topk_method="noaux_tc"``, ``scoring_func="sigmoid"``): scores are per-expert sigmoids.
  The load-balancing bias ``e_score_correction_bias`` is added for *selection only*; a group is
  scored by the sum of its two best biased scores (node-limited routing, §2.1.2), excluded groups
  are masked with ``-inf``, and the gate values are the *unbiased* kept scores renormalised to sum
  to one and multiplied by ``routed_scaling_factor``.

For comparison, :func:`mixtral_gate_forward` is the Mixtral / GShard-style router: top-K on the
logits, then a softmax over the kept logits. Both are entries of the router table
:data:`refimpl.moe.gates.GATES`, which the MoE layer reads (``ModelConfig.gate_type``).

Semantics choices where public implementations disagree (reference notes §4): normalisation is
keyed on ``norm_topk_prob`` and the scaling is always applied (as HF ``DeepseekV3TopkRouter`` and
DeepSeek's V3 remote code); the renormalisation denominator adds ``1e-20`` as HF does (DeepSeek's
inference code adds nothing; the two differ only when every kept score underflows); excluded groups
are masked with ``-inf`` as DeepSeek's inference code and transformers >= 5 (``mask_value=0.0``
reproduces the older HF / vLLM behaviour, which can select experts from excluded groups when biased
scores are negative). Ties are broken towards the lower expert id. Gradients flow into the gate
through the kept scores and the renormalisation, never through the discrete choice of experts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_integer, check_same_dtype, check_shape
from ..backend import kernel, resolve_backend
from ..core.activations import sigmoid
from ..core.softmax import SoftmaxCache, softmax_backward, softmax_forward

#: Added to the renormalisation denominator, as in HF ``DeepseekV3TopkRouter``.
NORM_EPS = 1e-20
#: How each ``topk_method`` scores an expert group (None: no group step).
GROUP_SCORE = {"greedy": None, "group_limited_greedy": "max", "noaux_tc": "top2_sum"}
_GROUP_MODE = {None: 0, "max": 1, "top2_sum": 2}


class Routing(NamedTuple):
    """What a router decided, for ``N`` tokens and ``E`` routed experts."""

    idx: np.ndarray        # (N, K) int64 selected experts, best (by selection score) first
    weights: np.ndarray    # (N, K) gate values g multiplying the selected experts' outputs
    scores: np.ndarray     # (N, E) unbiased affinities s (softmax or sigmoid of the logits)
    logits: np.ndarray     # (N, E) router logits x @ W_g.T


class GateCache(NamedTuple):
    x: np.ndarray          # (N, D) router input
    w: np.ndarray          # (E, D) gate weight (expert centroids)
    scores: np.ndarray     # (N, E) unbiased scores
    idx: np.ndarray        # (N, K) selected experts
    kept_scores: np.ndarray  # (N, K) unbiased scores of the selected experts
    denom: np.ndarray | None  # (N, 1) sum of kept_scores + NORM_EPS when renormalising, else None
    scoring_func: str      # "softmax" or "sigmoid"
    scale: float           # routed_scaling_factor
    has_bias: bool         # whether params held e_score_correction_bias


def check_router_config(config):
    """Validate ``config`` (a :class:`~refimpl.config.ModelConfig`) for routing; return it."""
    if not hasattr(config, "n_routed_experts"):
        raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    config.validate()
    if config.n_routed_experts < 1:
        raise ValueError("config.n_routed_experts: expected >= 1 routed experts for an MoE layer, got 0")
    return config


def check_gate_params(x, params, config):
    """Validate the DeepSeek router's ``params`` for input ``x`` (N, D): ``weight`` (E, D) in x's dtype,
    ``e_score_correction_bias`` (E,) exactly when ``topk_method="noaux_tc"``; return ``(weight, bias or None)``."""
    if not isinstance(params, dict) or "weight" not in params:
        raise ValueError("params: expected a dict with 'weight' (E, D) and, for noaux_tc, "
                         "'e_score_correction_bias' (E,)")
    w = check_float("params['weight']", params["weight"], ndim=2)
    check_shape("params['weight']", w, (config.n_routed_experts, x.shape[-1]), "(n_routed_experts, D)")
    check_same_dtype("params['weight']", w, "x", x)
    bias = params.get("e_score_correction_bias")
    if config.topk_method == "noaux_tc":
        if bias is None:
            raise ValueError("params: 'e_score_correction_bias' (E,) is required for topk_method='noaux_tc'")
        check_float("params['e_score_correction_bias']", bias, ndim=1)
        check_shape("params['e_score_correction_bias']", bias, (config.n_routed_experts,), "(n_routed_experts,)")
    elif bias is not None:
        raise ValueError(f"params: 'e_score_correction_bias' is only used by topk_method='noaux_tc', "
                         f"got topk_method={config.topk_method!r}")
    return w, bias


def select_experts(selection_scores, k, *, n_group=1, topk_group=1, group_score=None, mask_value=-np.inf,
                   backend=None):
    r"""Indices of the top-``k`` selection scores, optionally limited to the best ``topk_group`` groups.

    Experts are split into ``n_group`` contiguous groups of ``E / n_group`` ids. A group's score is its
    best expert (``group_score="max"``, V2 eq. in §2.2.2) or the sum of its two best experts
    (``"top2_sum"``, V3 §2.1.2); experts outside the best ``topk_group`` groups are set to
    ``mask_value`` before the final top-k. Ties go to the lower index.

    Shapes: selection_scores (N, E) -> idx (N, k) int64, best first.
    """
    choice = selection_scores                                             # (N, E) what the top-k ranks
    check_float("selection_scores", choice, ndim=2)
    k = check_integer("k", k, low=1)
    n, e = choice.shape
    if not 1 <= k <= e:
        raise ValueError(f"k: expected 1..{e} (the number of experts), got {k}")
    if group_score not in _GROUP_MODE:
        raise ValueError(f"group_score: expected one of {list(_GROUP_MODE)}, got {group_score!r}")
    if group_score is not None and (n_group < 1 or e % n_group):
        raise ValueError(f"n_group: expected a divisor of the {e} experts, got {n_group}")
    if group_score is not None and not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group: expected 1..n_group ({n_group}), got {topk_group}")
    if group_score == "top2_sum" and n_group > 1 and e // n_group < 2:
        raise ValueError(f"n_group: top2_sum needs >= 2 experts per group, got {e // n_group}")
    if group_score is None or n_group == 1:
        n_group, topk_group, group_score = 1, 1, None
    if group_score is not None and k > topk_group * (e // n_group) and mask_value == -np.inf:
        raise ValueError(f"k: {k} exceeds the {topk_group * (e // n_group)} experts in topk_group groups")
    if resolve_backend(backend, work=choice.size) == "numba":
        choice = np.ascontiguousarray(choice)
        return kernel("moe_nb").select_experts(choice, k, n_group, topk_group, _GROUP_MODE[group_score],
                                               float(mask_value))
    if group_score is not None:
        grouped = choice.reshape(n, n_group, e // n_group)                # (N, G, E/G)
        if group_score == "max":
            gscore = grouped.max(axis=-1)                                 # (N, G)
        else:
            gscore = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)     # (N, G) top-2 sum
        keep = np.argsort(-gscore, axis=-1, kind="stable")[:, :topk_group]  # (N, topk_group)
        gmask = np.zeros((n, n_group), dtype=bool)                        # (N, G)
        np.put_along_axis(gmask, keep, True, axis=1)
        emask = np.repeat(gmask, e // n_group, axis=1)                    # (N, E)
        choice = np.where(emask, choice, choice.dtype.type(mask_value))   # (N, E)
    return np.argsort(-choice, axis=-1, kind="stable")[:, :k].astype(np.int64)  # (N, K)


def gate_forward(x, params, config, *, mask_value=-np.inf, backend=None, routes=None):
    r"""DeepSeek-V2/V3 router, as ``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter`` compute it.

    .. math::
        s_{i,t} = \mathrm{softmax}_i(W_g u_t) \text{ (V2, eq. 21) or } \sigma(e_i^\top u_t) \text{ (V3, eq. 15)},
        \qquad \mathcal{K}_t = \mathrm{TopK}(\{s_{j,t} + b_j\}, K) \text{ (V3 eq. 16; } b = 0 \text{ in V2)},

        g_{i,t} = \gamma \, s_{i,t} \big/ \textstyle\sum_{j \in \mathcal{K}_t} s_{j,t}
        \ \text{(if norm\_topk\_prob, V3 eq. 13)} \quad\text{else}\quad g_{i,t} = \gamma\, s_{i,t},

    with :math:`\gamma` = ``routed_scaling_factor`` and the group limit described in the module
    docstring. ``params = {"weight": (E, D), "e_score_correction_bias": (E,)}`` (the bias only for
    ``noaux_tc``). Logits are computed in the input's dtype (HF uses float32 even for float64 models).

    ``routes`` (N, K) int64, optional: DeepSeek-V3.2's *Keep Routing* (arXiv 2512.02556 §3.1) —
    use these experts (recorded at sampling time) instead of choosing: the selection step (bias,
    group limit, top-K) is skipped, and the gate values are formed from the *current* scores on the
    given experts exactly as above, so the gate weights of those experts still get gradients.

    Shapes: x (N, D) -> Routing(idx (N, K), weights (N, K), scores (N, E), logits (N, E)), GateCache.
    """
    check_router_config(config)
    check_float("x", x, ndim=2)
    w, bias = check_gate_params(x, params, config)
    logits = x @ w.T                                                      # (N, E)
    if config.scoring_func == "softmax":
        scores, _ = softmax_forward(logits)                               # (N, E)
    else:
        scores = sigmoid(logits)                                          # (N, E)
    if routes is not None:                                                # Keep Routing: no selection
        idx = check_routes(routes, x.shape[0], config)                    # (N, K)
    else:
        choice = scores + bias.astype(scores.dtype) if bias is not None else scores  # (N, E) selection only
        idx = select_experts(choice, config.num_experts_per_tok, n_group=config.n_group,
                             topk_group=config.topk_group, group_score=GROUP_SCORE[config.topk_method],
                             mask_value=mask_value, backend=backend)      # (N, K)
    kept = np.take_along_axis(scores, idx, axis=1)                        # (N, K) unbiased
    denom = None
    if config.norm_topk_prob:
        denom = kept.sum(axis=1, keepdims=True) + NORM_EPS                # (N, 1)
        weights = kept / denom * config.routed_scaling_factor             # (N, K)
    else:
        weights = kept * config.routed_scaling_factor                     # (N, K)
    weights = weights.astype(x.dtype, copy=False)
    cache = GateCache(x, w, scores, idx, kept, denom, config.scoring_func, float(config.routed_scaling_factor),
                      bias is not None)
    return Routing(idx, weights, scores, logits), cache


def check_routes(routes, n, config):
    """Validate recorded expert indices for Keep Routing: (n, K) ints in [0, E), distinct per row."""
    r = np.asarray(routes)
    k, e = config.num_experts_per_tok, config.n_routed_experts
    if r.dtype.kind not in "iu":
        raise TypeError(f"routes: expected integer expert indices, got dtype {r.dtype}")
    if r.shape != (n, k):
        raise ValueError(f"routes: expected shape ({n}, {k}) (tokens, num_experts_per_tok), got {r.shape}")
    if r.size and (r.min() < 0 or r.max() >= e):
        raise ValueError(f"routes: expected expert indices in [0, {e}), got values in [{r.min()}, {r.max()}]")
    if k > 1 and (np.diff(np.sort(r, axis=1), axis=1) == 0).any():
        raise ValueError("routes: expected distinct experts in every row")
    return r.astype(np.int64, copy=False)


def gate_backward(dweights, cache, dscores=None):
    r"""Gradients of :func:`gate_forward` through the kept scores (the selection is piecewise constant).

    ``dscores`` (N, E), optional, is a gradient arriving at the unbiased scores from elsewhere (the
    balance losses' :math:`P_i` terms). The bias gets a zero gradient: it only moves the selection,
    and is updated outside the gradient (V3 §2.1.2).

    Shapes: dweights (N, K) -> dx (N, D), dparams {"weight": (E, D)[, "e_score_correction_bias": (E,)]}.
    """
    x, w, scores, idx, kept, denom, scoring_func, scale, has_bias = cache
    if denom is not None:
        # forward: g_k = scale * kept_k / (sum_j kept_j + eps)
        # so: dkept_j = scale / denom * (dg_j - sum_k dg_k * kept_k / denom)
        dkept = scale / denom * (dweights - np.sum(dweights * kept, axis=1, keepdims=True) / denom)  # (N, K)
    else:
        # forward: g_k = scale * kept_k
        dkept = scale * dweights                                          # (N, K)
    # forward: kept = take_along_axis(scores, idx)    so: scatter dkept back (ids are distinct per row)
    if dscores is not None:
        check_shape("dscores", np.asarray(dscores), scores.shape, "(N, E), like the scores")
    ds = np.zeros_like(scores) if dscores is None else np.array(dscores, dtype=scores.dtype)  # (N, E)
    rows = np.arange(idx.shape[0])[:, None]                               # (N, 1)
    ds[rows, idx] += dkept
    if scoring_func == "softmax":
        # forward: scores = softmax(logits)
        dlogits = softmax_backward(ds, SoftmaxCache(scores, -1))                      # (N, E)
    else:
        # forward: scores = sigmoid(logits)
        dlogits = ds * scores * (1.0 - scores)                            # (N, E)
    # forward: logits = x @ w.T
    dx = dlogits @ w                                                      # (N, D)
    dw = dlogits.T @ x                                                    # (E, D)
    dparams = {"weight": dw.astype(w.dtype, copy=False)}
    if has_bias:
        dparams["e_score_correction_bias"] = np.zeros(w.shape[0], dtype=w.dtype)  # (E,)
    return dx.astype(x.dtype, copy=False), dparams


class MixtralGateCache(NamedTuple):
    x: np.ndarray          # (N, D)
    w: np.ndarray          # (E, D)
    idx: np.ndarray        # (N, K)
    weights: np.ndarray    # (N, K) softmax over the kept logits
    n_experts: int


def mixtral_gate_forward(x, w, k, *, backend=None):
    r"""Mixtral / GShard-style router: top-K on the logits, softmax over the kept logits.

    .. math:: g_{i,t} = \frac{\exp l_{i,t}}{\sum_{j\in\mathcal{K}_t}\exp l_{j,t}},\quad
              \mathcal{K}_t = \mathrm{TopK}(l_t, K)

    This equals a softmax over all experts renormalised over the kept ones, i.e. the DeepSeek
    router with ``scoring_func="softmax", topk_method="greedy", norm_topk_prob=True,
    routed_scaling_factor=1`` (a test checks it). ``scores`` in the result is the full softmax.

    Shapes: x (N, D), w (E, D) -> Routing, MixtralGateCache.
    """
    check_float("x", x, ndim=2)
    check_float("w", w, ndim=2)
    check_same_dtype("w", w, "x", x)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: expected shape (E, {x.shape[1]}), got {w.shape}")
    logits = x @ w.T                                                      # (N, E)
    idx = select_experts(logits, k, backend=backend)                      # (N, K)
    kept = np.take_along_axis(logits, idx, axis=1)                        # (N, K)
    weights, _ = softmax_forward(kept)                                    # (N, K)
    scores, _ = softmax_forward(logits)                                   # (N, E)
    return Routing(idx, weights, scores, logits), MixtralGateCache(x, w, idx, weights, w.shape[0])


def mixtral_gate_backward(dweights, cache):
    """Gradients of :func:`mixtral_gate_forward`. Shapes: dweights (N, K) -> dx (N, D), dw (E, D)."""
    x, w, idx, weights, n_experts = cache
    # forward: weights = softmax(kept)
    dkept = softmax_backward(dweights, SoftmaxCache(weights, -1))                     # (N, K)
    # forward: kept = take_along_axis(logits, idx)
    dlogits = np.zeros((x.shape[0], n_experts), dtype=dkept.dtype)        # (N, E)
    np.put_along_axis(dlogits, idx, dkept, axis=1)
    # forward: logits = x @ w.T
    return dlogits @ w, dlogits.T @ x                                     # (N, D), (E, D)
