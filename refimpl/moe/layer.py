r"""The DeepSeekMoE layer: shared experts plus fine-grained routed experts, forward and backward.

DeepSeekMoE (Dai et al. 2024; DeepSeek-V2 §2.2 eq. 20-22; DeepSeek-V3 §2.1.2 eq. 12-16) replaces a
dense FFN by many small routed experts, of which each token uses ``K``, plus ``Es`` shared experts
every token uses:

.. math:: h'_t = u_t + \sum_{i=1}^{E_s} \mathrm{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{E} g_{i,t}\,\mathrm{FFN}^{(r)}_i(u_t)

The residual :math:`u_t +` belongs to the transformer block, so :func:`moe_forward` returns only the
two sums. Fine-grained experts (many narrow ones, more of them per token) give far more ways to
combine specialists for the same compute; shared experts hold common knowledge so routed experts
need not each relearn it (DeepSeekMoE §3.1-3.2).

**Parameters** (HF checkpoint names; weights ``[out, in]``)::

    {"gate": {"weight": (E, D), "e_score_correction_bias": (E,)  # bias only for noaux_tc (V3)
     },
     "experts": {"gate_proj": (E, I, D), "up_proj": (E, I, D), "down_proj": (E, D, I)},
     "shared_experts": {"gate_proj": (Es*I, D), "up_proj": (Es*I, D), "down_proj": (D, Es*I)}}

The routed experts are *stacked*: ``experts["gate_proj"][i]`` is the checkpoint tensor
``mlp.experts.{i}.gate_proj.weight``. Stacking keeps one array per projection whatever E is (256 in
V3), so a gradient is three arrays, permuting experts is one fancy index, and the Numba kernels
and the per-expert GEMMs take the arrays as they are; it is also how transformers >= 5 holds experts
in memory (with gate and up fused). :func:`refimpl.moe.params.experts_from_list` and
:func:`~refimpl.moe.params.experts_to_list` convert from and to the per-expert checkpoint layout.
As in the released code, the ``Es`` shared experts are one SwiGLU MLP of width ``Es*I``.

The routed sum is computed sparsely (:mod:`refimpl.moe.dispatch`); the shared output is added last,
as in HF and DeepSeek's inference code.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_same_dtype, check_shape, check_upstream
from ..backend import resolve_backend
from ..core.activations import swiglu_mlp_backward, swiglu_mlp_forward
from .balance import expert_load
from .dispatch import (
    capacity_keep,
    combine,
    combine_backward,
    dispatch,
    dispatch_backward,
    experts_backward,
    experts_forward,
    make_plan,
)
from .gates import get_gate
from .gating import check_router_config


class MoECache(NamedTuple):
    gate: object           # the router's cache (GateCache for gate_type "deepseek")
    plan: object           # DispatchPlan
    experts: object        # ExpertsCache
    ys: np.ndarray         # (A, D) expert outputs in the sorted layout
    weights: np.ndarray    # (N, K) gate values
    shared: object | None  # SwiGLUMLPCache of the shared experts, or None
    shape: tuple           # input shape (..., D)
    backend: str | None
    gate_backward: object  # the router's backward (its entry in refimpl.moe.gates.GATES)


def check_moe_params(params, config, dtype):
    """Raise ValueError/TypeError naming the first missing or mis-shaped tensor of an MoE layer."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict, got {type(params).__name__}")
    e, d, i, ns = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.n_shared_experts
    for key in ("gate", "experts") + (("shared_experts",) if ns else ()):
        if key not in params:
            raise ValueError(f"params: missing '{key}'")
    experts = params["experts"]
    if not isinstance(experts, dict):
        raise TypeError("params['experts']: expected a dict of stacked arrays (gate_proj (E, I, D), ...); "
                        "convert a per-expert list with refimpl.moe.params.experts_from_list")
    shapes = {"gate_proj": (e, i, d), "up_proj": (e, i, d), "down_proj": (e, d, i)}
    for name, shape in shapes.items():
        if name not in experts:
            raise ValueError(f"params['experts']: missing '{name}'")
        w = check_float(f"params['experts']['{name}']", experts[name])
        check_shape(f"params['experts']['{name}']", w, shape, "stacked (E, out, in)")
        if w.dtype != dtype:
            raise TypeError(f"params['experts']['{name}']: expected dtype {dtype} to match x, got {w.dtype}")
    if ns:
        sh = params["shared_experts"]
        for name, shape in {"gate_proj": (ns * i, d), "up_proj": (ns * i, d), "down_proj": (d, ns * i)}.items():
            if name not in sh:
                raise ValueError(f"params['shared_experts']: missing '{name}'")
            check_shape(f"params['shared_experts']['{name}']", sh[name], shape, "(out, in), width Es*I")


