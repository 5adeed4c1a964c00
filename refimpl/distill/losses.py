"""Token-level distillation losses over the full vocabulary, each with its hand-derived gradient.

A teacher's next-token distribution :math:`p = \\mathrm{softmax}(u/\\tau)` carries far more signal
per token than the one sampled token: the "dark knowledge" of which wrong answers are nearly
right (Hinton et al. 2015, §2). Each loss here measures how far the student's
:math:`q = \\mathrm{softmax}(s/\\tau)` is from it, position by position. Forward KL(p‖q) makes the
student cover every mode of the teacher; reverse KL(q‖p) lets it pick one mode and be sharp there;
the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024) interpolates with ``beta``;
DistiLLM's skew KLs (Ko et al. 2024) mix a little of one distribution into the other to keep the
gradient bounded; total variation is bounded by 1. Sequence-level KD (Kim & Rush 2016, §3), plain
cross-entropy on teacher-generated tokens, is what DeepSeek-R1's distilled students were trained
with (R1 §2.4).

Every function has the signature ``loss_fn(student_logits, teacher_logits, labels=None, *, ...,
temperature=1.0, reduction="batchmean", dloss=1.0) -> (loss, dstudent_logits)``: the gradient
with respect to the student logits is returned with the loss (the teacher gets none), multiplied
by the upstream gradient ``dloss`` (a scalar; for ``reduction="none"`` also an array shaped like
the loss). The divergences of :data:`~refimpl.distill.divergences.DIVERGENCES` all go through
:func:`divergence_loss`. Option names follow TRL's ``GKDConfig`` (``beta``, ``temperature``).
Masking, reductions and the shared gradient formula are described in
:mod:`refimpl.distill._common`.
"""

from __future__ import annotations

import numpy as np

from ..core.cross_entropy import cross_entropy
from ._common import (
    check_reduction,
    check_temperature,
    check_unit,
    label_rows,
    log_softmax_rows,
    logsoftmax_vjp,
    reduce,
    student_rows,
    teacher_rows,
)
from .divergences import divergence_options, forward_kl_terms, get_divergence


def _pair(student_logits, teacher_logits, labels, temperature, reduction):
    """Validate and prepare (log q, q, log p, p, valid, lead, inv_t) for a student/teacher loss."""
    z, lead = student_rows(student_logits)                              # (N, V)
    u = teacher_rows(teacher_logits, student_logits)                    # (N, V)
    inv_t = 1.0 / check_temperature(temperature)
    check_reduction(reduction)
    _, valid = label_rows(labels, lead)                                 # (N,)
    lq, q = log_softmax_rows(z, inv_t)                                  # (N, V) each
    lp, p = log_softmax_rows(u, inv_t)                                  # (N, V) each
    return lq, q, lp, p, valid, lead, inv_t


def _finish(E, U, q, inv_t, valid, lead, labels, reduction, dloss, shape, num_items_in_batch=None):
    """Reduce E, then dL/ds = VJP of G = g * U through log_softmax(s / tau)."""
    loss, g = reduce(E, valid, lead, labels is not None, reduction, dloss, num_items_in_batch)
    ds = logsoftmax_vjp(g * U, q, inv_t)                                # (N, V)
    return loss, ds.reshape(shape)                                      # (..., V)


def divergence_loss(student_logits, teacher_logits, labels=None, *, divergence="generalized_jsd", temperature=1.0,
                    reduction="batchmean", num_items_in_batch=None, dloss=1.0, **options):
    r"""Any divergence of the table :data:`~refimpl.distill.divergences.DIVERGENCES`, by name, and its gradient.

    :math:`D_n = \sum_j E_{n,j}` with ``E, U = terms(log q, q, log p, p, **options)`` of the entry,
    reduced as described in :mod:`refimpl.distill._common`, and
    :math:`\partial L/\partial s = \mathrm{VJP}_{\log\mathrm{softmax}(s/\tau)}(g\,U)`. ``options`` are
    the entry's (``beta`` for ``generalized_jsd``, ``alpha`` for the skew KLs); the named losses
    below are this function with their entry.

    Shapes: student_logits, teacher_logits (..., V), labels (...) -> loss () or (..., V) for
    ``"none"``, dstudent_logits (..., V).
    """
    entry = get_divergence(divergence)
    opts = divergence_options(divergence, options)
    lq, q, lp, p, valid, lead, inv_t = _pair(student_logits, teacher_logits, labels, temperature, reduction)
    E, U = entry.terms(lq, q, lp, p, **opts)                            # (N, V) each
    return _finish(E, U, q, inv_t, valid, lead, labels, reduction, dloss, student_logits.shape,
                   num_items_in_batch)


