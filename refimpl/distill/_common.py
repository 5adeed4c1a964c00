"""Machinery shared by the distillation losses: validation, temperature, masking, reductions, VJP.

Every loss in :mod:`refimpl.distill` is written the same way. Per position ``n`` it computes an
*element-wise* loss tensor :math:`E_{n,j}` whose sum over ``j`` is the per-position divergence
(``j`` runs over the vocabulary, or over the K (+1) top-k entries), and the partial derivatives
:math:`U_{n,j} = \\partial E_{n,j} / \\partial \\log q_{n,j}` treating the student log-probs as free
variables (every element depends on its own :math:`\\log q_{n,j}` only). A reduction turns ``E``
into the loss and gives each element its upstream weight :math:`g_{n,j}`; the gradient with respect
to the student logits is then the log-softmax VJP of :math:`G = g \\odot U`
(grpo-distillation reference §4):

.. math:: \\frac{\\partial L}{\\partial s_{n,k}} = \\frac{1}{\\tau}\\Big(G_{n,k} - q_{n,k}\\sum_j G_{n,j}\\Big).

Reductions (TRL ``GKDTrainer.generalized_jsd_loss`` semantics; ``valid`` = positions whose label
is not -100, all positions when ``labels`` is None):

* ``"sum"``: sum of ``E`` over valid positions and all ``j``;
* ``"batchmean"``: that sum divided by the number of valid positions when ``labels`` is given, else
  by the size of the *first* axis of the logits (torch/TRL ``batchmean``: for (B, T, V) input that
  is B, not B*T);
* ``"mean"``: the sum divided by the number of *elements*, valid positions times the width of ``E``
  (V for full-vocabulary losses), as ``tensor.mean()`` over the masked element-wise tensor in TRL;
* ``"none"``: ``E`` itself, shape (..., W), with zeros at masked positions (TRL returns
  ``E[labels != -100]``, the valid rows only, which is ``ours[labels != -100]``).

When every position is masked the scalar reductions return 0.0 with an all-zero gradient (TRL
before mid-2026 divided 0 by 0 and returned NaN). :func:`~refimpl.distill.generalized_jsd_loss`
also takes TRL's ``num_items_in_batch`` (TRL PR #6006): when given, the loss is the sum over valid
positions divided by it, whatever ``reduction`` says (the global token count under gradient
accumulation, so that micro-batch gradients add up to the full batch's).
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float, check_int, check_positive_real, check_real, check_same_dtype
from ..core.cross_entropy import IGNORE_INDEX

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def check_temperature(temperature) -> float:
    """``temperature`` as a float, or ValueError unless it is a finite number > 0."""
    return check_positive_real("temperature", temperature)


def check_unit(name: str, value) -> float:
    """``value`` as a float, or ValueError unless it lies in [0, 1]."""
    return check_real(name, value, low=0.0, high=1.0)


def check_reduction(reduction: str, allowed=REDUCTIONS) -> str:
    if reduction not in allowed:
        raise ValueError(f"reduction: expected one of {allowed}, got {reduction!r}")
    return reduction


def student_rows(student_logits) -> tuple[np.ndarray, tuple]:
    """Validate the student logits (..., V) with at least 2 dims; return the (N, V) view and (...)."""
    check_float("student_logits", student_logits, min_ndim=2)
    lead = student_logits.shape[:-1]
    return student_logits.reshape(-1, student_logits.shape[-1]), lead


def teacher_rows(teacher_logits, student_logits) -> np.ndarray:
    """Validate the teacher logits against the student's (same shape and dtype); return (N, V)."""
    check_float("teacher_logits", teacher_logits, min_ndim=2)
    check_same_dtype("teacher_logits", teacher_logits, "student_logits", student_logits)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher_logits: vocabulary size {teacher_logits.shape[-1]} does not match "
                         f"student_logits' {student_logits.shape[-1]} (the vocabularies must be the same)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {student_logits.shape} to match student_logits, "
                         f"got {teacher_logits.shape}")
    return teacher_logits.reshape(-1, teacher_logits.shape[-1])


def label_rows(labels, lead: tuple, *, vocab: int | None = None, required: bool = False,
               name: str = "labels") -> tuple[np.ndarray | None, np.ndarray]:
    """Validate ``labels`` (...) int64 with -100 for masked positions; return (flat labels, valid (N,)).

    With ``vocab`` the non-masked labels must be token ids in [0, vocab) (they are targets);
    without, they only mask. ``labels=None`` means every position is valid.
    """
    n = int(np.prod(lead))
    if labels is None:
        if required:
            raise ValueError(f"{name}: required here (target token ids, -100 where masked), got None")
        return None, np.ones(n, dtype=bool)
    labels = check_int(name, labels, low=0 if vocab else None, high=vocab, allow=IGNORE_INDEX)
    if labels.shape != tuple(lead):
        raise ValueError(f"{name}: expected shape {tuple(lead)} (the logits without the vocabulary axis), "
                         f"got {labels.shape}")
    flat = labels.reshape(-1)                                           # (N,)
    return flat, flat != IGNORE_INDEX


