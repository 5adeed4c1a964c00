"""Chunked fused LM head + loss: the loss and its gradients without the (N x V) logits matrix.

The logits of an LM head are the largest tensor in training a small model on a large vocabulary:
N = 16k tokens times V = 152k entries is 10 GB in float32, plus as much again for its gradient.
Because the loss is the last node of the graph, its gradient can be produced in the forward pass
(grpo-distillation reference §5; the Liger-Kernel approach): for each chunk of C rows,

1. :math:`Z_c = H_c W^\\top` (C, V), the chunk's logits (and the teacher's, if it sends hidden states);
2. the per-row loss and :math:`dZ_c` analytically, with normalisers taken from the *whole* batch;
3. :math:`dH_c = dZ_c W`, :math:`dW \\mathrel{+}= dZ_c^\\top H_c`; then :math:`Z_c` is dropped.

Peak memory is O(C·V + V·D) instead of O(N·V). The per-chunk softmax + loss + gradient pass has a
Numba twin (:mod:`refimpl.kernels.distill_nb`) chosen by ``backend=``; the GEMMs are NumPy's (BLAS).
The LM head has no bias (DeepSeek-V2/V3, Qwen and Llama heads have none).

GRPO-style losses need every token's log-prob before any gradient (sequence normalisers, GSPO's
sequence ratio), so :func:`fused_linear_logprob_loss` runs two passes: log-probs chunk by chunk,
then a user callback ``logps -> (loss, dlogps)`` on the (N,) vector (e.g.
:func:`refimpl.rl.grpo.grpo_loss`, whatever its aggregation), then a second pass that recomputes
each chunk's logits for :math:`dZ = g\\,(e_o - \\pi)/\\tau`. The price is one extra (N x D x V) GEMM.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float, check_int, check_positive_int, check_same_dtype
from ..backend import kernel, resolve_backend
from ..rl.grpo import grpo_loss
from ._common import (
    IGNORE_INDEX,
    check_num_items,
    check_reduction,
    check_temperature,
    label_rows,
    log_softmax_rows,
    logsoftmax_vjp,
)
from .divergences import divergence_options, get_divergence

# ------------------------------------------------------------------ per-chunk passes (NumPy reference)

def divergence_rows(zs, zt, valid, row_scale, terms, opts, inv_t):
    """Divergence rows: (loss (C,) float64, d(sum_i row_scale_i loss_i)/dzs (C, V)), ``terms`` of the table."""
    lq, q = log_softmax_rows(zs, inv_t)                                 # (C, V) each
    lp, p = log_softmax_rows(zt, inv_t)                                 # (C, V) each
    E, U = terms(lq, q, lp, p, **opts)                                  # (C, V) each
    loss = np.where(valid, E.sum(axis=-1, dtype=np.float64), 0.0)       # (C,)
    # forward: L = sum_i w_i sum_j E_ij(log q_i)   so: dz_i = (G_i - q_i sum_j G_ij) / tau, G = w U
    dz = logsoftmax_vjp(row_scale[:, None] * U, q, inv_t)               # (C, V)
    return loss, dz


def _ce_rows(z, targets, row_scale, inv_t, ignore_index):
    """Cross-entropy rows: (loss (C,) float64, row_scale * (q - onehot(target)) / tau (C, V))."""
    valid = targets != ignore_index                                     # (C,)
    rows = np.nonzero(valid)[0]                                         # (c_valid,)
    lq, q = log_softmax_rows(z, inv_t)                                  # (C, V) each
    loss = np.zeros(z.shape[0])                                         # (C,)
    loss[rows] = -lq[rows, targets[rows]]
    # forward: loss_i = -log q_i[y_i]   so: dz_i = w_i (q_i - onehot(y_i)) / tau
    c = (row_scale * inv_t * valid).astype(z.dtype)                     # (C,)
    dz = q * c[:, None]                                                 # (C, V)
    dz[rows, targets[rows]] -= c[rows]
    return loss, dz


def _logp_rows(z, tokens, inv_t, ignore_index):
    """(log softmax(z/tau)[token] (C,) float64, 0 where ignored; row max (C,); log-sum (C,))."""
    m = z.max(axis=-1)                                                  # (C,)
    x = (z - m[:, None]) * inv_t                                        # (C, V)
    ls = np.log(np.exp(x).sum(axis=-1, dtype=np.float64))               # (C,)
    valid = tokens != ignore_index                                      # (C,)
    xt = np.take_along_axis(x, np.where(valid, tokens, 0)[:, None], axis=-1)[:, 0]  # (C,)
    return np.where(valid, xt - ls, 0.0), m.astype(np.float64), ls


def _logp_grad_rows(z, tokens, rowmax, logsum, g, inv_t, ignore_index):
    """g (onehot(token) - q) / tau (C, V), q = softmax(z / tau); ignored rows are 0."""
    # forward: logp_i = z_i[o_i] / tau - lse(z_i / tau)   so: dz_i = g_i (onehot(o_i) - q_i) / tau
    valid = tokens != ignore_index                                      # (C,)
    rows = np.nonzero(valid)[0]                                         # (c_valid,)
    c = (g * inv_t * valid).astype(z.dtype)                             # (C,)
    x = (z - rowmax[:, None].astype(z.dtype)) * inv_t - logsum[:, None].astype(z.dtype)  # (C, V) log q
    dz = np.exp(x) * -c[:, None]                                        # (C, V)
    dz[rows, tokens[rows]] += c[rows]
    return dz


# ------------------------------------------------------------------ driver and validation

def _check_head(hidden, weight, hname="hidden", wname="weight"):
    check_float(hname, hidden, min_ndim=2)
    check_float(wname, weight, ndim=2)
    check_same_dtype(wname, weight, hname, hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wname}: expected shape (V, {hidden.shape[-1]}) to match {hname}'s last axis, "
                         f"got {weight.shape}")
    return hidden.reshape(-1, hidden.shape[-1]), hidden.shape[:-1]


def _check_chunk(chunk_size) -> int:
    return check_positive_int("chunk_size", chunk_size)


def _check_dloss(dloss) -> float:
    if np.ndim(dloss) != 0 or not np.isfinite(dloss):
        raise ValueError(f"dloss: expected a finite scalar (the fused losses are scalar), got {dloss!r}")
    return float(dloss)


def drive_chunks(h, weight, chunk_size, row_pass):
    """Loop over row chunks: Z = h_c W^T, (loss_c, dZ) = row_pass(Z, s, e), dh_c = dZ W, dW += dZ^T h_c."""
    n = h.shape[0]
    dh = np.empty_like(h)                                               # (N, D)
    dw = np.zeros_like(weight)                                          # (V, D)
    buf = np.empty_like(weight) if n > chunk_size else None             # (V, D) one chunk's dW
    zbuf = np.empty((min(chunk_size, n), weight.shape[0]), h.dtype)     # (C, V) reused for every chunk
    total = 0.0
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        hc = h[s:e]                                                     # (C, D)
        z = np.matmul(hc, weight.T, out=zbuf[:e - s])                   # (C, V) this chunk's logits
        loss_c, dz = row_pass(z, s, e)                                  # (C,), (C, V)
        total += float(np.sum(loss_c))
        # forward: Z_c = h_c W^T   so: dh_c = dZ_c W, dW = sum over chunks of dZ_c^T h_c
        np.matmul(dz, weight, out=dh[s:e])                              # (C, D)
        if s == 0:
            np.matmul(dz.T, hc, out=dw)                                 # (V, D)
        else:
            np.matmul(dz.T, hc, out=buf)                                # (V, D)
            dw += buf
    return total, dh, dw


def _teacher_source(lead, n, v, dtype, teacher_logits, teacher_hidden, teacher_weight):
    """Return chunk(s, e) -> teacher logits (C, V), from teacher logits or teacher hidden + head."""
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError("teacher_logits: pass either teacher_logits, or teacher_hidden and teacher_weight")
    if teacher_logits is not None:
        check_float("teacher_logits", teacher_logits, min_ndim=2)
        if teacher_logits.dtype != dtype:
            raise TypeError(f"teacher_logits: expected dtype {dtype} to match hidden, got {teacher_logits.dtype}")
        if teacher_logits.shape[-1] != v:
            raise ValueError(f"teacher_logits: vocabulary size {teacher_logits.shape[-1]} does not match the "
                             f"student head's {v}")
        if teacher_logits.shape[:-1] != lead:
            raise ValueError(f"teacher_logits: expected shape {lead + (v,)}, got {teacher_logits.shape}")
        u = np.ascontiguousarray(teacher_logits.reshape(n, v))          # (N, V)
        return lambda s, e: u[s:e]
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("teacher_weight: teacher_hidden and teacher_weight must be given together")
    th, tlead = _check_head(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    if th.dtype != dtype:
        raise TypeError(f"teacher_hidden: expected dtype {dtype} to match hidden, got {th.dtype}")
    if teacher_weight.shape[0] != v:
        raise ValueError(f"teacher_weight: vocabulary size {teacher_weight.shape[0]} does not match the "
                         f"student head's {v} (weight has shape (V, D))")
    if tlead != lead:
        raise ValueError(f"teacher_hidden: expected leading shape {lead} to match hidden, got {tlead}")
    tbuf = []                                                           # one (C, V) buffer, made on first use

    def chunk(s, e):
        if not tbuf:
            tbuf.append(np.empty((e - s, v), dtype))                    # (C, V)
        return np.matmul(th[s:e], teacher_weight.T, out=tbuf[0][:e - s])  # (C, V)
    return chunk


# ------------------------------------------------------------------ public API

def fused_linear_divergence(hidden, weight, labels=None, *, divergence="generalized_jsd", teacher_logits=None,
                            teacher_hidden=None, teacher_weight=None, temperature=1.0, reduction="batchmean",
                            num_items_in_batch=None, chunk_size=1024, dloss=1.0, backend=None, **options):
    r"""A divergence of the student head's logits from a teacher's, chunk by chunk (any table entry).

    Computes :func:`~refimpl.distill.divergence_loss` (``divergence`` names an entry of
    :data:`~refimpl.distill.divergences.DIVERGENCES`, ``options`` are its options, e.g. ``beta``) of
    :math:`s = H W^\top` against the teacher's logits (given, or :math:`H_T W_T^\top` from the
    teacher's hidden states and head, also chunked) and its gradients with respect to ``hidden`` and
    ``weight``, never holding more than ``chunk_size`` rows of logits. Same ``temperature``,
    ``labels``, scalar reductions (``"batchmean"``, ``"sum"``, ``"mean"``) and ``num_items_in_batch``
    as the unchunked loss, whose value and gradients it reproduces for any ``chunk_size``; ``"none"``
    would need the (N, V) tensor and is refused. The normalisers come from the whole batch, never
    from a chunk. ``backend="numba"`` uses the entry's ``kernel_rows`` where it has one.

    Shapes: hidden (..., D), weight (V, D), labels (...), teacher_logits (..., V) or
    teacher_hidden (..., Dt) with teacher_weight (V, Dt) -> loss (), dhidden (..., D), dweight (V, D).
    """
    h, lead = _check_head(hidden, weight)                               # (N, D)
    n, v = h.shape[0], weight.shape[0]
    entry = get_divergence(divergence)
    opts = divergence_options(divergence, options)
    inv_t = 1.0 / check_temperature(temperature)
    check_reduction(reduction, ("batchmean", "sum", "mean"))
    chunk_size, dloss = _check_chunk(chunk_size), _check_dloss(dloss)
    backend = resolve_backend(backend)
    teacher = _teacher_source(lead, n, v, h.dtype, teacher_logits, teacher_hidden, teacher_weight)
    _, valid = label_rows(labels, lead)                                 # (N,)
    # the unchunked loss's normalisers, from the whole batch (never per chunk)
    count = int(valid.sum()) if labels is not None else (lead[0] if reduction == "batchmean" else n)
    denom = {"sum": 1, "batchmean": count, "mean": count * v}[reduction]
    num_items = check_num_items(num_items_in_batch)
    if num_items is not None:                                           # TRL: sum / num_items, any reduction
        denom = num_items
    scale = 1.0 / denom if denom > 0 else 0.0                           # all masked: 0, never NaN
    row_scale = (dloss * scale * valid).astype(h.dtype)                 # (N,)

    def row_pass(z, s, e):
        zt = teacher(s, e)                                              # (C, V)
        if backend == "numba" and entry.kernel_rows is not None:
            return entry.kernel_rows(z, zt, valid[s:e], row_scale[s:e], inv_t, **opts)
        return divergence_rows(z, zt, valid[s:e], row_scale[s:e], entry.terms, opts, inv_t)

    total, dh, dw = drive_chunks(h, weight, chunk_size, row_pass)
    return np.asarray(total * scale).astype(h.dtype), dh.reshape(hidden.shape), dw


def fused_linear_jsd(hidden, weight, labels=None, *, teacher_logits=None, teacher_hidden=None,
                     teacher_weight=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items_in_batch=None,
                     chunk_size=1024, dloss=1.0, backend=None):
    r"""Generalized JSD of the student head's logits against a teacher, chunk by chunk (GKD eq. 1).

    :func:`fused_linear_divergence` with ``divergence="generalized_jsd"``: the chunked twin of
    :func:`~refimpl.distill.generalized_jsd_loss` (same ``beta``, TRL's convention).

    Shapes: hidden (..., D), weight (V, D), labels (...), teacher_logits (..., V) or
    teacher_hidden (..., Dt) with teacher_weight (V, Dt) -> loss (), dhidden (..., D), dweight (V, D).
    """
    return fused_linear_divergence(hidden, weight, labels, divergence="generalized_jsd", teacher_logits=teacher_logits,
                                   teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, beta=beta,
                                   temperature=temperature, reduction=reduction,
                                   num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, dloss=dloss,
                                   backend=backend)


def fused_linear_cross_entropy(hidden, weight, labels, *, temperature=1.0, reduction="mean", chunk_size=1024,
                               dloss=1.0, backend=None):
    r"""Cross-entropy of ``softmax(H W^T / tau)`` against ``labels``, chunk by chunk (reference §5).

    .. math:: L = \frac{1}{|\mathcal T|}\sum_{t \in \mathcal T} -\log \mathrm{softmax}(h_t W^\top/\tau)_{y_t},
              \qquad dZ_t = \frac{\mathrm{softmax}(z_t/\tau) - e_{y_t}}{\tau\,|\mathcal T|}

    ``reduction``: ``"mean"`` over non-ignored positions (0.0 when all are ignored, where torch
    gives NaN) or ``"sum"``; ``labels`` use -100 for ignored positions. Matches
    :func:`refimpl.core.cross_entropy` on the full logits for any ``chunk_size``. This is
    also sequence-level KD (:func:`~refimpl.distill.sequence_kd_loss`) when ``labels`` are teacher
    samples.

    Shapes: hidden (..., D), weight (V, D), labels (...) -> loss (), dhidden (..., D), dweight (V, D).
    """
    h, lead = _check_head(hidden, weight)                               # (N, D)
    v = weight.shape[0]
    inv_t = 1.0 / check_temperature(temperature)
    check_reduction(reduction, ("mean", "sum"))
    chunk_size, dloss = _check_chunk(chunk_size), _check_dloss(dloss)
    backend = resolve_backend(backend)
    flat, valid = label_rows(labels, lead, vocab=v, required=True)      # (N,)
    n_valid = int(valid.sum())
    scale = 1.0 if reduction == "sum" else (1.0 / n_valid if n_valid else 0.0)
    row_scale = np.full(h.shape[0], dloss * scale)                      # (N,) float64

    def row_pass(z, s, e):
        if backend == "numba":
            return kernel("distill_nb").ce_rows(z, flat[s:e], row_scale[s:e], inv_t, IGNORE_INDEX)
        return _ce_rows(z, flat[s:e], row_scale[s:e], inv_t, IGNORE_INDEX)

    total, dh, dw = drive_chunks(h, weight, chunk_size, row_pass)
    return np.asarray(total * scale).astype(h.dtype), dh.reshape(hidden.shape), dw


def _logp_pass(h, weight, tokens, inv_t, chunk_size, backend):
    n = h.shape[0]
    logp, rowmax, logsum = np.empty(n), np.empty(n), np.empty(n)        # (N,) each
    rows = kernel("distill_nb").logp_rows if backend == "numba" else _logp_rows
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        z = h[s:e] @ weight.T                                           # (C, V)
        logp[s:e], rowmax[s:e], logsum[s:e] = rows(z, tokens[s:e], inv_t, IGNORE_INDEX)
    return logp, rowmax, logsum


def _check_tokens(tokens, lead, v):
    tokens = check_int("tokens", tokens, low=0, high=v, allow=IGNORE_INDEX)
    if tokens.shape != tuple(lead):
        raise ValueError(f"tokens: expected shape {tuple(lead)} (hidden without its last axis), got {tokens.shape}")
    return tokens.reshape(-1)                                           # (N,)


def fused_linear_token_logps(hidden, weight, tokens, *, temperature=1.0, chunk_size=1024, backend=None):
    r"""Per-token log-probs :math:`\log \mathrm{softmax}(h_t W^\top/\tau)_{o_t}`, chunk by chunk.

    Positions whose token is -100 get 0. Shapes: hidden (..., D), weight (V, D), tokens (...) -> (...).
    """
    h, lead = _check_head(hidden, weight)                               # (N, D)
    inv_t = 1.0 / check_temperature(temperature)
    tok = _check_tokens(tokens, lead, weight.shape[0])                  # (N,)
    logp, _, _ = _logp_pass(h, weight, tok, inv_t, _check_chunk(chunk_size), resolve_backend(backend))
    return logp.astype(h.dtype).reshape(lead)                           # (...)


def fused_linear_logprob_loss(hidden, weight, tokens, loss_fn, *, temperature=1.0, chunk_size=1024, backend=None):
    r"""Any loss of the per-token log-probs (GRPO, PPO, DPO-style), with chunked LM-head gradients.

    Pass 1 computes :math:`\ell_t = \log\mathrm{softmax}(h_t W^\top/\tau)_{o_t}` chunk by chunk; then
    ``loss_fn(logps)`` returns ``(loss, dlogps)`` or ``(loss, dlogps, info)`` with ``logps`` and
    ``dlogps`` shaped like ``tokens``; pass 2 recomputes each chunk's logits and back-propagates
    (grpo-distillation reference §1.6):

    .. math:: \frac{\partial J}{\partial z_{t,k}} = g_t\,\frac{\mathbf 1[k = o_t] - \pi_{t,k}}{\tau},
              \qquad g_t = \frac{\partial J}{\partial \ell_t}

    Because ``loss_fn`` sees every token's log-prob at once, any aggregation works unchanged
    (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, sequence-level ratios): the normalisers come from the
    full mask, never from a chunk. Tokens equal to -100 get log-prob 0 and no gradient. No entropy
    bonus (it needs :math:`\partial H/\partial z`, not a function of :math:`\ell` alone).

    Returns ``(loss, dhidden, dweight, info)`` (``info`` is ``{}`` when ``loss_fn`` returns none).

    Shapes: hidden (..., D), weight (V, D), tokens (...) int64 -> loss (), dhidden (..., D), dweight (V, D).
    """
    h, lead = _check_head(hidden, weight)                               # (N, D)
    inv_t = 1.0 / check_temperature(temperature)
    tok = _check_tokens(tokens, lead, weight.shape[0])                  # (N,)
    chunk_size, backend = _check_chunk(chunk_size), resolve_backend(backend)
    logp, rowmax, logsum = _logp_pass(h, weight, tok, inv_t, chunk_size, backend)  # (N,) each
    out = loss_fn(logp.astype(h.dtype).reshape(lead))
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError("loss_fn: expected to return (loss, dlogps) or (loss, dlogps, info)")
    loss, dlogp = out[0], np.asarray(out[1])
    info = out[2] if len(out) == 3 else {}
    if dlogp.shape != tuple(lead) or not np.isfinite(dlogp).all():
        raise ValueError(f"loss_fn: dlogps must be finite with shape {tuple(lead)}, got shape {dlogp.shape}")
    g = dlogp.reshape(-1).astype(np.float64)                            # (N,)
    rows = kernel("distill_nb").logp_grad_rows if backend == "numba" else _logp_grad_rows

    def row_pass(z, s, e):
        return 0.0, rows(z, tok[s:e], rowmax[s:e], logsum[s:e], g[s:e], inv_t, IGNORE_INDEX)

    _, dh, dw = drive_chunks(h, weight, chunk_size, row_pass)
    return np.asarray(loss).astype(h.dtype), dh.reshape(hidden.shape), dw, info


def fused_linear_grpo_loss(hidden, weight, completion_ids, old_logps, ref_logps, advantages, mask, *,
                           temperature=1.0, chunk_size=1024, backend=None, **grpo_kwargs):
    """:func:`refimpl.rl.grpo.grpo_loss` on the log-probs of a chunked LM head (two passes).

    ``grpo_loss(logps, old_logps, ref_logps, advantages, mask, **grpo_kwargs) -> (loss, dlogps, info)``
    is called once on the full (B, T) log-probs (see :func:`fused_linear_logprob_loss`), so every
    ``loss_type`` and ``importance_sampling_level`` behaves exactly as unfused. ``temperature`` is
    the sampling temperature (logits are divided by it, as TRL does).

    Shapes: hidden (B, T, D), weight (V, D), completion_ids (B, T) -> loss (), dhidden (B, T, D),
    dweight (V, D), info.
    """
    def loss_fn(logps):
        return grpo_loss(logps, old_logps, ref_logps, advantages, mask, **grpo_kwargs)

    return fused_linear_logprob_loss(hidden, weight, completion_ids, loss_fn, temperature=temperature,
                                     chunk_size=chunk_size, backend=backend)