def forward_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, reduction="batchmean",
                    dloss=1.0):
    r"""Forward KL, teacher to student (mode covering; Hinton et al. 2015 §2; GKD §2).

    .. math:: D_n = \mathrm{KL}(p_n \,\|\, q_n) = \sum_j p_{n,j}(\log p_{n,j} - \log q_{n,j}),
              \qquad \frac{\partial D_n}{\partial s_{n,k}} = \frac{q_{n,k} - p_{n,k}}{\tau}

    Equals ``generalized_jsd_loss(..., beta=0)`` and ``F.kl_div(log_q, log_p, log_target=True)``.
    No :math:`\tau^2` factor (see :func:`hinton_kd_loss` for that).

    Shapes: student_logits, teacher_logits (..., V), labels (...) -> loss () or (..., V) for
    ``"none"``, dstudent_logits (..., V).
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="forward_kl", temperature=temperature,
                           reduction=reduction, dloss=dloss)


def reverse_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, reduction="batchmean",
                    dloss=1.0):
    r"""Reverse KL, student to teacher (mode seeking; GKD §2, MiniLLM §2).

    .. math:: D_n = \mathrm{KL}(q_n \,\|\, p_n), \qquad
              \frac{\partial D_n}{\partial s_{n,k}} = \frac{q_{n,k}\,[(\log q_{n,k} - \log p_{n,k}) - D_n]}{\tau}

    Equals ``generalized_jsd_loss(..., beta=1)``.

    Shapes: as :func:`forward_kl_loss`.
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="reverse_kl", temperature=temperature,
                           reduction=reduction, dloss=dloss)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None, dloss=1.0):
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), TRL's convention.

    With the mixture :math:`M = \beta p + (1-\beta) q` (``beta`` weights the **teacher**),

    .. math:: D_n = \beta\,\mathrm{KL}(p_n \| M_n) + (1-\beta)\,\mathrm{KL}(q_n \| M_n), \qquad
              \frac{\partial D_n}{\partial s_{n,k}} = \frac{(1-\beta)\, q_{n,k}
              \,[\log(q_{n,k}/M_{n,k}) - \mathrm{KL}(q_n \| M_n)]}{\tau}

    computed in log space (:math:`\log M` by ``logaddexp``). ``beta=0.5`` is the symmetric JSD,
    at most :math:`\ln 2` per position. As in TRL, ``beta=0`` is *defined* as forward KL(p‖q) and
    ``beta=1`` as reverse KL(q‖p). The interior formula tends to 0 at both ends
    (:math:`D \approx \beta\,\mathrm{KL}(p\|q)` as :math:`\beta \to 0`), so the loss jumps at the
    endpoints; this is TRL's behaviour, kept for parity.

    Parameters
    ----------
    student_logits, teacher_logits : ndarray (..., V)
        Same shape and dtype (float32 or float64); a vocabulary mismatch is a ValueError.
    labels : int ndarray (...), optional
        -100 marks positions that do not count (prompt, padding); other values only unmask.
    beta : float in [0, 1]
    temperature : float > 0
        Both logits are divided by it (TRL's ``GKDTrainer`` itself calls this loss with 1.0).
    reduction : {"batchmean", "sum", "mean", "none"}
        See :mod:`refimpl.distill._common`; all masked gives 0.0, never NaN.
    num_items_in_batch : float > 0, optional
        TRL's gradient-accumulation normaliser: if given, the loss is the sum over valid positions
        divided by it, whatever ``reduction`` is.
    dloss : float or ndarray, optional
        Upstream gradient of the loss (default 1, or ones for ``"none"``).

    Returns
    -------
    loss : ndarray, () or (..., V) for ``"none"``
    dstudent_logits : ndarray (..., V)
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="generalized_jsd", beta=beta,
                           temperature=temperature, reduction=reduction, num_items_in_batch=num_items_in_batch,
                           dloss=dloss)


