"""Top-k logit distillation: the teacher sends only its K most likely tokens per position.

Shipping a full teacher distribution costs V floats per token (V ~ 1e5 for modern tokenizers);
serving systems (vLLM ``logprobs=K``) return the top-K log-probs and their token ids instead. Two
ways to compare the student with such a sparse teacher (TRL's server-side distillation trainer):

* **renormalised** (``add_tail=False``): restrict both distributions to the K ids, renormalise
  each, and take the forward KL over K entries. The gradient is zero outside the K ids.
* **tail bucket** (``add_tail=True``): keep the K probabilities as they are and add one entry for
  "everything else", :math:`1 - \\sum_k p_k` on the teacher's side and :math:`1 - \\sum_k q_{I_k}`
  on the student's, then the forward KL over K + 1 entries. Every student logit gets a gradient.

With K = V both are exactly the full forward KL(p‖q).
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float, check_int, check_integer, check_same_dtype
from ._common import (
    check_reduction,
    check_temperature,
    label_rows,
    log_softmax_rows,
    logsoftmax_vjp,
    reduce,
    student_rows,
)


def teacher_topk(teacher_logits, k, *, temperature=1.0):
    """The teacher's K most likely tokens: log-probs of ``softmax(teacher_logits / temperature)``.

    Ties are broken towards the smaller token id (stable sort), so the result is deterministic.

    Shapes: teacher_logits (..., V) -> logprobs (..., K) in decreasing order, ids (..., K) int64.
    """
    check_float("teacher_logits", teacher_logits, min_ndim=1)
    v = teacher_logits.shape[-1]
    k = check_integer("k", k, low=1, high=v)                           # at most the vocabulary size
    inv_t = 1.0 / check_temperature(temperature)
    u = teacher_logits.reshape(-1, v)                                   # (N, V)
    lp, _ = log_softmax_rows(u, inv_t)                                  # (N, V)
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]                # (N, K)
    out = np.take_along_axis(lp, ids, axis=-1)                          # (N, K)
    lead = teacher_logits.shape[:-1]
    return out.reshape(*lead, k), ids.astype(np.int64).reshape(*lead, k)


def _check_topk(teacher_topk_logprobs, teacher_topk_ids, student_logits):
    check_float("teacher_topk_logprobs", teacher_topk_logprobs, min_ndim=2)
    check_same_dtype("teacher_topk_logprobs", teacher_topk_logprobs, "student_logits", student_logits)
    v = student_logits.shape[-1]
    lead, k = teacher_topk_logprobs.shape[:-1], teacher_topk_logprobs.shape[-1]
    if lead != student_logits.shape[:-1] or not 1 <= k <= v:
        raise ValueError(f"teacher_topk_logprobs: expected shape {student_logits.shape[:-1]} + (K,) with "
                         f"1 <= K <= {v}, got {teacher_topk_logprobs.shape}")
    if (teacher_topk_logprobs > 1e-6).any():
        raise ValueError("teacher_topk_logprobs: log-probabilities must be <= 0, got a positive value")
    ids = check_int("teacher_topk_ids", teacher_topk_ids, low=0, high=v)
    if ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_ids: expected shape {teacher_topk_logprobs.shape} to match "
                         f"teacher_topk_logprobs, got {ids.shape}")
    ids = ids.reshape(-1, k)                                            # (N, K)
    if k > 1 and (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        raise ValueError("teacher_topk_ids: token ids must be distinct within a position")
    return ids, teacher_topk_logprobs.reshape(-1, k)


def topk_kl_loss(student_logits, teacher_topk_logprobs, teacher_topk_ids, labels=None, *, add_tail=False,
                 temperature=1.0, reduction="batchmean", dloss=1.0):
    r"""Forward KL against a teacher known only through its top-K log-probs and token ids.

    Let :math:`I` be the K ids, :math:`\ell^T_k` the teacher's log-probs there and
    :math:`q = \mathrm{softmax}(s/\tau)` the student's full distribution.

    **Renormalised** (``add_tail=False``): :math:`\hat p = \mathrm{softmax}(\ell^T)`,
    :math:`\hat q = \mathrm{softmax}(s_I/\tau)` over the K entries,

    .. math:: D_n = \sum_{k} \hat p_k (\log \hat p_k - \log \hat q_k), \qquad
              \frac{\partial D_n}{\partial s_{I_k}} = \frac{\hat q_k - \hat p_k}{\tau}, \quad 0 \text{ elsewhere.}

    **Tail bucket** (``add_tail=True``): :math:`p_k = e^{\ell^T_k}`, :math:`p_t = \max(0, 1 - \sum_k p_k)`,
    :math:`q_t = \sum_{j \notin I} q_j` (computed by a log-sum-exp over the complement, so it is
    accurate when tiny),

    .. math:: D_n = \sum_k p_k (\ell^T_k - \log q_{I_k}) + p_t (\log p_t - \log q_t), \qquad
              \frac{\partial D_n}{\partial s_j} = \frac{q_j - \tilde p_j}{\tau}

    where :math:`\tilde p_{I_k} = p_k` and :math:`\tilde p_j = p_t\, q_j / q_t` off :math:`I`: the
    teacher's tail mass spread like the student's own tail. With K = V the tail is empty (its term
    is 0) and both variants equal :func:`~refimpl.distill.forward_kl_loss`.

    ``teacher_topk_logprobs`` are used as given (already at the teacher's temperature, e.g. from
    :func:`teacher_topk`); ``temperature`` divides the student logits. Reductions as in
    :mod:`refimpl.distill._common`, with element width K (renormalised) or K + 1 (tail bucket,
    the tail is the last column).

    Shapes: student_logits (..., V), teacher_topk_logprobs (..., K), teacher_topk_ids (..., K) int64,
    labels (...) -> loss () or (..., K[+1]), dstudent_logits (..., V).
    """
    z, lead = student_rows(student_logits)                              # (N, V)
    ids, lt = _check_topk(teacher_topk_logprobs, teacher_topk_ids, student_logits)  # (N, K) each
    inv_t = 1.0 / check_temperature(temperature)
    check_reduction(reduction)
    _, valid = label_rows(labels, lead)                                 # (N,)
    n, v = z.shape
    k = ids.shape[-1]
    if not add_tail:
        lq, q = log_softmax_rows(np.take_along_axis(z, ids, axis=-1), inv_t)  # (N, K) each, renormalised
        lp, p = log_softmax_rows(lt, 1.0)                               # (N, K) each, renormalised
        E = p * (lp - lq)                                               # (N, K)
        loss, g = reduce(E, valid, lead, labels is not None, reduction, dloss)
        # forward: log q_hat = log_softmax(s_I / tau)   so: ds_I = (G - q_hat sum G) / tau, G = -g p_hat
        ds = np.zeros_like(z)                                           # (N, V)
        np.put_along_axis(ds, ids, logsoftmax_vjp(-g * p, q, inv_t), axis=-1)
        return loss, ds.reshape(student_logits.shape)                   # (..., V)

    lq, q = log_softmax_rows(z, inv_t)                                  # (N, V) each
    lq_top = np.take_along_axis(lq, ids, axis=-1)                       # (N, K)
    p_top = np.exp(lt)                                                  # (N, K)
    has_tail = k < v
    if has_tail:
        off = lq.copy()                                                 # (N, V)
        np.put_along_axis(off, ids, -np.inf, axis=-1)
        m = off.max(axis=-1, keepdims=True)                             # (N, 1) finite: K < V
        lq_tail = m[:, 0] + np.log(np.exp(off - m).sum(axis=-1))        # (N,) log q_t
        p_tail = np.maximum(1.0 - p_top.sum(axis=-1), 0.0)              # (N,)
    else:                                                               # K = V: no tail entries
        lq_tail = np.zeros(n, dtype=z.dtype)                            # (N,) unused
        p_tail = np.zeros(n, dtype=z.dtype)                             # (N,)
    lp_tail = np.log(np.where(p_tail > 0, p_tail, 1.0))                 # (N,) 0 where p_t = 0 (0 log 0 = 0)
    e_tail = p_tail * (lp_tail - lq_tail)                               # (N,)
    E = np.concatenate([p_top * (lt - lq_top), e_tail[:, None]], axis=-1).astype(z.dtype)  # (N, K+1)
    loss, g = reduce(E, valid, lead, labels is not None, reduction, dloss)
    g = np.broadcast_to(g, E.shape)                                     # (N, K+1)
    # forward: E_k = p_k (l_k - log q_{I_k}), E_t = p_t (log p_t - log q_t), q_t = sum_{j not in I} q_j
    # so with log q free: G_{I_k} = -g_k p_k, G_j = -g_t p_t q_j / q_t off I; then the log-softmax VJP
    G = np.zeros_like(z)                                                # (N, V)
    if has_tail:
        G = -(g[:, -1] * p_tail)[:, None] * np.exp(off - lq_tail[:, None])  # (N, V) 0 on I (off = -inf)
    np.put_along_axis(G, ids, -g[:, :k] * p_top, axis=-1)
    ds = logsoftmax_vjp(G, q, inv_t)                                    # (N, V)
    return loss, ds.reshape(student_logits.shape).astype(z.dtype)       # (..., V)
