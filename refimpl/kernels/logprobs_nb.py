"""Numba twin of the GRPO log-prob/entropy pass (:mod:`refimpl.rl.logprobs`) and its backward.

For :math:`u = z\\,s` (:math:`s = 1/\\tau`), per row the forward needs the log-sum-exp, the
entropy :math:`H = \\log S - T/S` with :math:`S = \\sum_k e^{w_k}`, :math:`T = \\sum_k e^{w_k} w_k`,
:math:`w = (z - m)\\,s`, and the sampled token's log-prob :math:`w_o - \\log S`.
:func:`logps_entropy_rows` reads each row from memory once, in blocks of
:data:`~refimpl.kernels.cross_entropy_nb.BLOCK` (4 KiB of float32, in L1): the block's maximum (an
integer max reduction), then one vectorised loop of exponentials that sums :math:`e^{w}` over the
terms with :math:`w \\ne 0`, :math:`e^{w} w` over all, and counts the terms at the maximum
(:math:`w = 0`). The shift :math:`m` is the running maximum, so every :math:`w \\le 0`; when a block
raises it by :math:`d/s`, the sums so far are rescaled by :math:`e^{-d}` (``rest' = (rest + n_max)
e^{-d}``, ``T' = (T - d S) e^{-d}``: the old maximal terms join the rest).

Precision: like the NumPy reference, the log-sum is ``log1p(rest)`` where ``rest`` sums every term
but one maximal one (the other ties count 1 each), so ``rest`` is never added to the 1 before the
``log1p``: the log-prob of a near-certain token, ``-log1p(rest) ~ -rest``, keeps its relative digits
in float32 (the block sums of ``rest`` run in float32 lanes and carry a relative error of a few
ulp of ``rest`` itself, accumulated across blocks in float64). float32 rows compute per element in
float32 with :func:`~refimpl.kernels.vecmath_nb.exp32` (<= 2 ulp); float64 rows in float64 with
libm's ``exp``. Unlike the reference, :math:`w = (z - m)s` is formed from the raw logits (the
reference rounds :math:`z/\\tau` first), so at :math:`|z| \\sim 10^4` and :math:`\\tau \\ne 1` the
twin is the more accurate of the two in float32 (the tests compare it with a float64 reference).

Finiteness: a NaN or :math:`\\pm\\infty` logit makes :math:`S` or :math:`T` non-finite
(:math:`0 \\cdot (-\\infty)` is NaN: the loop's fastmath flags never include 'nnan'/'ninf'), and
only such rows are scanned again (:func:`~refimpl.kernels.cross_entropy_nb.nonfinite`) to report
``finite[i]``: a finite row whose sums overflow (logits beyond ~1e38) gives NaN like the reference.

The backward :func:`logps_entropy_grad_rows` writes every row of ``dz`` in one sweep:
:math:`\\partial z_k = -s\\,\\pi_k\\,(g + h(\\log\\pi_k + H))`, and at the sampled entry
:math:`-s\\,(g\\,\\mathrm{expm1}(\\log\\pi_o) + h\\,\\pi_o(\\log\\pi_o + H))` (exact when
:math:`\\pi_o \\approx 1`). Rows run in parallel with ``prange``; outputs are allocated by the caller.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cross_entropy_nb import BLOCK, REDUCE, nonfinite
from .vecmath_nb import cast_like, fast_exp, fast_max

__all__ = ["logps_entropy_rows", "logps_entropy_grad_rows"]


@njit(cache=True, fastmath=REDUCE)
def block_terms(x, m, s):
    """(sum of e^w over w != 0, sum of e^w w, count of w == 0), w = (x - m) s, over a 1-D block in x's dtype."""
    zero = cast_like(x[0], 0.0)
    acc = zero
    acc_w = zero
    ties = 0
    for j in range(x.shape[0]):
        w = (x[j] - m) * s
        e = fast_exp(w)
        acc += e if w != zero else zero
        acc_w += e * w
        ties += w == zero
    return acc, acc_w, ties


@njit(cache=True)
def row_stats(z, i, inv_t):
    """(m, rest, t) of row i, float64: the row maximum, sum of e^w but one maximal term, sum of e^w w."""
    v = z.shape[1]
    m = -np.inf
    rest = 0.0
    tw = 0.0
    n_max = 0                                   # terms equal to m seen so far (each e^0 = 1)
    for b0 in range(0, v, BLOCK):
        x = z[i, b0:min(b0 + BLOCK, v)]
        mb = np.float64(fast_max(x))
        if mb > m:
            if n_max:                           # rescale: the old maximal terms join the rest
                d = (mb - m) * inv_t
                ed = np.exp(-d)
                tw = (tw - d * (rest + n_max)) * ed
                rest = rest * ed + n_max * ed
                n_max = 0
            m = mb
        a, aw, ties = block_terms(x, cast_like(x[0], m), cast_like(x[0], inv_t))
        rest += np.float64(a)
        tw += np.float64(aw)
        n_max += ties
    return m, rest + (n_max - 1), tw


@njit(cache=True, parallel=True)
def logps_entropy_rows(z, ids, inv_t, logp, rowmax, logsum, ent, finite):
    """Forward rows of ``refimpl.rl.logps_entropy_forward`` (C-contiguous z (N, V), ids (N,)).

    Fills logp (N,), ent (N,) in z's dtype, rowmax (N,) float64 = max_k z_k (raw, not divided by the
    temperature), logsum (N,) float64 = log sum_k exp((z_k - rowmax) inv_t), and finite (N,) bool.
    """
    n = z.shape[0]
    for i in prange(n):
        m, rest, tw = row_stats(z, i, inv_t)
        ls = np.log1p(rest)
        h = ls - tw / (1.0 + rest)
        lp = (np.float64(z[i, ids[i]]) - m) * inv_t - ls
        ok = np.isfinite(ls) and np.isfinite(h)
        finite[i] = ok or nonfinite(z[i]) == 0
        rowmax[i] = m
        logsum[i] = ls
        ent[i] = h
        logp[i] = lp


@njit(cache=True)
def grad_row(x, o, m, ls, hh, cg, ch, s):
    """o[j] = (cg + ch (lp_j + hh)) pi_j, lp_j = (x[j] - m) s - ls, pi_j = e^lp_j (cg alone if ch == 0)."""
    if ch == cast_like(x[0], 0.0):
        for j in range(x.shape[0]):
            o[j] = cg * fast_exp((x[j] - m) * s - ls)
    else:
        for j in range(x.shape[0]):
            lp = (x[j] - m) * s - ls
            o[j] = (cg + ch * (lp + hh)) * fast_exp(lp)


@njit(cache=True, parallel=True)
def logps_entropy_grad_rows(z, ids, rowmax, logsum, ent, g, h, inv_t, out):
    """out = d(sum_i g_i logp_i + h_i ent_i)/dz (N, V) in z's dtype, from :func:`logps_entropy_rows`'s stats.

    g, h (N,) float64 (zeros for an output without gradient).
    """
    n = z.shape[0]
    for i in prange(n):
        x, o = z[i], out[i]
        c = x[0]
        grad_row(x, o, cast_like(c, rowmax[i]), cast_like(c, logsum[i]), cast_like(c, ent[i]),
                 cast_like(c, -g[i] * inv_t), cast_like(c, -h[i] * inv_t), cast_like(c, inv_t))
        t = ids[i]
        lo = (np.float64(z[i, t]) - rowmax[i]) * inv_t - logsum[i]
        o[t] = -(g[i] * np.expm1(lo) + h[i] * np.exp(lo) * (lo + ent[i])) * inv_t
    return out