def moe_forward(x, params, config, *, capacity_factor=None, n_devices=None, mask_value=-np.inf, backend=None,
                routes=None):
    r"""DeepSeekMoE layer output (without the residual), computed sparsely.

    Parameters
    ----------
    x : (..., D) float32/float64 array, the normalised hidden states :math:`u_t`.
    params : dict, see the module docstring.
    config : :class:`~refimpl.config.ModelConfig`; uses ``n_routed_experts``, ``num_experts_per_tok``,
        ``n_group``, ``topk_group``, ``topk_method``, ``scoring_func``, ``norm_topk_prob``,
        ``routed_scaling_factor``, ``moe_intermediate_size``, ``n_shared_experts``, ``hidden_size``.
    capacity_factor : float, optional
        Turns on V2's device-level token dropping (§2.2.4) with this factor (V2 trains with 1.0).
    n_devices : int, optional
        Devices for token dropping (default ``n_group``, the groups of device-limited routing).
    mask_value : float
        Selection value of experts in excluded groups (``-inf``; ``0.0`` reproduces the old HF bug).
    backend : "auto", "numpy", "numba" or None.
        One choice for routing, dispatch and combine (and their backwards). The SwiGLU between the
        expert GEMMs gets the argument unresolved, so that ``None`` keeps it on the reference
        (:func:`~refimpl.moe.dispatch.experts_forward`); an explicit choice reaches its twin too.
    routes : (..., K) int array, optional
        Keep Routing (DeepSeek-V3.2 §3.1): the experts recorded at sampling time (``info["idx"]``
        of that forward), used instead of the router's choice; the gate values are recomputed from
        the current router on them (:func:`~refimpl.moe.gating.gate_forward`).

    Returns
    -------
    y : (..., D) array
    cache : MoECache for :func:`moe_backward`
    info : dict with ``idx`` (..., K), ``weights`` (..., K), ``scores`` (..., E) (feed these to the
        balance losses), ``load`` (E,) selections per expert, ``load_kept`` (E,) copies computed,
        and with a capacity factor ``capacity``, ``dropped``, ``drop_fraction``, ``device_load``,
        ``device_dropped``, ``tokens_fully_dropped``.
    """
    check_router_config(config)
    check_float("x", x, min_ndim=1)
    if x.shape[-1] != config.hidden_size:
        raise ValueError(f"x: expected last axis hidden_size={config.hidden_size}, got shape {x.shape}")
    check_moe_params(params, config, x.dtype)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    lead = x.shape[:-1]
    u = x.reshape(-1, x.shape[-1])                                        # (N, D)
    requested, backend = backend, resolve_backend(backend, work=u.size * k)  # one choice for every step
    if routes is not None:
        routes = np.asarray(routes)
        if routes.shape[:-1] != lead:
            raise ValueError(f"routes: expected shape {(*lead, k)} to match x's leading axes, got {routes.shape}")
        routes = routes.reshape(-1, routes.shape[-1])                     # (N, K)
    gate = get_gate(config.gate_type)                                     # the router of the gate table
    routing, gcache = gate.forward(u, params["gate"], config, mask_value=mask_value, backend=backend,
                                   routes=routes)
    keep, info = None, {}
    if capacity_factor is not None:
        affinity = np.take_along_axis(routing.scores, routing.idx, axis=1)  # (N, K) unbiased s
        keep, info = capacity_keep(routing.idx, affinity, e, n_devices or config.n_group, capacity_factor)
    plan = make_plan(routing.idx, e, keep, backend=backend)
    xs = dispatch(u, plan, backend=backend)                               # (A, D)
    ys, ecache = experts_forward(xs, params["experts"], plan.offsets, backend=requested)  # (A, D)
    y = combine(ys, routing.weights, plan, backend=backend)               # (N, D)
    scache = None
    if config.n_shared_experts:
        check_same_dtype("params['shared_experts']['gate_proj']", params["shared_experts"]["gate_proj"], "x", x)
        y_shared, scache = swiglu_mlp_forward(u, params["shared_experts"])  # (N, D)
        y = y + y_shared                                                  # (N, D)
    info.update(idx=routing.idx.reshape(*lead, k), weights=routing.weights.reshape(*lead, k),
                scores=routing.scores.reshape(*lead, e), load=expert_load(routing.idx, e),
                load_kept=np.diff(plan.offsets))
    cache = MoECache(gcache, plan, ecache, ys, routing.weights, scache, x.shape, backend, gate.backward)
    return y.reshape(x.shape), cache, info


def moe_backward(dy, cache, dscores=None):
    """Gradients of :func:`moe_forward`, in reverse order of the forward.

    ``dscores`` (..., E), optional, is the gradient of balance losses with respect to
    ``info["scores"]`` (see :func:`refimpl.moe.balance.balance_backward`).

    Shapes: dy (..., D) -> dx (..., D), dparams with the tree of ``params``.
    """
    gcache, plan, ecache, ys, weights, scache, shape, backend, gate_backward = cache
    check_upstream("dy", dy, shape)
    dyf = dy.reshape(-1, shape[-1])                                       # (N, D)
    dparams = {}
    dx = np.zeros_like(dyf)                                               # (N, D)
    if scache is not None:
        # forward: y = y_routed + shared(u)
        dx_shared, dparams["shared_experts"] = swiglu_mlp_backward(dyf, scache)  # (N, D)
        dx += dx_shared
    # forward: y_routed = combine(ys, weights)
    dys, dweights = combine_backward(dyf, ys, weights, plan, backend=backend)  # (A, D), (N, K)
    # forward: ys = experts(xs)
    dxs, dparams["experts"] = experts_backward(dys, ecache)              # (A, D)
    # forward: xs = dispatch(u)
    dx += dispatch_backward(dxs, plan, backend=backend)                  # (N, D)
    # forward: weights, scores = gate(u)
    if dscores is not None:
        e = len(plan.offsets) - 1                                         # E routed experts
        check_shape("dscores", np.asarray(dscores), shape[:-1] + (e,), "(..., E), like info['scores']")
        dscores = np.asarray(dscores).reshape(-1, e)                      # (N, E)
    dx_gate, dparams["gate"] = gate_backward(dweights, gcache, dscores)   # (N, D)
    dx += dx_gate
    return dx.reshape(shape), {k: dparams[k] for k in ("gate", "experts", "shared_experts") if k in dparams}
