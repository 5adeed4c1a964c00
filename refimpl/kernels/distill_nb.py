"""Numba twins of the per-chunk softmax + loss + gradient passes of :mod:`refimpl.distill.fused`.

Each kernel takes one chunk of logits (C, V), C-contiguous, and walks every row a few times:
maximum, sum of exponentials, then one pass that produces the loss and the gradient with respect to
the logits in place of the (C, V) temporaries the NumPy reference allocates (log q, q, log p, p,
log M, ...). Rows run in parallel with ``prange``; all arithmetic is float64 whatever the input
dtype (outputs are cast back), so float32 results are at least as accurate as the NumPy
reference's. ``fastmath`` is off. Signatures mirror the NumPy ``_*_rows`` functions in
:mod:`refimpl.distill.fused`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cross_entropy_nb import ce_grad_rows, ce_loss_grad_rows, logp_rows

__all__ = ["gjsd_rows", "ce_rows", "logp_rows", "logp_grad_rows"]


@njit(cache=True, parallel=True)
def gjsd_rows(zs, zt, valid, row_scale, beta, inv_t):
    """Generalized JSD rows: loss (C,) float64 and d(sum_i row_scale[i] * loss_i)/dzs (C, V).

    ``beta`` 0 / 1 are forward / reverse KL exactly as in
    :func:`refimpl.distill.losses.gjsd_terms`; rows with ``valid[i] == False`` give 0 and 0.
    Without SVML numba's exp/log are scalar calls, so the row's exponentials are kept in two
    float64 row buffers (3 transcendental calls per element instead of 7), and
    log M is ``log((1-beta) q + beta p)`` when that mixture is a normal float64
    (relative error ~1 ulp either way), falling back to the log-space formula
    ``max + log1p(exp(-|a - b|))`` when both probabilities underflow (logit gaps > ~700).
    """
    n, v = zs.shape
    loss = np.zeros(n)
    out = np.empty_like(zs)
    lb = np.log(beta) if beta > 0.0 else 0.0
    l1b = np.log1p(-beta) if beta < 1.0 else 0.0
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
            if beta == 0.0:                     # forward KL(p || q)
                e = p * (lp - lq)
                u = -p
            elif beta == 1.0:                   # reverse KL(q || p)
                d = lq - lp
                e = q * d
                u = q * (d + 1.0)
            else:
                mix = (1.0 - beta) * q + beta * p
                if mix > 1e-300:
                    lm = np.log(mix)
                else:
                    a = lq + l1b
                    b = lp + lb
                    lm = max(a, b) + np.log1p(np.exp(-abs(a - b)))
                u = (1.0 - beta) * q * (lq - lm)
                e = beta * p * (lp - lm) + u
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
