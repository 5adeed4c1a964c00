"""Numba twins of the softmax cross-entropy and log-prob rows, one pass over memory per row.

Every loss over a large vocabulary in refimpl reduces to three row kernels, used by
:mod:`refimpl.core.cross_entropy` (plain cross-entropy, ``inv_t = 1``) and by the chunked LM heads
of :mod:`refimpl.distill.fused` (cross-entropy and GRPO log-probs at a temperature ``tau``,
``inv_t = 1 / tau``):

* :func:`logp_rows` -- the forward: per row a shift ``c`` and ``log sum_j exp((z_j - c) inv_t)``
  by an *online* log-sum-exp over cache-sized blocks of the row, read from memory once: the
  shift is the first block's maximum and moves to a later block's maximum (the running sum
  rescaled by ``exp((old - new) inv_t)``) only when that block's shifted sum grows past
  :data:`BIG`, so most blocks cost one vectorised pass of exponentials and no maximum; and the
  target's log-prob;
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
from numba.core import types
from numba.extending import overload

from .vecmath_nb import cast_like, exp32, fast_max

#: Elements per block of the online log-sum-exp: 4 KiB of float32, well inside L1.
BLOCK = 1024
#: fastmath flags for the block sums only. 'reassoc' lets LLVM split a sum into vector
#: lanes (the order of a floating-point sum changes, within the rounding the tests allow);
#: 'contract' allows FMA. Never 'nnan'/'ninf': NaN and inf must propagate as in NumPy.
REDUCE = {"reassoc", "contract", "arcp", "nsz"}


#: A block whose shifted exponentials sum past this moves the shift to the block's maximum: so
#: the shift stays within log(BIG) ~ 14 of every maximum seen, and float32 terms cannot overflow.
BIG = 2.0 ** 20


@njit(cache=True, fastmath=REDUCE)
def sumexp32(x, shift, scale):
    """sum_j exp32((x[j] - shift) * scale) over a 1-D float32 block, in float32 vector lanes.

    Blocks are passed as 1-D views indexed from 0: with an index of unknown sign numba adds
    negative-index wraparound to every access, which stops the loop from vectorising (3x slower).
    ``scale == 1`` (plain cross-entropy) has its own loop without the multiply.
    """
    acc = np.float32(0.0)
    if scale == np.float32(1.0):
        for j in range(x.shape[0]):
            acc += exp32(x[j] - shift)
    else:
        for j in range(x.shape[0]):
            acc += exp32((x[j] - shift) * scale)
    return acc


@njit(cache=True, fastmath=REDUCE)
def sumexp64(x, shift, scale):
    """sum_j exp((x[j] - shift) * scale) over a 1-D float64 block (libm exp)."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.exp((x[j] - shift) * scale)
    return acc


def sumexp(x, shift, scale):
    """sum_j exp((x[j] - shift) * scale) over a 1-D block, in x's dtype (shift and scale too)."""
    return np.sum(np.exp((x - shift) * scale))


@overload(sumexp, jit_options={"cache": True})
def _sumexp_impl(x, shift, scale):
    if x.dtype == types.float32:
        return lambda x, shift, scale: sumexp32(x, shift, scale)
    return lambda x, shift, scale: sumexp64(x, shift, scale)


@njit(cache=True)
def nonfinite(x):
    """How many elements of a 1-D block are NaN or +-inf (``x - x`` is 0 exactly for the finite ones).

    No fastmath: with 'reassoc'/'nsz' LLVM folded ``x - x`` to 0 (measured, NaN rows passed); the
    count is an integer reduction, which vectorises without any flag (one subtract, compare and
    add per element, from L1 right after the block's exponentials).
    """
    cnt = 0
    for j in range(x.shape[0]):
        cnt += not (x[j] - x[j] == 0.0)
    return cnt


@njit(cache=True)
def row_logsumexp_checked(z, i, inv_t, check):
    """:func:`row_logsumexp` and, when ``check``, whether row i is all finite: (c, log_s, finite).

    The finiteness test rides on the same read of the row (:func:`nonfinite` per block), so the
    caller needs no separate pass over the logits (``refimpl.core.cross_entropy`` raises on False).
    """
    v = z.shape[1]
    scale = cast_like(z[i, 0], inv_t)
    c = np.float64(fast_max(z[i, 0:min(BLOCK, v)]))
    s = 0.0
    bad = 0
    for b0 in range(0, v, BLOCK):
        x = z[i, b0:min(b0 + BLOCK, v)]
        shift = cast_like(z[i, 0], c if c > -np.inf else 0.0)
        bs = np.float64(sumexp(x, shift, scale))
        if check:
            bad += nonfinite(x)
        if not bs < BIG or c == -np.inf:            # rare: redo the block from its own maximum
            mb = np.float64(fast_max(x))
            if mb > c:
                s *= np.exp((c - mb) * inv_t)
                c = mb
                bs = np.float64(sumexp(x, cast_like(z[i, 0], c), scale))
        s += bs
    return c, np.log(s), bad == 0


