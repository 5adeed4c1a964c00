r"""The table of MoE routers ("gates"): one :class:`Gate` entry per router, chosen by ``config.gate_type``.

A router maps the tokens :math:`u_t` (N, D) to the experts each one uses (``idx`` (N, K)), their
gate values (``weights`` (N, K)) and the affinities the balance losses read (``scores`` (N, E)).
An entry holds:

* ``forward(x, params, config, *, mask_value, backend, routes) -> (Routing, cache)`` and
  ``backward(dweights, cache, dscores=None) -> (dx, dparams)`` (``dscores``: the balance losses'
  gradient at ``scores``; ``routes``: Keep Routing's recorded experts, DeepSeek-V3.2 §3.1);
* ``param_shapes(config) -> {name: shape}``: its parameters under ``mlp.gate`` (HF checkpoint
  names), from which :func:`~refimpl.moe.init_moe_params`, the model's expected parameter tree
  and the checkpoint layout follow;
* ``init(config, normal, dtype) -> params`` (``normal(*shape)`` draws the N(0, std) weights);
* ``check_params(x, params, config)``, and ``check_config(config)`` for settings it cannot honour.

:func:`~refimpl.moe.moe_forward`, :func:`~refimpl.model.init_params` and training dispatch on
``config.gate_type``; a new router is one :func:`register_gate` call (or one line in :data:`GATES`)
plus its functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .._tables import register_entry, table_entry
from .._validate import check_float, check_same_dtype, check_shape
from ..core.softmax import SoftmaxCache, softmax_backward, softmax_forward
from .gating import (
    MixtralGateCache,
    Routing,
    check_gate_params,
    check_routes,
    gate_backward,
    gate_forward,
    mixtral_gate_backward,
    mixtral_gate_forward,
)


@dataclass(frozen=True)
class Gate:
    """One router: forward/backward, parameter shapes and init, parameter and config checks."""

    name: str
    forward: Callable
    backward: Callable
    param_shapes: Callable
    init: Callable
    check_params: Callable
    check_config: Callable | None = None


def check_params_against_shapes(x, params, config, shapes):
    """Generic parameter check: ``params`` has exactly ``shapes``' names, float arrays of those shapes in x's dtype."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of the gate's arrays {sorted(shapes)}, got {type(params).__name__}")
    for name in sorted(set(shapes) ^ set(params)):
        raise ValueError(f"params: {'missing' if name in shapes else 'unexpected'} gate entry '{name}' "
                         f"(gate_type={config.gate_type!r} takes {sorted(shapes)})")
    for name, shape in shapes.items():
        a = check_float(f"params['{name}']", params[name])
        check_shape(f"params['{name}']", a, shape, f"for gate_type={config.gate_type!r}")
        check_same_dtype(f"params['{name}']", a, "x", x)


# ----------------------------------------------------------------------------------------------
# DeepSeek-V2/V3 (refimpl.moe.gating.gate_forward)
# ----------------------------------------------------------------------------------------------

def deepseek_gate_shapes(config):
    """``weight`` (E, D), plus ``e_score_correction_bias`` (E,) for ``topk_method="noaux_tc"``."""
    e = config.n_routed_experts
    shapes = {"weight": (e, config.hidden_size)}
    if config.topk_method == "noaux_tc":
        shapes["e_score_correction_bias"] = (e,)
    return shapes


def deepseek_gate_init(config, normal, dtype):
    """Normal weights and a zero correction bias (V3 starts the bias at 0, §2.1.2)."""
    e, d = config.n_routed_experts, config.hidden_size
    gate = {"weight": normal(e, d)}                                       # (E, D)
    if config.topk_method == "noaux_tc":
        gate["e_score_correction_bias"] = np.zeros(e, dtype=dtype)        # (E,)
    return gate


# ----------------------------------------------------------------------------------------------
# Mixtral (refimpl.moe.gating.mixtral_gate_forward) in the layer's signature
# ----------------------------------------------------------------------------------------------