def log_softmax_rows(z: np.ndarray, inv_t: float) -> tuple[np.ndarray, np.ndarray]:
    """``(log q, q)`` for ``q = softmax(z / tau)`` along the last axis, stable for any finite ``z``."""
    m = z.max(axis=-1, keepdims=True)                                   # (N, 1)
    x = z - m                                                           # (N, V) max 0
    if inv_t != 1.0:
        x *= inv_t                                                      # (N, V) (z - m) / tau
    e = np.exp(x)                                                       # (N, V)
    s = e.sum(axis=-1, keepdims=True)                                   # (N, 1) in [1, V]
    x -= np.log(s)                                                      # (N, V) log q
    e /= s                                                              # (N, V) q
    return x, e


def logaddexp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``log(exp(a) + exp(b))`` as ``max(a, b) + log1p(exp(-|a - b|))`` (one of a, b finite).

    The same log-space formula as ``np.logaddexp``, written out because that ufunc is not
    vectorised and runs about 5x slower on large arrays.
    """
    m = np.maximum(a, b)                                                # (N, V)
    d = a - b                                                           # (N, V)
    np.abs(d, out=d)
    np.negative(d, out=d)
    np.exp(d, out=d)
    np.log1p(d, out=d)
    m += d
    return m


def logsoftmax_vjp(G: np.ndarray, q: np.ndarray, inv_t: float) -> np.ndarray:
    """``(G - q * sum(G)) / tau``: the gradient w.r.t. logits ``s`` of a loss with dL/dlog q = G."""
    dz = q * -G.sum(axis=-1, keepdims=True)                             # (N, V)
    dz += G
    if inv_t != 1.0:
        dz *= inv_t
    return dz


def check_num_items(num_items_in_batch) -> float | None:
    """None, or a positive finite number (TRL's gradient-accumulation token count)."""
    if num_items_in_batch is None:
        return None
    return check_positive_real("num_items_in_batch", num_items_in_batch)


def reduce(E: np.ndarray, valid: np.ndarray, lead: tuple, has_labels: bool, reduction: str,
           dloss, num_items_in_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Reduce the element-wise loss ``E`` (N, W); return (loss, g) with g the upstream weight of each
    element, shape (N, 1) for scalar reductions or (N, W) for ``"none"``.

    ``dloss`` is the upstream gradient of the returned loss (None means 1; a scalar broadcasts over
    the ``"none"`` loss).
    Masked rows of ``E`` are zeroed here, and get ``g = 0``. ``num_items_in_batch`` (TRL PR #6006,
    for gradient accumulation) makes the loss ``sum / num_items_in_batch`` whatever ``reduction``.
    """
    n, w = E.shape
    E *= valid[:, None]                                                 # (N, W) masked rows 0
    num_items = check_num_items(num_items_in_batch)
    if num_items is not None:
        reduction = "sum"
    if reduction == "none":
        loss = E.reshape(*lead, w)                                      # (..., W)
        if dloss is None or np.ndim(dloss) == 0:                        # a scalar upstream gradient: broadcast
            g = np.full((n, w), 1.0 if dloss is None else float(dloss), dtype=E.dtype)  # (N, W)
        else:
            dloss = np.asarray(dloss)
            if dloss.shape != loss.shape:
                raise ValueError(f"dloss: expected shape {loss.shape} (the 'none' loss), got {dloss.shape}")
            g = dloss.reshape(n, w).astype(E.dtype)                     # (N, W)
        return loss, g * valid[:, None]
    n_valid = int(valid.sum())
    if reduction == "sum":
        denom = 1
    elif reduction == "batchmean":
        denom = n_valid if has_labels else lead[0]
    else:  # "mean": over elements
        denom = (n_valid if has_labels else n) * w
    if num_items is not None:
        denom = num_items
    scale = 1.0 / denom if denom > 0 else 0.0                           # all masked: loss 0, grad 0
    loss = np.asarray(E.sum(dtype=np.float64) * scale).astype(E.dtype)  # ()
    if dloss is None:
        dloss = 1.0
    elif np.ndim(dloss) != 0:
        raise ValueError(f"dloss: expected a scalar for reduction {reduction!r}, got shape {np.shape(dloss)}")
    g = (float(dloss) * scale * valid[:, None]).astype(E.dtype)         # (N, 1)
    return loss, g
