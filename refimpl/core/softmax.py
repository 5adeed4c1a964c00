"""Softmax, log-softmax and log-sum-exp, stable for logits of any magnitude.

Every probability in the project (attention weights, V2 router scores, policy log-probs in GRPO,
teacher and student distributions in distillation) goes through these three functions. They
subtract the row maximum before exponentiating, so logits of magnitude 1e4 stay finite in float32,
and they accept ``-inf`` entries as masks. A row that is entirely ``-inf`` gives all-zero
probabilities and a log-sum-exp of ``-inf`` rather than NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_upstream


def _shifted(x, axis):
    """Return (x - rowmax, rowmax) with fully masked rows shifted by 0 instead of -inf."""
    m = np.max(x, axis=axis, keepdims=True)                             # (..., 1, ...)
    m = np.where(np.isfinite(m), m, 0.0).astype(x.dtype, copy=False)
    return x - m, m


class SoftmaxCache(NamedTuple):
    p: np.ndarray      # softmax output, same shape as the input
    axis: int


def softmax_forward(x, axis=-1):
    r""":math:`p_i = e^{x_i - m} / \sum_j e^{x_j - m}` with :math:`m = \max_j x_j`.

    Shapes: x (...) -> p (...), normalised along ``axis``.
    """
    check_float("x", x, min_ndim=1, allow_inf=True)
    z, _ = _shifted(x, axis)                                            # (...)
    e = np.exp(z)                                                       # (...)
    s = np.sum(e, axis=axis, keepdims=True)                             # (..., 1, ...)
    p = e / np.where(s > 0, s, 1.0)                                     # (...)
    return p, SoftmaxCache(p, axis)


def softmax_backward(dp, cache):
    r"""Gradient of :func:`softmax_forward`: :math:`dx = p \odot (dp - \sum_j p_j dp_j)`."""
    p, axis = cache
    check_upstream("dp", dp, p.shape)
    return p * (dp - np.sum(p * dp, axis=axis, keepdims=True))         # (...)


class LogSoftmaxCache(NamedTuple):
    p: np.ndarray      # softmax of the input (exp of the output)
    axis: int


def log_softmax_forward(x, axis=-1):
    r""":math:`\log p_i = x_i - \mathrm{logsumexp}(x)`. Shapes: x (...) -> logp (...)."""
    check_float("x", x, min_ndim=1, allow_inf=True)
    z, _ = _shifted(x, axis)                                            # (...)
    s = np.sum(np.exp(z), axis=axis, keepdims=True)                     # (..., 1, ...)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(s > 0, z - np.log(s), -np.inf).astype(x.dtype, copy=False)  # (...) all -inf rows stay -inf
    p = np.exp(logp)                                                    # (...)
    return logp, LogSoftmaxCache(p, axis)


def log_softmax_backward(dlogp, cache):
    r"""Gradient of :func:`log_softmax_forward`: :math:`dx = dlogp - p \sum_j dlogp_j`."""
    p, axis = cache
    check_upstream("dlogp", dlogp, p.shape)
    return dlogp - p * np.sum(dlogp, axis=axis, keepdims=True)         # (...)


class LogSumExpCache(NamedTuple):
    p: np.ndarray      # softmax of the input
    axis: int


def logsumexp_forward(x, axis=-1):
    r""":math:`\mathrm{lse}(x) = m + \log \sum_j e^{x_j - m}`. Shapes: x (...) -> (...) without ``axis``."""
    check_float("x", x, min_ndim=1, allow_inf=True)
    z, m = _shifted(x, axis)                                            # (...)
    e = np.exp(z)                                                       # (...)
    s = np.sum(e, axis=axis, keepdims=True)                             # (..., 1, ...)
    with np.errstate(divide="ignore"):
        lse = m + np.log(s)                                             # (..., 1, ...)
    p = e / np.where(s > 0, s, 1.0)                                     # (...)
    return np.squeeze(lse, axis=axis), LogSumExpCache(p, axis)


def logsumexp_backward(dlse, cache):
    r"""Gradient of :func:`logsumexp_forward`: :math:`dx = dlse \cdot \mathrm{softmax}(x)`."""
    p, axis = cache
    check_upstream("dlse", dlse, tuple(s for i, s in enumerate(p.shape) if i != axis % p.ndim))
    return np.expand_dims(dlse, axis) * p                               # (...)
