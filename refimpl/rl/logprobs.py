r"""Per-token log-probabilities and entropies of sampled tokens, from logits, with their backward.

The policy-gradient losses need only :math:`\ell_{t} = \log\pi(o_t)`, the log-probability of the
token that was sampled, not the whole (B, T, V) log-softmax. Following TRL's
``selective_log_softmax``, the forward keeps one log-sum-exp per position and gathers the sampled
logit: :math:`\ell_t = u_{t,o_t} - \mathrm{lse}(u_t)` with :math:`u = z/\tau`. The logits are divided
by the *sampling* temperature :math:`\tau` for the current, old and reference policies alike (TRL and
verl both do; using raw logits at :math:`\tau \ne 1` breaks the importance ratio). The entropy of
the tempered distribution, :math:`H_t = -\sum_k \pi_{t,k}\log\pi_{t,k}`, comes almost for free from the
same pass and feeds the entropy bonus and the diagnostics.

Backward (the log-softmax and entropy VJPs, checked against finite differences and torch in
``tests/rl``):

.. math:: \frac{\partial \ell_t}{\partial z_{t,k}} = \frac{\mathbb 1[k=o_t] - \pi_{t,k}}{\tau},\qquad
          \frac{\partial H_t}{\partial z_{t,k}} = -\frac{\pi_{t,k}}{\tau}\,(\log\pi_{t,k} + H_t).

Both are computed row-chunk by row-chunk from the cached row maxima and log-sums, so no (B, T, V)
probability tensor is kept between forward and backward; the only temporaries are two reused
(chunk, V) buffers. The log-sum is ``log1p`` of the non-maximal terms, so the log-prob of a
near-certain token keeps its digits even in float32.

Logits must be finite (no ``-inf`` vocabulary masks). Extreme logits (``|z| ~ 1e4``) stay finite.

A Numba twin (:mod:`refimpl.kernels.logprobs_nb`, ``backend="numba"``) reads each row once for the
forward and writes each row of the gradient in one sweep; it keeps the ``log1p`` property. The
default backend of these functions is ``"numpy"`` unless ``REFIMPL_BACKEND`` says otherwise (see
:func:`logps_entropy_forward`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_int, check_integer, check_positive_real, check_upstream
from ..backend import kernel, resolve_backend
from ..core.cross_entropy import NONFINITE_LOGITS

CHUNK_ROWS = 32  # rows per pass: (32, V) buffers stay in cache for V ~ 32k


class LogProbCache(NamedTuple):
    logits: np.ndarray      # (N, V) the input logits, rows flattened (a view, not a copy)
    ids: np.ndarray         # (N,) int64 sampled token ids
    rowmax: np.ndarray      # (N,) max_k z_k / temperature (numba backend: max_k z_k, float64)
    log_s: np.ndarray       # (N,) log sum_k exp(z_k / temperature - rowmax); lse = rowmax + log_s
    #                         (numba backend: log sum_k exp((z_k - rowmax) / temperature), float64)
    entropy: np.ndarray     # (N,) entropy of softmax(logits / temperature)
    temperature: float
    shape: tuple            # leading shape (B, T)
    backend: str = "numpy"  # the forward's backend, which the backward follows


def _check_temperature(temperature) -> float:
    return check_positive_real("temperature", temperature)


def logps_entropy_forward(logits, ids, *, temperature=1.0, chunk_rows=CHUNK_ROWS, backend=None):
    r"""Log-probabilities of ``ids`` and entropies under :math:`\pi = \mathrm{softmax}(z/\tau)`.

    .. math:: \ell_t = \frac{z_{t,o_t}}{\tau} - \log\sum_k e^{z_{t,k}/\tau},\qquad
              H_t = -\sum_k \pi_{t,k}\log\pi_{t,k}

    ``backend``: ``"numba"`` (or ``"auto"``) runs the twin
    :func:`refimpl.kernels.logprobs_nb.logps_entropy_rows` (same values within float rounding; it
    tests the logits' finiteness in its own pass and raises the same ValueError); the cache records
    the choice and :func:`logps_entropy_backward` follows it. ``None`` is ``REFIMPL_BACKEND`` if set,
    else ``"numpy"``, not the package's ``"auto"``: the trainer and the rollout pass their own
    ``backend`` (None by default) and :mod:`refimpl.rl.stable` passes none, and the book's small RL
    experiments are rounding-sensitive (a different backend changes float32 rounding and, over
    hundreds of steps, their outcomes), so by default they stay bit for bit on the reference
    (:mod:`refimpl.backend`, "Sites whose default is the reference"). ``chunk_rows`` applies to the
    NumPy path only.

    Shapes: logits (..., V), ids (...) int64 -> logps (...), entropy (...), cache. Outputs have the
    logits' dtype.
    """
    check_float("logits", logits, min_ndim=1, scan=False)
    backend = resolve_backend(backend, work=logits.size, default="numpy")
    if backend == "numpy":
        check_float("logits", logits, min_ndim=1)
    tau = _check_temperature(temperature)
    V = logits.shape[-1]
    ids = check_int("ids", ids, low=0, high=V)
    if ids.shape != logits.shape[:-1]:
        raise ValueError(f"ids: expected shape {logits.shape[:-1]} (logits without the vocab axis), got {ids.shape}")
    lead = logits.shape[:-1]
    z = logits.reshape(-1, V)                                           # (N, V)
    o = ids.reshape(-1)                                                 # (N,)
    N = z.shape[0]
    if backend == "numba":
        check_integer("chunk_rows", chunk_rows, low=1)
        return _forward_numba(z, o, tau, lead)
    rowmax = np.empty(N, dtype=z.dtype)                                 # (N,)
    logs = np.empty(N, dtype=z.dtype)                                   # (N,)
    ent = np.empty(N, dtype=z.dtype)                                    # (N,)
    logp = np.empty(N, dtype=z.dtype)                                   # (N,)
    tau_ = z.dtype.type(tau)
    chunk_rows = check_integer("chunk_rows", chunk_rows, low=1)
    us = np.empty((min(chunk_rows, N), V), dtype=z.dtype)               # (C, V) reused buffers: allocating
    e = np.empty_like(us)                                               # (C, V) fresh ones per chunk is slower
    for a in range(0, N, chunk_rows):
        b = min(a + chunk_rows, N)
        C, r = b - a, np.arange(b - a)
        u = np.divide(z[a:b], tau_, out=us[:C])                         # (C, V) u = z / tau
        top = u.argmax(axis=-1)                                         # (C,)
        m = u[r, top]                                                   # (C,) row max
        np.subtract(u, m[:, None], out=u)                               # (C, V) us = u - max, max 0
        ex = np.exp(u, out=e[:C])                                       # (C, V)
        # drop the max term (exactly 1, and us = 0 there, so the entropy sum below is unchanged)
        ex[r, top] = 0.0
        rest = ex.sum(axis=-1)                                          # (C,) sum of the other terms
        # log1p, not log(1 + rest): a confident token's log-prob -log1p(rest) ~ -rest keeps its
        # digits (in float32, log(1 + 1e-9) is 0), so ratios of near-certain tokens stay exact
        log_s = np.log1p(rest)                                          # (C,)
        rowmax[a:b], logs[a:b] = m, log_s
        # H = -sum_k pi_k (us_k - log_s) = log_s - sum_k e_k us_k / s   (finite even where pi_k = 0)
        ent[a:b] = log_s - np.einsum("cv,cv->c", ex, u) / (1.0 + rest)
        # logp = u[o] - lse = us[o] - log_s: no cancellation of two large numbers
        logp[a:b] = u[r, o[a:b]] - log_s
    cache = LogProbCache(z, o, rowmax, logs, ent, tau, lead)
    return logp.reshape(lead), ent.reshape(lead), cache


def logps_entropy_backward(dlogps, dentropy, cache, *, chunk_rows=CHUNK_ROWS, backend=None):
    r"""Gradient of :func:`logps_entropy_forward` with respect to the logits.

    ``dlogps`` or ``dentropy`` may be None (no gradient through that output). ``backend``: None
    follows the forward (the cache's statistics differ between the two); any other value must
    resolve to the forward's backend (ValueError otherwise). ``chunk_rows``: NumPy path only.

    Shapes: dlogps (...), dentropy (...) -> dlogits (..., V) in the logits' dtype.
    """
    z, o, rowmax, logs, ent, tau, lead = cache[:7]
    N, V = z.shape
    if backend is not None and resolve_backend(backend, work=z.size) != cache.backend:
        raise ValueError(f"backend: the cache was made by the {cache.backend!r} forward, which the backward "
                         f"must follow; got {backend!r}")
    for name, d in (("dlogps", dlogps), ("dentropy", dentropy)):
        if d is not None:
            check_upstream(name, d, lead)
    g = np.zeros(N) if dlogps is None else np.asarray(dlogps, dtype=np.float64).reshape(N)      # (N,)
    h = np.zeros(N) if dentropy is None else np.asarray(dentropy, dtype=np.float64).reshape(N)  # (N,)
    if cache.backend == "numba":
        dz = kernel("logprobs_nb").logps_entropy_grad_rows(z, o, rowmax, logs, ent, g, h, 1.0 / tau,
                                                           np.empty_like(z))  # (N, V)
        return dz.reshape(*lead, V)                                     # (..., V)
    dz = np.empty_like(z)                                               # (N, V)
    tau_ = z.dtype.type(tau)
    chunk_rows = check_integer("chunk_rows", chunk_rows, low=1)
    buf = np.empty((min(chunk_rows, N), V), dtype=z.dtype)              # (C, V) reused buffers
    pib = np.empty_like(buf)                                            # (C, V)
    for a in range(0, N, chunk_rows):
        b = min(a + chunk_rows, N)
        C, r = b - a, np.arange(b - a)
        ga = g[a:b, None].astype(z.dtype)                               # (C, 1)
        ha = h[a:b, None].astype(z.dtype)                               # (C, 1)
        # log pi = (u - rowmax) - log_s, not u - lse: keeps float32 precision when |z| ~ 1e4
        logpi = np.divide(z[a:b], tau_, out=buf[:C])                    # (C, V)
        np.subtract(logpi, rowmax[a:b, None], out=logpi)
        np.subtract(logpi, logs[a:b, None], out=logpi)                  # (C, V) log pi
        lo = logpi[r, o[a:b]]                                           # (C,) log pi at the sampled token
        pi = np.exp(logpi, out=pib[:C])                                 # (C, V)
        # forward: l = u[o] - lse(u), u = z / tau      so: dz = g (onehot(o) - pi) / tau
        # forward: H = -sum_k pi_k log pi_k             so: dz = -h pi (log pi + H) / tau
        if dentropy is None:
            blk = np.multiply(pi, -ga, out=pi)                          # (C, V) -g pi
        else:
            t = np.add(logpi, ent[a:b, None], out=logpi)                # (C, V) log pi + H
            np.multiply(t, ha, out=t)
            np.add(t, ga, out=t)                                        # (C, V) g + h (log pi + H)
            blk = np.multiply(pi, t, out=pi)
            np.negative(blk, out=blk)                                   # (C, V)
        # the sampled entry: g (1 - pi_o) written as -g expm1(log pi_o), exact when pi_o ~ 1
        blk[r, o[a:b]] = -ga[:, 0] * np.expm1(lo) - ha[:, 0] * np.exp(lo) * (lo + ent[a:b])
        np.divide(blk, tau_, out=dz[a:b])
    return dz.reshape(*lead, V)                                         # (..., V)


def _forward_numba(z, o, tau, lead):
    """The twin's forward (rows in parallel, finiteness tested in the same pass)."""
    z = np.ascontiguousarray(z)                                         # (N, V)
    N = z.shape[0]
    logp = np.empty(N, dtype=z.dtype)                                   # (N,)
    ent = np.empty(N, dtype=z.dtype)                                    # (N,)
    rowmax = np.empty(N)                                                # (N,) raw row maximum, float64
    logs = np.empty(N)                                                  # (N,) float64
    finite = np.empty(N, dtype=bool)                                    # (N,)
    kernel("logprobs_nb").logps_entropy_rows(z, o, 1.0 / tau, logp, rowmax, logs, ent, finite)
    if not finite.all():
        raise ValueError(NONFINITE_LOGITS)
    cache = LogProbCache(z, o, rowmax, logs, ent, tau, lead, "numba")
    return logp.reshape(lead), ent.reshape(lead), cache


def selective_log_softmax_forward(logits, ids, *, temperature=1.0):
    r""":math:`\ell_t = \log\mathrm{softmax}(z_t/\tau)[o_t]` (TRL's ``selective_log_softmax`` on
    ``logits / temperature``). Shapes: logits (..., V), ids (...) -> logps (...), cache."""
    logp, _, cache = logps_entropy_forward(logits, ids, temperature=temperature)
    return logp, cache


def selective_log_softmax_backward(dlogps, cache):
    r""":math:`\partial J/\partial z_{t,k} = g_t(\mathbb 1[k=o_t]-\pi_{t,k})/\tau`. Shapes: (...) -> (..., V)."""
    return logps_entropy_backward(dlogps, None, cache)


def entropy_forward(logits, *, temperature=1.0):
    r""":math:`H_t = -\sum_k \pi_{t,k}\log\pi_{t,k}`, :math:`\pi = \mathrm{softmax}(z/\tau)`.
    Shapes: logits (..., V) -> entropy (...), cache."""
    ids = np.zeros(logits.shape[:-1] if isinstance(logits, np.ndarray) else (), dtype=np.int64)
    _, ent, cache = logps_entropy_forward(logits, ids, temperature=temperature)
    return ent, cache


def entropy_backward(dentropy, cache):
    r""":math:`\partial H_t/\partial z_{t,k} = -\pi_{t,k}(\log\pi_{t,k} + H_t)/\tau`. Shapes: (...) -> (..., V)."""
    return logps_entropy_backward(None, dentropy, cache)