class MixtralLayerCache(NamedTuple):
    inner: object          # MixtralGateCache
    scores: np.ndarray     # (N, E) full softmax, for the balance losses' gradient


def mixtral_check_config(config):
    """The Mixtral router has no bias and no group limit: ``topk_method`` must be ``"greedy"``."""
    if config.topk_method != "greedy":
        raise ValueError(f"topk_method: gate_type='mixtral' selects greedily without a bias or groups; expected "
                         f"'greedy', got {config.topk_method!r}")


def mixtral_layer_forward(x, params, config, *, mask_value=-np.inf, backend=None, routes=None):
    r""":func:`~refimpl.moe.gating.mixtral_gate_forward` as an MoE-layer router (``params = {"weight": (E, D)}``).

    ``scoring_func``, ``norm_topk_prob`` and ``routed_scaling_factor`` do not apply (the gate values
    are a softmax over the kept logits); ``routes`` (Keep Routing) takes the recorded experts and
    forms the same softmax over their current logits; ``mask_value`` is unused (no groups).

    Shapes: x (N, D) -> Routing, MixtralLayerCache.
    """
    check_params_against_shapes(x, params, config, {"weight": (config.n_routed_experts, x.shape[-1])})
    w = params["weight"]
    if routes is None:
        routing, cache = mixtral_gate_forward(x, w, config.num_experts_per_tok, backend=backend)
    else:
        idx = check_routes(routes, x.shape[0], config)                    # (N, K)
        logits = x @ w.T                                                  # (N, E)
        weights, _ = softmax_forward(np.take_along_axis(logits, idx, axis=1))  # (N, K)
        scores, _ = softmax_forward(logits)                               # (N, E)
        routing = Routing(idx, weights, scores, logits)
        cache = MixtralGateCache(x, w, idx, weights, w.shape[0])
    return routing, MixtralLayerCache(cache, routing.scores)


def mixtral_layer_backward(dweights, cache, dscores=None):
    """Gradients of :func:`mixtral_layer_forward`. Shapes: dweights (N, K) -> dx (N, D), {"weight": (E, D)}."""
    dx, dw = mixtral_gate_backward(dweights, cache.inner)                 # (N, D), (E, D)
    if dscores is not None:
        x, w = cache.inner.x, cache.inner.w
        # forward: scores = softmax(x @ w.T)     so: dlogits = softmax VJP of dscores
        ds = np.asarray(dscores, dtype=cache.scores.dtype)                # (N, E)
        dlogits = softmax_backward(ds, SoftmaxCache(cache.scores, -1))    # (N, E)
        dx = dx + dlogits @ w                                             # (N, D)
        dw = dw + dlogits.T @ x                                           # (E, D)
    return dx.astype(cache.inner.x.dtype, copy=False), {"weight": dw.astype(cache.inner.w.dtype, copy=False)}


#: The routers by ``config.gate_type``.
GATES: dict[str, Gate] = {
    "deepseek": Gate("deepseek", gate_forward, gate_backward, deepseek_gate_shapes, deepseek_gate_init,
                     check_gate_params),
    "mixtral": Gate("mixtral", mixtral_layer_forward, mixtral_layer_backward,
                    lambda config: {"weight": (config.n_routed_experts, config.hidden_size)},
                    lambda config, normal, dtype: {"weight": normal(config.n_routed_experts, config.hidden_size)},
                    lambda x, params, config: check_params_against_shapes(
                        x, params, config, {"weight": (config.n_routed_experts, x.shape[-1])}),
                    mixtral_check_config),
}


def register_gate(entry: Gate) -> Gate:
    """Add (or replace) a router; ``config.gate_type`` then accepts its name."""
    return register_entry(GATES, entry, Gate)


def get_gate(name) -> Gate:
    """The table entry of ``gate_type`` ``name`` (ValueError naming ``gate_type`` otherwise)."""
    return table_entry(GATES, name, "gate_type")
