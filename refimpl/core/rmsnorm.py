"""Root-mean-square layer normalisation (Zhang & Sennrich 2019).

DeepSeek-V2/V3 put an RMSNorm before attention and before the FFN of every block (pre-norm), after
the last block, and on the two compressed latents of MLA (DeepSeek-V2 §3.1.2 "additional RMS Norm
layers after the compressed latent vectors"). It rescales each vector to unit root-mean-square
and multiplies by a learned gain; unlike LayerNorm it does not subtract the mean and has no bias.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_real, check_same_dtype, check_shape, check_upstream


class RMSNormCache(NamedTuple):
    x: np.ndarray      # (..., D) input
    w: np.ndarray      # (D,) gain
    rstd: np.ndarray   # (..., 1) 1 / sqrt(mean(x^2) + eps)


def rmsnorm_forward(x, w, eps=1e-6):
    r"""RMSNorm as DeepSeek-V2/V3 use it (``rms_norm_eps = 1e-6``).

    .. math:: y = w \odot x / \sqrt{\tfrac{1}{D}\textstyle\sum_j x_j^2 + \epsilon}

    Computed in the input's dtype (HF transformers normalises in float32 even for float64 models,
    so it differs from this float64 reference by ~1e-7).

    Shapes: x (..., D), w (D,) -> y (..., D).
    """
    check_float("x", x, min_ndim=1)
    check_float("w", w, ndim=1)
    check_same_dtype("w", w, "x", x)
    check_shape("w", w, (x.shape[-1],), "x's last axis")
    check_real("eps", eps, low=0.0, low_open=True)
    with np.errstate(over="ignore"):
        ms = np.mean(x * x, axis=-1, keepdims=True)                     # (..., 1) inf if x^2 overflows
    if np.isfinite(ms).all():
        rstd = 1.0 / np.sqrt(ms + eps)                                  # (..., 1)
    else:   # |x| beyond sqrt(max): rms(x) = s rms(x / s) with s = max|x| of the row (scale-invariant)
        s = np.max(np.abs(x), axis=-1, keepdims=True)                   # (..., 1)
        s = np.where(np.isfinite(ms), 1.0, s).astype(x.dtype)           # (..., 1)
        xs = x / s                                                      # (..., D)
        with np.errstate(over="ignore"):
            rstd = 1.0 / (s * np.sqrt(np.mean(xs * xs, axis=-1, keepdims=True) + eps / (s * s)))  # (..., 1)
    y = x * rstd * w                                                    # (..., D)
    return y.astype(x.dtype, copy=False), RMSNormCache(x, w, rstd.astype(x.dtype, copy=False))


def rmsnorm_backward(dy, cache):
    """Gradients of :func:`rmsnorm_forward`. Shapes: dy (..., D) -> dx (..., D), dw (D,)."""
    x, w, rstd = cache
    check_upstream("dy", dy, x.shape)
    xhat = x * rstd                                                     # (..., D)
    # forward: y = xhat * w                 so: dw = sum over rows of dy * xhat
    dw = np.sum(dy * xhat, axis=tuple(range(dy.ndim - 1)))              # (D,)
    # forward: xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2)
    # so: dx = rstd * (g - xhat * mean(g * xhat)), with g = dy * w
    g = dy * w                                                          # (..., D)
    dx = rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))  # (..., D)
    return dx, dw
