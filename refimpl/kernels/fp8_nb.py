"""Numba twin of FP8 rounding (refimpl.quant.fp8.round_to_fp8): one pass, no temporaries."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def round_to_fp8_flat(x, mantissa_bits, min_exp, max_val, saturate, has_inf):
    """Round each element of a flat float64 array to the FP8 grid (ties to even)."""
    out = np.empty_like(x)
    for i in prange(x.size):
        v = x[i]
        if math.isnan(v):
            out[i] = np.nan
            continue
        a = abs(v)
        if a == 0.0:
            out[i] = v
            continue
        if math.isinf(a):
            r = a
        else:
            _, e2 = math.frexp(a)
            e = max(e2 - 1, min_exp)
            q = math.ldexp(1.0, e - mantissa_bits)
            r = np.rint(a / q) * q
        if r > max_val:
            if saturate:
                r = max_val
            elif has_inf:
                r = np.inf
            else:
                r = np.nan
        out[i] = -r if v < 0 else r
    return out
