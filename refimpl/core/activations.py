"""SiLU and SwiGLU, the gated activation of every DeepSeek FFN and expert.

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") multiplies a SiLU-activated gate by a
linear "up" projection. DeepSeek's dense FFNs and every routed and shared expert compute
``down_proj(silu(gate_proj(x)) * up_proj(x))`` (DeepSeek-V2 §2.2; ``MLP``/``Expert`` in DeepSeek's
inference code). The composite FFN with its three projections is :func:`swiglu_mlp_forward`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import FLOAT_DTYPES, check_float, check_same_dtype, check_shape, check_upstream
from .linear import linear_backward, linear_forward


def sigmoid(x):
    r"""Overflow-free logistic function :math:`\sigma(x) = \tfrac12(1 + \tanh(x/2))` (``±inf`` give 1 and 0)."""
    if not isinstance(x, np.ndarray) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a float32 or float64 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
    if np.isnan(x).any():
        raise ValueError("x: contains NaN")
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class SiLUCache(NamedTuple):
    x: np.ndarray      # (...) input
    sig: np.ndarray    # (...) sigmoid(x)


def silu_forward(x):
    r"""SiLU / swish: :math:`\mathrm{silu}(x) = x\,\sigma(x)`. Shapes: x (...) -> y (...)."""
    check_float("x", x)
    sig = sigmoid(x)                                                    # (...)
    return x * sig, SiLUCache(x, sig)


def silu_backward(dy, cache):
    r"""Gradient of :func:`silu_forward`: :math:`\sigma(x)(1 + x(1-\sigma(x)))`."""
    x, sig = cache
    check_upstream("dy", dy, x.shape)
    # forward: y = x * sig(x)     so: dy/dx = sig + x * sig * (1 - sig)
    return dy * sig * (1.0 + x * (1.0 - sig))                           # (...)


class SwiGLUCache(NamedTuple):
    gate: np.ndarray   # (..., I) gate pre-activation
    up: np.ndarray     # (..., I) up projection
    sig: np.ndarray    # (..., I) sigmoid(gate)


def swiglu_forward(gate, up):
    r"""Gated linear unit with SiLU: :math:`y = \mathrm{silu}(g) \odot u`.

    Shapes: gate (..., I), up (..., I) -> y (..., I).
    """
    check_float("gate", gate)
    check_float("up", up)
    check_same_dtype("up", up, "gate", gate)
    check_shape("up", up, gate.shape, "gate's shape")
    sig = sigmoid(gate)                                                 # (..., I)
    return gate * sig * up, SwiGLUCache(gate, up, sig)


def swiglu_backward(dy, cache):
    """Gradients of :func:`swiglu_forward`. Shapes: dy (..., I) -> dgate (..., I), dup (..., I)."""
    gate, up, sig = cache
    check_upstream("dy", dy, gate.shape)
    # forward: y = silu(gate) * up
    dup = dy * gate * sig                                               # (..., I)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))                  # (..., I)
    return dgate, dup


class SwiGLUMLPCache(NamedTuple):
    gate: object       # LinearCache of gate_proj
    up: object         # LinearCache of up_proj
    act: SwiGLUCache
    down: object       # LinearCache of down_proj


def swiglu_mlp_forward(x, params):
    r"""SwiGLU feed-forward network as in DeepSeek's dense layers and experts.

    .. math:: \mathrm{FFN}(x) = W_2\bigl(\mathrm{silu}(W_1 x) \odot W_3 x\bigr)

    with ``params = {"gate_proj": W1 (I, D), "up_proj": W3 (I, D), "down_proj": W2 (D, I)}``
    (HF checkpoint names), plus optional biases ``"gate_proj_bias"``, ``"up_proj_bias"``,
    ``"down_proj_bias"`` (transformers' Llama ``mlp_bias=True``; no DeepSeek or R1-Distill model has them).

    Shapes: x (..., D) -> y (..., D).
    """
    for k in ("gate_proj", "up_proj", "down_proj"):
        if k not in params:
            raise ValueError(f"params: missing '{k}' (expected gate_proj, up_proj, down_proj)")
    g, cg = linear_forward(x, params["gate_proj"], params.get("gate_proj_bias"))  # (..., I)
    u, cu = linear_forward(x, params["up_proj"], params.get("up_proj_bias"))      # (..., I)
    h, ca = swiglu_forward(g, u)                                        # (..., I)
    y, cd = linear_forward(h, params["down_proj"], params.get("down_proj_bias"))  # (..., D)
    return y, SwiGLUMLPCache(cg, cu, ca, cd)


def swiglu_mlp_backward(dy, cache):
    """Gradients of :func:`swiglu_mlp_forward`: ``dx`` and a dict with the params' keys."""
    # forward: y = down_proj(h)
    dh, dw_down, db_down = linear_backward(dy, cache.down)              # (..., I)
    # forward: h = silu(g) * u
    dg, du = swiglu_backward(dh, cache.act)                             # (..., I)
    # forward: g = gate_proj(x), u = up_proj(x)
    dx_g, dw_gate, db_gate = linear_backward(dg, cache.gate)            # (..., D)
    dx_u, dw_up, db_up = linear_backward(du, cache.up)                  # (..., D)
    grads = {"gate_proj": dw_gate, "up_proj": dw_up, "down_proj": dw_down}
    biases = {"gate_proj_bias": db_gate, "up_proj_bias": db_up, "down_proj_bias": db_down}
    return dx_g + dx_u, {**grads, **{k: v for k, v in biases.items() if v is not None}}
