"""Next-token cross-entropy over a vocabulary, with an ignore index.

Pre-training, SFT and sequence-level distillation all minimise
:math:`-\\log p(y_t \\mid y_{<t})` averaged over the target tokens; positions labelled
``ignore_index`` (-100, the PyTorch / HF convention for padding and prompt tokens) contribute
nothing. The computation is fused: the loss is ``logsumexp(z) - z[target]`` per row, and the
gradient with respect to the logits is ``softmax(z) - onehot(target)``, so no (N, V) log-prob
matrix needs to be kept. A Numba twin (:mod:`refimpl.kernels.cross_entropy_nb`) reads each row
from memory once (online log-sum-exp over cache-sized blocks) and gives the loss and its gradient
in one sweep.

Like every loss in refimpl, :func:`cross_entropy` is one call returning ``(loss, dlogits)``;
the model's training loss (:func:`refimpl.model.loss_forward`), sequence-level KD
(:func:`refimpl.distill.sequence_kd_loss`) and the fused LM head
(:func:`refimpl.distill.fused_linear_cross_entropy`) compute this same loss.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_int, check_upstream
from ..backend import kernel, resolve_backend

REDUCTIONS = ("mean", "sum", "none")


#: The ValueError of non-finite logits (:func:`refimpl._validate.check_float`'s, raised by the numba path too).
NONFINITE_LOGITS = "logits: contains NaN or inf"

#: The target id that marks a position without loss (prompt, padding): PyTorch's and HF's -100.
IGNORE_INDEX = -100


class CEGrad(NamedTuple):
    """A cross-entropy term's gradient, made in the forward pass (:func:`refimpl.core.cross_entropy`)."""

    dlogits: np.ndarray | None  # (..., V) at dloss = 1 (None when the forward ran with grad=False)
    n_valid: int                # non-ignored targets: the normaliser of its mean


