"""Numba twins of the per-chunk softmax + loss + gradient passes of :mod:`refimpl.distill.fused`.

Each kernel takes one chunk of logits (C, V), C-contiguous, and walks every row a few times:
log-sum-exp, then one pass that produces the loss and the gradient with respect to the logits in
place of the (C, V) temporaries the NumPy reference allocates (log q, q, log p, p, log M, ...).
Rows run in parallel with ``prange``. float32 rows compute per element in float32 like the NumPy
reference, with the vectorised :func:`~refimpl.kernels.vecmath_nb.exp32` and
:func:`~refimpl.kernels.vecmath_nb.log32` (<= 2 ulp) and float64 accumulation of block sums;
float64 rows use float64 and libm. ``fastmath`` is off except the reassociation flags on the block
sums. Signatures mirror the NumPy ``_*_rows`` functions in :mod:`refimpl.distill.fused`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cross_entropy_nb import BLOCK, REDUCE, ce_grad_rows, ce_loss_grad_rows, logp_rows, row_logsumexp
from .vecmath_nb import exp32, log32

__all__ = ["divergence_rows", "gjsd_rows", "divergence_rows32", "divergence_rows64", "ce_rows", "logp_rows",
           "logp_grad_rows"]


#: Row modes of :func:`divergence_rows`: the table entries of :mod:`refimpl.distill.divergences`.
MODES = {"forward_kl": 0, "reverse_kl": 1, "generalized_jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4,
         "total_variation": 5}


def divergence_rows(zs, zt, valid, row_scale, divergence, param, inv_t):
    """Divergence rows: loss (C,) float64 and d(sum_i row_scale[i] * loss_i)/dzs (C, V).

    ``divergence``: a name of :data:`MODES`; ``param`` its option (beta of the generalized JSD,
    alpha of the skew KLs, ignored otherwise). Rows with ``valid[i] == False`` give 0 and 0.
    float32 logits go to :func:`divergence_rows32` (vectorised float32 exp/log, as the NumPy
    reference computes in float32), float64 logits to :func:`divergence_rows64`.
    """
    mode = MODES[divergence]
    if mode == 2 and param in (0.0, 1.0):       # TRL's special cases, as gjsd_terms
        mode = 0 if param == 0.0 else 1
    if zs.dtype == np.float32 and zt.dtype == np.float32:
        rows = divergence_rows32
    else:
        rows = divergence_rows64
    # the (C, V) gradient is allocated here, by NumPy, which asks for transparent huge pages: numba's
    # allocator does not, and first-touch faults on 4 KiB pages cost as much system time as the
    # kernel's arithmetic (measured: 163,845 faults per call of the five-divergence benchmark)
    return rows(zs, zt, valid, row_scale, mode, float(param), inv_t, np.empty_like(zs))


def gjsd_rows(zs, zt, valid, row_scale, beta, inv_t):
    """Generalized JSD rows (:func:`divergence_rows` with ``beta``; 0 / 1 are forward / reverse KL)."""
    return divergence_rows(zs, zt, valid, row_scale, "generalized_jsd", beta, inv_t)


@njit(cache=True)
def logaddexp64(a, b):
    """log(exp(a) + exp(b)) = max + log1p(exp(-|a - b|)), float64 (one of a, b finite)."""
    return max(a, b) + np.log1p(np.exp(-abs(a - b)))


@njit(cache=True)
def probs(x, y, j, cs, ls, ct, lt, sc):
    """(log q, log p, q, p) at element j of a float32 block (shifts, log-sums and scale as jsd_block's)."""
    lq = (x[j] - cs) * sc - ls
    lp = (y[j] - ct) * sc - lt
    return lq, lp, exp32(lq), exp32(lp)


@njit(cache=True)
def jsd_block(x, y, u, q, e, cs, ls, ct, lt, sc, b, l1b, lb, mode):
    """One float32 block of a row: q = softmax(zs), u = dE/dlog q, e = E elementwise (fastmath off).

    ``mode`` (:data:`MODES`) 0: forward KL, 1: reverse KL, 2: generalized JSD with log M =
    logaddexp(log q + log(1 - b), log p + log b) written as ``max + log(1 + exp(-|a - b|))`` (exact
    in log space; no underflow fallback needed), 3 / 4: skew forward / reverse KL with ``b`` = alpha
    (log M the same way, the formulas of :mod:`refimpl.distill.divergences`), 5: total variation.
    ``lb``, ``l1b``: log b and log(1 - b) (-inf allowed: logaddexp then returns the other term).
    At most four exp32 and one log32 per element. One loop per mode, the branch outside: with the
    six-way branch inside one loop LLVM vectorised none of them (measured 47 ms against 5.6 ms for
    200 rows of 32768, forward KL), and the log-space sum is written out in each loop because
    through a helper function the loop did not vectorise either (183 ms against 16 ms, JSD).
    """
    one = np.float32(1.0)
    n = x.shape[0]
    if mode == 0:                               # forward KL(p || q)
        for j in range(n):
            lq, lp, qj, pj = probs(x, y, j, cs, ls, ct, lt, sc)
            e[j] = pj * (lp - lq)
            u[j] = -pj
            q[j] = qj
    elif mode == 1:                             # reverse KL(q || p)
        for j in range(n):
            lq, lp, qj, pj = probs(x, y, j, cs, ls, ct, lt, sc)
            d = lq - lp
            e[j] = qj * d
            u[j] = qj * (d + one)
            q[j] = qj
    elif mode == 2:                             # generalized JSD
        for j in range(n):
            lq, lp, qj, pj = probs(x, y, j, cs, ls, ct, lt, sc)
            a = lq + l1b
            c = lp + lb
            lm = (a if a > c else c) + log32(one + exp32(-abs(a - c)))
            uj = (one - b) * qj * (lq - lm)
            e[j] = b * pj * (lp - lm) + uj
            u[j] = uj
            q[j] = qj
    elif mode == 3:                             # skew KL: M = b p + (1 - b) q
        for j in range(n):
            lq, lp, qj, pj = probs(x, y, j, cs, ls, ct, lt, sc)
            a = lp + lb
            c = lq + l1b
            lm = (a if a > c else c) + log32(one + exp32(-abs(a - c)))
            e[j] = pj * (lp - lm)
            u[j] = -(one - b) * exp32(lp + lq - lm)
            q[j] = qj
    elif mode == 4:                             # skew reverse KL: M = (1 - b) p + b q
        for j in range(n):
            lq, lp, qj, pj = probs(x, y, j, cs, ls, ct, lt, sc)
            a = lp + l1b
            c = lq + lb
            d = lq - ((a if a > c else c) + log32(one + exp32(-abs(a - c))))
            e[j] = qj * d
            u[j] = qj * (d + one - exp32(lb + d))
            q[j] = qj
    else:                                       # total variation
        for j in range(n):
            lq, lp, qj, pj = probs(x, y, j, cs, ls, ct, lt, sc)
            diff = qj - pj
            e[j] = np.float32(0.5) * abs(diff)
            u[j] = np.float32(0.5) * np.sign(diff) * qj
            q[j] = qj


@njit(cache=True, fastmath=REDUCE)
def sum32(x):
    """sum of a float32 block in float32 vector lanes (reassociated; the block is short)."""
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += x[j]
    return acc


@njit(cache=True, parallel=True)
def divergence_rows32(zs, zt, valid, row_scale, mode, beta, inv_t, out):
    """:func:`divergence_rows` for float32 logits: per row two one-read log-sum-exps
    (:func:`~refimpl.kernels.cross_entropy_nb.row_logsumexp`), one blockwise pass of vectorised
    float32 exp32/log32 producing the loss terms, q and dE/dlog q (block sums accumulate in float64),
    and one pass writing the gradient. Per-element arithmetic is float32, as the NumPy reference's.
    """
    n, v = zs.shape
    loss = np.zeros(n)
    b = np.float32(beta)
    lb = np.float32(np.log(beta) if beta > 0.0 else -np.inf)
    l1b = np.float32(np.log1p(-beta) if beta < 1.0 else -np.inf)
    sc = np.float32(inv_t)
    for i in prange(n):
        o = out[i]
        if not valid[i]:
            o[:] = 0.0
            continue
        cs, ls = row_logsumexp(zs, i, inv_t)
        ct, lt = row_logsumexp(zt, i, inv_t)
        q = np.empty(v, dtype=np.float32)
        e = np.empty(min(v, BLOCK), dtype=np.float32)
        acc = 0.0
        sum_u = 0.0
        for b0 in range(0, v, BLOCK):
            b1 = min(b0 + BLOCK, v)
            eb = e[:b1 - b0]
            jsd_block(zs[i, b0:b1], zt[i, b0:b1], o[b0:b1], q[b0:b1], eb, np.float32(cs), np.float32(ls),
                      np.float32(ct), np.float32(lt), sc, b, l1b, lb, mode)
            acc += np.float64(sum32(eb))
            sum_u += np.float64(sum32(o[b0:b1]))
        loss[i] = acc
        c = np.float32(row_scale[i] * inv_t)
        su = np.float32(sum_u)
        for j in range(v):
            o[j] = c * (o[j] - q[j] * su)
    return loss, out


@njit(cache=True, parallel=True)
def divergence_rows64(zs, zt, valid, row_scale, mode, beta, inv_t, out):
    """:func:`divergence_rows` for float64 logits (float64 arithmetic, libm exp/log).

    ``mode`` as :func:`jsd_block`'s, ``beta`` the divergence's parameter (alpha of the skew KLs);
    rows with ``valid[i] == False`` give 0 and 0.
    Without SVML numba's exp/log are scalar calls, so the row's exponentials are kept in two
    float64 row buffers (3 transcendental calls per element instead of 7), and
    log M is ``log((1-beta) q + beta p)`` when that mixture is a normal float64
    (relative error ~1 ulp either way), falling back to the log-space formula
    ``max + log1p(exp(-|a - b|))`` when both probabilities underflow (logit gaps > ~700).
    """
    n, v = zs.shape
    loss = np.zeros(n)
    lb = np.log(beta) if beta > 0.0 else -np.inf
    l1b = np.log1p(-beta) if beta < 1.0 else -np.inf
    for i in prange(n):
        if not valid[i]:
            for j in range(v):
                out[i, j] = 0.0
            continue
        eq = np.empty(v)                        # exp((s - max) / tau), then q
        ep = np.empty(v)                        # exp((u - max) / tau), then p
        ms = -np.inf
        mt = -np.inf
        for j in range(v):
            ms = max(ms, np.float64(zs[i, j]))
            mt = max(mt, np.float64(zt[i, j]))
        ss = 0.0
        st = 0.0
        for j in range(v):
            eq[j] = np.exp((np.float64(zs[i, j]) - ms) * inv_t)
            ep[j] = np.exp((np.float64(zt[i, j]) - mt) * inv_t)
            ss += eq[j]
            st += ep[j]
        ls = np.log(ss)
        lt = np.log(st)
        acc = 0.0
        sum_u = 0.0
        for j in range(v):
            lq = (np.float64(zs[i, j]) - ms) * inv_t - ls
            lp = (np.float64(zt[i, j]) - mt) * inv_t - lt
            q = eq[j] / ss
            p = ep[j] / st
            eq[j] = q
            if mode == 0:                       # forward KL(p || q)
                e = p * (lp - lq)
                u = -p
            elif mode == 1:                     # reverse KL(q || p)
                d = lq - lp
                e = q * d
                u = q * (d + 1.0)
            elif mode == 2:
                mix = (1.0 - beta) * q + beta * p
                if mix > 1e-300:
                    lm = np.log(mix)
                else:
                    lm = logaddexp64(lq + l1b, lp + lb)
                u = (1.0 - beta) * q * (lq - lm)
                e = beta * p * (lp - lm) + u
            elif mode == 3:                     # skew KL: M = beta p + (1 - beta) q (beta = alpha)
                lm = logaddexp64(lp + lb, lq + l1b)
                e = p * (lp - lm)
                u = -(1.0 - beta) * np.exp(lp + lq - lm)
            elif mode == 4:                     # skew reverse KL: M = (1 - beta) p + beta q
                d = lq - logaddexp64(lp + l1b, lq + lb)
                e = q * d
                u = q * (d + 1.0 - np.exp(lb + d))
            else:                               # total variation
                e = 0.5 * abs(q - p)
                u = 0.5 * np.sign(q - p) * q
            acc += e
            sum_u += u
            ep[j] = u
        loss[i] = acc
        c = row_scale[i] * inv_t
        for j in range(v):
            out[i, j] = c * (ep[j] - eq[j] * sum_u)
    return loss, out


def ce_rows(z, targets, row_scale, inv_t, ignore_index):
    """Cross-entropy rows of softmax(z / tau): loss (C,) float64 and row_scale * (q - onehot) / tau.

    The one cross-entropy kernel, :func:`refimpl.kernels.cross_entropy_nb.ce_loss_grad_rows`.
    """
    return ce_loss_grad_rows(z, targets, row_scale, inv_t, ignore_index, np.empty_like(z))


def logp_grad_rows(z, tokens, rowmax, logsum, g, inv_t, ignore_index):
    """d(sum_i g[i] * logp_i)/dz = g (onehot - q) / tau (C, V); ignored rows are 0.

    :func:`refimpl.kernels.cross_entropy_nb.ce_grad_rows` with row scale ``-g``.
    """
    return ce_grad_rows(z, tokens, rowmax, logsum, -np.asarray(g, np.float64), inv_t, ignore_index,
                        np.empty_like(z))