def skew_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
                 reduction="batchmean", dloss=1.0):
    r"""Skew forward KL of DistiLLM (Ko et al. 2024, §3.1), skew coefficient ``alpha``.

    .. math:: D_n = \mathrm{KL}\big(p_n \,\|\, \alpha p_n + (1-\alpha) q_n\big), \qquad
              \frac{\partial D_n}{\partial s_{n,k}}
              = -\frac{(1-\alpha)\, q_{n,k}\,[v_{n,k} - \sum_j q_{n,j} v_{n,j}]}{\tau},
              \quad v = p / M

    ``alpha=0`` is forward KL, ``alpha=1`` is identically 0. This is the KL itself; DistiLLM's code
    returns the cross-entropy form :math:`-\sum_j p_j \log M_j`, which differs by the teacher's
    entropy (a constant: same gradient).

    Shapes: as :func:`forward_kl_loss`.
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="skew_kl", alpha=alpha,
                           temperature=temperature, reduction=reduction, dloss=dloss)


def skew_reverse_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
                         reduction="batchmean", dloss=1.0):
    r"""Skew reverse KL of DistiLLM (Ko et al. 2024, §3.1).

    .. math:: D_n = \mathrm{KL}\big(q_n \,\|\, (1-\alpha) p_n + \alpha q_n\big), \qquad
              \frac{\partial D_n}{\partial s_{n,k}}
              = \frac{q_{n,k}\,[w_{n,k} - \sum_j q_{n,j} w_{n,j}]}{\tau},
              \quad w = \log(q/M) - \alpha q / M

    ``alpha=0`` is reverse KL, ``alpha=1`` is identically 0.

    Shapes: as :func:`forward_kl_loss`.
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="skew_reverse_kl", alpha=alpha,
                           temperature=temperature, reduction=reduction, dloss=dloss)


