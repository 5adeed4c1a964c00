"""Linear map and token embedding, the two ways parameters meet activations.

DeepSeek-V2/V3 use no biases in any projection (``attention_bias=false``), and weights are stored
``[out, in]`` as in HF checkpoints, so ``y = x @ W.T`` and a checkpoint tensor loads without a
transpose. The bias is kept optional for the baselines and the distilled students.

**Low-precision hook.** The three matrix products of a linear layer (forward ``x @ W.T``, input
gradient ``dy @ W``, weight gradient ``dy.T @ x``) can be routed through another implementation
for the duration of a ``with`` block, as DeepSeek-V3 §3.3 runs them in FP8: see
:func:`refimpl.quant.fp8_autocast`. The hook lives in the context variable :data:`GEMM_OVERRIDE`
(``None`` by default, and then these functions compute exactly what they compute without it); a
layer computed under the hook keeps the hook in its cache, so its backward uses the same GEMMs
even if the ``with`` block has ended.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_int, check_same_dtype, check_shape, check_upstream

#: The active low-precision GEMM provider, or ``None`` (plain float products). A provider has
#: ``applies(w) -> bool`` and three methods on 2-D arrays: ``fprop(x, w) = x @ w.T``,
#: ``dgrad(dy, w) = dy @ w`` and ``wgrad(dy, x) = dy.T @ x`` (each in its own arithmetic).
GEMM_OVERRIDE: ContextVar = ContextVar("refimpl_gemm_override", default=None)


def active_gemm(w):
    """The GEMM provider that applies to weight ``w`` now, or ``None`` for plain float products."""
    gemm = GEMM_OVERRIDE.get()
    return gemm if gemm is not None and gemm.applies(w) else None


class LinearCache(NamedTuple):
    x: np.ndarray          # (..., Din) input
    w: np.ndarray          # (Dout, Din) weight
    has_bias: bool


class HookedLinearCache(NamedTuple):
    x: np.ndarray          # (..., Din) input
    w: np.ndarray          # (Dout, Din) weight
    has_bias: bool
    gemm: object           # the GEMM provider the forward used (see GEMM_OVERRIDE)


def linear_forward(x, w, b=None):
    r"""Affine map in the PyTorch / HF convention.

    .. math:: y = x W^\top + b

    Under an active low-precision hook (:data:`GEMM_OVERRIDE`) the product :math:`x W^\top` is
    the hook's ``fprop``; the bias is added in the input's precision.

    Shapes: x (..., Din), w (Dout, Din), b (Dout,) or None -> y (..., Dout).
    """
    check_float("x", x, min_ndim=1)
    check_float("w", w, ndim=2)
    check_same_dtype("w", w, "x", x)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected shape (Dout, {x.shape[-1]}) to match x's last axis, got {w.shape}")
    gemm = active_gemm(w)
    if gemm is None:
        y = x @ w.T                                                      # (..., Dout)
    else:
        y = gemm.fprop(x.reshape(-1, x.shape[-1]), w)                    # (N, Dout)
        y = y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype, copy=False)  # (..., Dout)
    if b is not None:
        check_float("b", b, ndim=1)
        check_same_dtype("b", b, "x", x)
        check_shape("b", b, (w.shape[0],), "Dout")
        y = y + b                                                        # (..., Dout)
    if gemm is not None:
        return y, HookedLinearCache(x, w, b is not None, gemm)
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy, cache):
    """Gradients of :func:`linear_forward`.

    Shapes: dy (..., Dout) -> dx (..., Din), dw (Dout, Din), db (Dout,) or None.
    """
    check_upstream("dy", dy, cache.x.shape[:-1] + (cache.w.shape[0],))
    if isinstance(cache, HookedLinearCache):
        return _hooked_backward(dy, cache)
    x, w, has_bias = cache
    # forward: y = x @ w.T + b
    dx = dy @ w                                                          # (..., Din)
    dy2 = dy.reshape(-1, dy.shape[-1])                                   # (N, Dout)
    x2 = x.reshape(-1, x.shape[-1])                                      # (N, Din)
    dw = dy2.T @ x2                                                      # (Dout, Din)
    db = dy2.sum(axis=0) if has_bias else None                           # (Dout,)
    return dx, dw, db


def _hooked_backward(dy, cache):
    """:func:`linear_backward` through the hook's Dgrad and Wgrad GEMMs."""
    x, w, has_bias, gemm = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                                   # (N, Dout)
    x2 = x.reshape(-1, x.shape[-1])                                      # (N, Din)
    # forward: y = x @ w.T + b
    dx = gemm.dgrad(dy2, w).reshape(*dy.shape[:-1], w.shape[1]).astype(dy.dtype, copy=False)  # (..., Din)
    dw = gemm.wgrad(dy2, x2).astype(w.dtype, copy=False)                # (Dout, Din)
    db = dy2.sum(axis=0) if has_bias else None                           # (Dout,)
    return dx, dw, db


class EmbeddingCache(NamedTuple):
    ids: np.ndarray        # (...) int64 token ids
    vocab_size: int


def embedding_forward(ids, w):
    r"""Table lookup :math:`y_t = W_{\mathrm{id}_t}` (DeepSeek embeddings are unscaled and untied).

    Shapes: ids (...) int64 in [0, V), w (V, D) -> y (..., D).
    """
    check_float("w", w, ndim=2)
    if w.shape[0] < 1:
        raise ValueError(f"w: expected a table with at least one row, got shape {w.shape}")
    ids = check_int("ids", ids, low=0, high=w.shape[0])
    y = w[ids]                                                           # (..., D)
    return y, EmbeddingCache(ids, w.shape[0])


def embedding_backward(dy, cache):
    """Gradient of :func:`embedding_forward` with respect to the table (rows scatter-add).

    Shapes: dy (..., D) -> dw (V, D).
    """
    ids, vocab_size = cache
    check_upstream("dy", dy)
    if dy.shape[:-1] != ids.shape:
        raise ValueError(f"dy: expected shape {ids.shape + ('D',)} (the forward's output), got {dy.shape}")
    # forward: y[t] = w[ids[t]]     so: dw[v] = sum of dy[t] over tokens t with ids[t] == v
    dw = np.zeros((vocab_size, dy.shape[-1]), dtype=dy.dtype)           # (V, D)
    np.add.at(dw, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    return dw
