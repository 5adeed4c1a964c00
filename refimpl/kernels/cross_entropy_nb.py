"""Numba twin of the fused log-softmax + cross-entropy over a large vocabulary.

The NumPy reference materialises ``exp(logits - max)`` for the whole (N, V) matrix several times;
this twin makes two passes over each row (max, then sum of exponentials) and never allocates more
than the (N,) outputs in the forward pass. Rows run in parallel with ``prange``. Sums of
exponentials accumulate in float64 whatever the input dtype, so float32 results are at least as
accurate as the NumPy reference's pairwise float32 sums. ``fastmath`` is off.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def ce_forward_rows(logits, targets, ignore_index):
    """Per-row loss, log-sum-exp (float64) and max. logits (N, V) C-contiguous, targets (N,) int64."""
    n, v = logits.shape
    lse = np.empty(n, dtype=np.float64)
    rowmax = np.empty(n, dtype=logits.dtype)
    loss = np.zeros(n, dtype=np.float64)
    for i in prange(n):
        m = -np.inf
        for j in range(v):
            if logits[i, j] > m:
                m = logits[i, j]
        rowmax[i] = m
        shift = m if m > -np.inf else 0.0
        s = 0.0
        for j in range(v):
            s += np.exp(np.float64(logits[i, j]) - shift)
        lse[i] = shift + np.log(s)
        t = targets[i]
        if t != ignore_index:
            loss[i] = lse[i] - logits[i, t]
    return loss, lse, rowmax


@njit(cache=True, parallel=True)
def ce_backward_rows(logits, targets, lse, row_scale, ignore_index):
    """dlogits[i] = row_scale[i] * (softmax(logits[i]) - onehot(targets[i])); ignored rows are 0."""
    n, v = logits.shape
    out = np.empty_like(logits)
    for i in prange(n):
        t = targets[i]
        if t == ignore_index:
            for j in range(v):
                out[i, j] = 0.0
            continue
        c = row_scale[i]
        for j in range(v):
            out[i, j] = c * np.exp(np.float64(logits[i, j]) - lse[i])
        out[i, t] -= c
    return out