@njit(cache=True)
def row_logsumexp(z, i, inv_t):
    """(c, log_s) for row i, float64: a shift c and log sum_j exp((z[i, j] - c) * inv_t).

    One read of the row: the shift starts at the first block's maximum and moves to a block's
    maximum only when that block's shifted sum exceeds :data:`BIG` (or is inf/NaN); the running
    sum is then rescaled by ``exp((old - new) * inv_t)``. ``c`` is an element of the row and within
    ``log(BIG) / inv_t`` of its maximum, so ``exp((z - c) * inv_t - log_s)`` is the softmax without
    overflow; most blocks need no maximum at all (that pass cost a quarter of the forward).
    """
    c, ls, _ = row_logsumexp_checked(z, i, inv_t, False)
    return c, ls


@njit(cache=True)
def grad32(x, o, m, l, c, s):
    """o[j] = c * exp32((x[j] - m) * s - l) over a float32 row (no multiply when s == 1)."""
    if s == np.float32(1.0):
        for j in range(x.shape[0]):
            o[j] = c * exp32((x[j] - m) - l)
    else:
        for j in range(x.shape[0]):
            o[j] = c * exp32((x[j] - m) * s - l)


@njit(cache=True)
def grad64(x, o, m, l, c, s):
    """o[j] = c * exp((x[j] - m) * s - l) over a float64 row (libm exp)."""
    for j in range(x.shape[0]):
        o[j] = c * np.exp((x[j] - m) * s - l)


def grad_row(x, o, m, l, c, s):
    """o = c * exp((x - m) * s - l) for one row, in x's dtype."""
    o[:] = c * np.exp((x - m) * s - l)


@overload(grad_row, jit_options={"cache": True})
def _grad_row_impl(x, o, m, l, c, s):
    if x.dtype == types.float32:
        return lambda x, o, m, l, c, s: grad32(x, o, m, l, c, s)
    return lambda x, o, m, l, c, s: grad64(x, o, m, l, c, s)


@njit(cache=True)
def row_grad(z, i, t, m, log_s, c, inv_t, out):
    """out[i, j] = c * (exp((z[i, j] - m) * inv_t - log_s) - [j == t]), in z's dtype."""
    x, o = z[i], out[i]
    grad_row(x, o, cast_like(x[0], m), cast_like(x[0], log_s), cast_like(x[0], c), cast_like(x[0], inv_t))
    o[t] -= cast_like(x[0], c)


@njit(cache=True, parallel=True)
def logp_rows(z, tokens, inv_t, ignore_index, finite=None):
    """log softmax(z / tau)[token] (C,) float64 (0 where ignored), with each row's shift and log-sum (C,).

    Twin of ``refimpl.distill.fused._logp_rows``; the cross-entropy loss is ``-logp`` and the
    log-sum-exp ``rowmax * inv_t + logsum``. ``rowmax`` is the shift of :func:`row_logsumexp` (an
    element of the row within ``log(BIG) / inv_t`` of its maximum; the NumPy twin returns the maximum
    itself): any shift gives the same log-sum-exp. ``finite`` (C,) bool, if given, receives whether
    each row is all finite (ignored rows included), tested in the same pass.
    """
    n = z.shape[0]
    logp = np.zeros(n)
    rowmax = np.empty(n)
    logsum = np.empty(n)
    for i in prange(n):
        if finite is None:
            m, ls = row_logsumexp(z, i, inv_t)
        else:
            m, ls, ok = row_logsumexp_checked(z, i, inv_t, True)
            finite[i] = ok
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
def ce_loss_grad_rows(z, targets, row_scale, inv_t, ignore_index, out, finite=None):
    """Cross-entropy of softmax(z / tau) per row (C,) float64 and its gradient (C, V) in one sweep.

    Twin of ``refimpl.distill.fused._ce_rows`` (which allocates ``out``); ignored rows give 0 and 0.
    ``finite`` (C,) bool, if given, receives whether each row is all finite (ignored rows too).
    """
    n, v = z.shape
    loss = np.zeros(n)
    for i in prange(n):
        t = targets[i]
        if t == ignore_index:
            for j in range(v):
                out[i, j] = 0.0
            if finite is not None:
                finite[i] = nonfinite(z[i]) == 0
            continue
        if finite is None:
            m, ls = row_logsumexp(z, i, inv_t)
        else:
            m, ls, ok = row_logsumexp_checked(z, i, inv_t, True)
            finite[i] = ok
        loss[i] = ls - (np.float64(z[i, t]) - m) * inv_t
        row_grad(z, i, t, m, ls, row_scale[i] * inv_t, inv_t, out)
    return loss, out