def total_variation_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, reduction="batchmean",
                         dloss=1.0):
    r"""Total variation distance (used for KD by Wen et al. 2023, f-DISTILL, arXiv 2307.15190).

    .. math:: D_n = \tfrac12 \sum_j |p_{n,j} - q_{n,j}| \in [0, 1], \qquad
              \frac{\partial D_n}{\partial s_{n,k}}
              = \frac{q_{n,k}\,[\sigma_{n,k} - \sum_j q_{n,j}\sigma_{n,j}]}{2\tau},
              \quad \sigma = \mathrm{sign}(q - p)

    Not differentiable where some :math:`q_j = p_j`; there the subgradient with
    :math:`\mathrm{sign}(0) = 0` is returned (so the gradient is exactly 0 at student = teacher).

    Shapes: as :func:`forward_kl_loss`.
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="total_variation",
                           temperature=temperature, reduction=reduction, dloss=dloss)


def hinton_kd_loss(student_logits, teacher_logits, labels=None, *, alpha=0.5, temperature=1.0,
                   scale_by_t2=True, reduction="batchmean", dloss=1.0):
    r"""Hinton knowledge distillation: hard-label cross-entropy plus soft-target KL (Hinton et al. 2015, §2).

    .. math:: D_n = (1-\alpha)\,[-\log \mathrm{softmax}(s_n)_{y_n}]
              + \alpha\, c\, \mathrm{KL}(p^\tau_n \,\|\, q^\tau_n), \qquad c = \tau^2 \text{ or } 1

    .. math:: \frac{\partial D_n}{\partial s_n} = (1-\alpha)(\mathrm{softmax}(s_n) - e_{y_n})
              + \alpha\, c\, \frac{q^\tau_n - p^\tau_n}{\tau}

    The hard term uses the un-tempered student logits (as Liger's chunked distillation loss does).
    The soft gradient scales as :math:`1/\tau`, so Hinton multiplies the soft term by
    :math:`\tau^2` (``scale_by_t2=True``) to keep its size independent of :math:`\tau`; TRL and Liger
    do not (``scale_by_t2=False``). ``labels`` are the hard targets (-100 masked) and are required
    unless ``alpha == 1``. Element-wise (``"none"``) the hard term sits at the target's column.

    Shapes: as :func:`forward_kl_loss`.
    """
    alpha = check_unit("alpha", alpha)
    lq, q, lp, p, valid, lead, inv_t = _pair(student_logits, teacher_logits, None, temperature, reduction)
    flat, valid = label_rows(labels, lead, vocab=q.shape[-1], required=alpha < 1.0)  # (N,)
    c = alpha * (1.0 / inv_t) ** 2 if scale_by_t2 else alpha
    E, U = forward_kl_terms(lq, q, lp, p)                               # (N, V) each
    E *= c
    hard = np.zeros_like(q)                                             # (N, V) one-hot of valid targets
    if flat is not None:
        rows = np.nonzero(valid)[0]                                     # (n_valid,)
        hard[rows, flat[rows]] = 1.0
    lq1, q1 = log_softmax_rows(student_rows(student_logits)[0], 1.0)    # (N, V) each, tau = 1
    E -= (1.0 - alpha) * hard * lq1                                     # (N, V)
    loss, g = reduce(E, valid, lead, labels is not None, reduction, dloss)
    # forward: E = c * p (log p - log q^tau) - (1 - alpha) onehot * log q^1: one VJP per temperature
    ds = logsoftmax_vjp(g * (c * U), q, inv_t)                          # (N, V)
    ds += logsoftmax_vjp(g * (-(1.0 - alpha) * hard), q1, 1.0)          # (N, V)
    return loss, ds.reshape(student_logits.shape)                       # (..., V)


def sequence_kd_loss(student_logits, labels, *, temperature=1.0, reduction="batchmean", dloss=1.0, backend=None):
    r"""Sequence-level KD (Kim & Rush 2016, §3): cross-entropy on tokens the teacher generated.

    .. math:: D_n = -\log q_{n, y_n}, \qquad \frac{\partial D_n}{\partial s_n} = \frac{q_n - e_{y_n}}{\tau}

    ``labels`` hold the teacher's sampled (or beam) tokens, -100 where masked; this is the SFT
    objective DeepSeek-R1's distilled students were trained with (R1 §2.4). It is
    :func:`refimpl.core.cross_entropy` on ``student_logits / temperature``, with the reductions
    named as for the other distillation losses (:mod:`refimpl.distill._common`): the default
    ``"batchmean"`` divides by the valid positions, which is ``core.cross_entropy``'s (and
    ``F.cross_entropy``'s) ``"mean"``; ``"sum"`` is the same in both; ``"mean"`` here is the mean
    over the elements of the (valid positions x V) element-wise loss, as for every divergence.
    Element-wise (``"none"``) the loss sits at the label's column (sum the last axis for per-token
    NLL), and ``dloss`` is then a scalar or shaped like that (..., V) loss.

    Shapes: student_logits (..., V), labels (...) -> loss () or (..., V), dstudent_logits (..., V).
    """
    z, lead = student_rows(student_logits)                              # (N, V)
    inv_t = 1.0 / check_temperature(temperature)
    check_reduction(reduction)
    flat, valid = label_rows(labels, lead, vocab=z.shape[-1], required=True)  # (N,)
    v, n_valid = z.shape[-1], int(valid.sum())
    dloss = 1.0 if dloss is None else dloss                             # None: 1, as the other losses
    zt = z if inv_t == 1.0 else z * z.dtype.type(inv_t)                 # (N, V) logits / tau
    if reduction == "none":
        g = np.broadcast_to(np.asarray(dloss, dtype=np.float64), z.shape) if np.ndim(dloss) == 0 else (
            np.asarray(dloss, dtype=np.float64))
        if g.shape != z.shape and g.shape != student_logits.shape:
            raise ValueError(f"dloss: expected shape {student_logits.shape} (the 'none' loss), got {g.shape}")
        g = g.reshape(z.shape)                                          # (N, V)
        # only the label's column of the element-wise loss depends on s: its upstream gradient
        row_g = np.where(valid, g[np.arange(len(flat)), np.where(valid, flat, 0)], 0.0)  # (N,)
        per_row, dz = cross_entropy(zt, flat, row_g, reduction="none", backend=backend)  # (N,), (N, V)
        loss = np.zeros_like(z)                                         # (N, V)
        rows = np.nonzero(valid)[0]                                     # (n_valid,)
        loss[rows, flat[rows]] = per_row[rows]
        loss = loss.reshape(student_logits.shape)                       # (..., V)
    else:
        # "batchmean" = core's "mean"; "sum" = core's "sum"; "mean" = sum / (n_valid V)
        per_elem = {"batchmean": 1.0, "sum": 1.0, "mean": 1.0 / (n_valid * v) if n_valid else 0.0}[reduction]
        if np.ndim(dloss) != 0:
            raise ValueError(f"dloss: expected a scalar for reduction {reduction!r}, got shape {np.shape(dloss)}")
        core_red = "mean" if reduction == "batchmean" else "sum"
        loss, dz = cross_entropy(zt, flat, float(dloss) * per_elem, reduction=core_red, backend=backend)  # (), (N, V)
        if reduction == "mean":
            loss = np.asarray(loss * per_elem).astype(z.dtype)
    if inv_t != 1.0:
        dz = dz * dz.dtype.type(inv_t)                                  # (N, V) d(z / tau)/dz = 1 / tau
    return loss, dz.reshape(student_logits.shape)                       # (..., V)