def cross_entropy(logits, targets, dloss=1.0, *, ignore_index=IGNORE_INDEX, reduction="mean", backend=None,
                  grad=True):
    r"""Softmax cross-entropy, matching ``torch.nn.functional.cross_entropy``, and its gradient.

    .. math:: \ell_t = \log\sum_v e^{z_{t,v}} - z_{t,y_t}, \qquad
              L = \frac{1}{|\mathcal{T}|}\sum_{t\in\mathcal{T}} \ell_t, \qquad
              \frac{\partial L}{\partial z_t} = c_t\,(\mathrm{softmax}(z_t) - e_{y_t})

    where :math:`\mathcal{T}` is the set of positions whose target is not ``ignore_index`` and
    :math:`c_t` is ``dloss / |T|`` (``"mean"``), ``dloss`` (``"sum"``) or ``dloss[t]`` (``"none"``);
    ignored rows get zero gradient.

    ``reduction``: ``"mean"`` over non-ignored positions (as torch; when every position is ignored
    refimpl returns 0.0 where torch returns NaN), ``"sum"``, or ``"none"`` (per-position losses,
    0 at ignored positions). ``dloss``: the upstream gradient, a scalar, or shaped like ``targets``
    for ``"none"``. ``grad=False`` skips the gradient (evaluation) and returns ``(loss, None)``.

    The row scales :math:`c_t` need only ``dloss`` and the number of non-ignored targets, both known
    before the logits are read, so the Numba twin produces loss and gradient in one sweep over the
    logits; the NumPy version computes the loss, then the gradient in the buffer of the shifted
    logits, from the per-row log-sum-exp.

    Shapes: logits (..., V), targets (...) int64 -> loss () or (...), dlogits (..., V) or None.
    """
    backend = resolve_backend(backend, work=np.size(logits))
    # the numba twin tests finiteness in its own pass over the logits (raises below, same message)
    targets = _check_inputs(logits, targets, ignore_index, reduction, scan=backend == "numpy")
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])                            # (N, V)
    t = targets.reshape(-1)                                             # (N,)
    valid = t != ignore_index                                           # (N,)
    n_valid = int(valid.sum())
    row_scale = _row_scale(_check_dloss(dloss, lead, reduction), valid, reduction, n_valid) if grad else None  # (N,)
    if backend == "numba":
        z = np.ascontiguousarray(z)
        finite = np.empty(z.shape[0], dtype=bool)                       # (N,) filled by the kernel
        if grad:                                                        # loss and gradient in one sweep
            per_row, dz = kernel("cross_entropy_nb").ce_loss_grad_rows(z, t, row_scale, 1.0, ignore_index,
                                                                       np.empty_like(z), finite)  # (N,), (N, V)
        else:
            logp, _, _ = kernel("cross_entropy_nb").logp_rows(z, t, 1.0, ignore_index, finite)  # (N,)
            per_row, dz = -logp, None
        if not finite.all():
            raise ValueError(NONFINITE_LOGITS)
        loss = _reduce(per_row, reduction, n_valid, lead, logits.dtype)
        return loss, None if dz is None else dz.reshape(logits.shape)
    m = z.max(axis=-1)                                                  # (N,)
    zs = z - m[:, None]                                                 # (N, V) shifted, max 0
    log_s = np.log(np.sum(np.exp(zs), axis=-1)).astype(np.float64)      # (N,)
    lse = m.astype(np.float64) + log_s                                  # (N,)
    t_safe = np.where(valid, t, 0)                                      # (N,)
    zs_t = np.take_along_axis(zs, t_safe[:, None], axis=-1)[:, 0]      # (N,)
    # loss = lse - z_t = log_s - (z_t - m): no cancellation between two large numbers
    per_row = np.where(valid, log_s - zs_t, 0.0)                        # (N,)
    loss = _reduce(per_row, reduction, n_valid, lead, logits.dtype)
    if not grad:
        return loss, None
    # forward: loss_t = lse(z_t) - z_t[y_t]   so: dz_t = c_t * (softmax(z_t) - onehot(y_t))
    dz = zs                                                             # (N, V) z - m, reused in place
    dz -= (lse - m).astype(z.dtype)[:, None]
    np.exp(dz, out=dz)                                                  # (N, V) softmax
    dz *= row_scale.astype(z.dtype)[:, None]                            # (N, V)
    rows = np.nonzero(valid)[0]                                         # (n_valid,)
    dz[rows, t[rows]] -= row_scale[rows].astype(z.dtype)
    return loss, dz.reshape(logits.shape)                               # (..., V)


def _check_dloss(dloss, lead, reduction):
    return np.asarray(check_upstream("dloss", dloss, lead if reduction == "none" else ()), dtype=np.float64)


def _check_inputs(logits, targets, ignore_index, reduction, scan=True):
    """Validate the logits, the targets (ids in [0, V) or ``ignore_index``) and ``reduction``.

    ``scan=False``: the logits' values are not read here (the caller's kernel tests finiteness).
    """
    check_float("logits", logits, min_ndim=1, scan=scan)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    targets = check_int("targets", targets, low=0, high=logits.shape[-1], allow=ignore_index)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {logits.shape[:-1]} (logits without the vocab axis), "
                         f"got {targets.shape}")
    return targets


def _reduce(per_row, reduction, n_valid, lead, dtype):
    if reduction == "none":
        loss = per_row.reshape(lead)                                    # (...)
    elif reduction == "sum":
        loss = np.asarray(per_row.sum())
    else:
        loss = np.asarray(per_row.sum() / max(n_valid, 1))
    return loss.astype(dtype)


def _row_scale(dloss, valid, reduction, n_valid):
    """c_t of :func:`cross_entropy`'s gradient (N,) float64: the upstream gradient each row's loss gets."""
    dloss = np.asarray(dloss, dtype=np.float64)
    if reduction == "none":
        return dloss.reshape(-1) * valid                                # (N,)
    if reduction == "sum":
        return np.full(valid.shape, float(dloss)) * valid               # (N,)
    return np.full(valid.shape, float(dloss) / max(n_valid, 1)) * valid  # (N,)
