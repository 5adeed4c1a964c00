"""Numba twins of the softmax cross-entropy and log-prob rows, one pass over memory per row.

Every loss over a large vocabulary in refimpl reduces to three row kernels, used by
:mod:`refimpl.core.cross_entropy` (plain cross-entropy, ``inv_t = 1``) and by the chunked LM heads
of :mod:`refimpl.distill.fused` (cross-entropy and GRPO log-probs at a temperature ``tau``,
``inv_t = 1 / tau``):

* :func:`logp_rows` -- the forward: per row the maximum and ``log sum_j exp((z_j - max) inv_t)``
  by an *online* log-sum-exp over cache-sized blocks of the row (block maximum, then the
  running sum rescaled by ``exp(old max - new max)`` when the maximum grows), so the row is read
  from memory once; and the target's log-prob;
* :func:`ce_grad_rows` -- the backward: ``row_scale * inv_t * (softmax(z inv_t) - onehot)``;
* :func:`ce_loss_grad_rows` -- both in one sweep (the second read of a row comes from cache), for
  callers that need the loss and its gradient at once.

Float32 rows use :func:`refimpl.kernels.vecmath_nb.exp32` (vectorised, <= 2 ulp) and
:func:`~refimpl.kernels.vecmath_nb.max32` (an integer max reduction); float64 rows use libm's
``exp`` and a plain max loop. A block's exponentials are summed in the input dtype across vector lanes (a block
of :data:`BLOCK` elements gives each lane a few dozen terms, each <= 1), and block partial sums
accumulate in float64, so float32 results are as accurate as the NumPy reference's pairwise sums.
Rows run in parallel with ``prange``; outputs are allocated by the caller with NumPy (see
:mod:`refimpl.kernels.moe_nb` on first-touch page faults).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .vecmath_nb import cast_like, fast_exp, fast_max

#: Elements per block of the online log-sum-exp: 4 KiB of float32, well inside L1.
BLOCK = 1024
#: fastmath flags for the block sums only. 'reassoc' lets LLVM split a sum into vector
#: lanes (the order of a floating-point sum changes, within the rounding the tests allow);
#: 'contract' allows FMA. Never 'nnan'/'ninf': NaN and inf must propagate as in NumPy.
REDUCE = {"reassoc", "contract", "arcp", "nsz"}


@njit(cache=True, fastmath=REDUCE)
def sumexp(x, shift, scale):
    """sum_j exp((x[j] - shift) * scale) over a 1-D block, in x's dtype (shift and scale too).

    Blocks are passed as 1-D views indexed from 0: with an index of unknown sign numba adds
    negative-index wraparound to every access, which stops the loop from vectorising (3x slower).
    """
    acc = cast_like(shift, 0.0)
    for j in range(x.shape[0]):
        acc += fast_exp((x[j] - shift) * scale)
    return acc


@njit(cache=True)
def row_logsumexp(z, i, inv_t):
    """(m, log_s) for row i, float64: max_j z[i, j] and log sum_j exp((z[i, j] - m) * inv_t)."""
    v = z.shape[1]
    scale = cast_like(z[i, 0], inv_t)
    m = -np.inf
    s = 0.0
    for b0 in range(0, v, BLOCK):
        x = z[i, b0:min(b0 + BLOCK, v)]
        mb = np.float64(fast_max(x))
        if mb > m:                                  # rescale the running sum to the new maximum
            s *= np.exp((m - mb) * inv_t)
            m = mb
        shift = cast_like(z[i, 0], m if m > -np.inf else 0.0)
        s += np.float64(sumexp(x, shift, scale))
    return m, np.log(s)


@njit(cache=True)
def row_grad(z, i, t, m, log_s, c, inv_t, out):
    """out[i, j] = c * (exp((z[i, j] - m) * inv_t - log_s) - [j == t]), in z's dtype."""
    x, o = z[i], out[i]
    mf, lf, cf, sf = cast_like(x[0], m), cast_like(x[0], log_s), cast_like(x[0], c), cast_like(x[0], inv_t)
    for j in range(x.shape[0]):
        o[j] = cf * fast_exp((x[j] - mf) * sf - lf)
    o[t] -= cf


@njit(cache=True, parallel=True)
def logp_rows(z, tokens, inv_t, ignore_index):
    """log softmax(z / tau)[token] (C,) float64 (0 where ignored), with the row max and log-sum (C,).

    Twin of ``refimpl.distill.fused._logp_rows``; the cross-entropy loss is ``-logp`` and the
    log-sum-exp ``rowmax * inv_t + logsum``.
    """
    n = z.shape[0]
    logp = np.zeros(n)
    rowmax = np.empty(n)
    logsum = np.empty(n)
    for i in prange(n):
        m, ls = row_logsumexp(z, i, inv_t)
        rowmax[i] = m
        logsum[i] = ls
        t = tokens[i]
        if t != ignore_index:
            logp[i] = (np.float64(z[i, t]) - m) * inv_t - ls
    return logp, rowmax, logsum


@njit(cache=True, parallel=True)
def ce_grad_rows(z, targets, rowmax, logsum, row_scale, inv_t, ignore_index, out):
    """out = row_scale * inv_t * (softmax(z * inv_t) - onehot(targets)) (C, V); ignored rows are 0.

    ``rowmax``, ``logsum`` from :func:`logp_rows`. With ``row_scale = -g`` this is the gradient of
    ``sum_i g_i logp_i``.
    """
    n, v = z.shape
    for i in prange(n):
        t = targets[i]
        if t == ignore_index:
            for j in range(v):
                out[i, j] = 0.0
        else:
            row_grad(z, i, t, rowmax[i], logsum[i], row_scale[i] * inv_t, inv_t, out)
    return out


@njit(cache=True, parallel=True)
def ce_loss_grad_rows(z, targets, row_scale, inv_t, ignore_index, out):
    """Cross-entropy of softmax(z / tau) per row (C,) float64 and its gradient (C, V) in one sweep.

    Twin of ``refimpl.distill.fused._ce_rows`` (which allocates ``out``); ignored rows give 0 and 0.
    """
    n, v = z.shape
    loss = np.zeros(n)
    for i in prange(n):
        t = targets[i]
        if t == ignore_index:
            for j in range(v):
                out[i, j] = 0.0
            continue
        m, ls = row_logsumexp(z, i, inv_t)
        loss[i] = ls - (np.float64(z[i, t]) - m) * inv_t
        row_grad(z, i, t, m, ls, row_scale[i] * inv_t, inv_t, out)
    return loss, out
