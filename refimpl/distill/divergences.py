r"""The table of distillation divergences: one :class:`Divergence` entry per divergence.

Every token-level divergence between the teacher's :math:`p` and the student's :math:`q` is written
as an element-wise tensor :math:`E_{n,j}` (summing over ``j`` gives the per-position divergence)
and its partial derivatives :math:`U_{n,j} = \partial E_{n,j} / \partial\log q_{n,j}`
(:mod:`refimpl.distill._common`). An entry holds the ``terms(lq, q, lp, p, **options) -> (E, U)``
function and the divergence's own options with their defaults (``beta`` of the generalized JSD,
``alpha`` of the skew KLs, each in [0, 1]); the unfused loss
(:func:`~refimpl.distill.divergence_loss`), the fused LM head
(:func:`~refimpl.distill.fused_linear_divergence`) and GKD (:func:`~refimpl.distill.gkd_loss`,
``GKDConfig.divergence``) take any entry by name. ``kernel_rows``, optional, is a Numba twin of the
fused head's per-chunk pass for that divergence (every built-in entry has one,
:func:`refimpl.kernels.distill_nb.divergence_rows`; a registered divergence without one runs the
NumPy pass whatever ``backend`` says).

A new divergence is one :func:`register_divergence` call (or one line in :data:`DIVERGENCES`)
plus its ``terms`` function. Hinton KD (hard labels) and sequence KD (cross-entropy on teacher
tokens) are not divergences of :math:`(p, q)` and are not in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .._tables import entry_options, register_entry, table_entry
from ..backend import kernel
from ._common import check_unit, logaddexp


@dataclass(frozen=True)
class Divergence:
    """One divergence: ``terms(lq, q, lp, p, **options) -> (E, U)``, options with defaults, Numba rows."""

    name: str
    terms: Callable
    options: Mapping[str, float] = field(default_factory=dict)
    kernel_rows: Callable | None = None


def forward_kl_terms(lq, q, lp, p):
    """Element-wise forward KL :math:`p_j(\\log p_j - \\log q_j)` and its d/dlog q_j, :math:`-p_j`."""
    return p * (lp - lq), -p                                            # (N, V) each


def reverse_kl_terms(lq, q, lp, p):
    """Element-wise reverse KL :math:`q_j(\\log q_j - \\log p_j)` and its d/dlog q_j,
    :math:`q_j(\\log q_j - \\log p_j + 1)`."""
    d = lq - lp                                                         # (N, V)
    return q * d, q * (d + 1.0)                                         # (N, V) each


def gjsd_terms(lq, q, lp, p, beta):
    """Element-wise generalized JSD and its derivative with respect to :math:`\\log q_j`.

    With :math:`\\log M = \\mathrm{logaddexp}(\\log q + \\log(1-\\beta), \\log p + \\log\\beta)`,
    :math:`E_j = \\beta p_j(\\log p_j - \\log M_j) + (1-\\beta) q_j(\\log q_j - \\log M_j)` and, since the
    terms from :math:`\\partial \\log M_j` cancel, :math:`U_j = (1-\\beta) q_j (\\log q_j - \\log M_j)`.
    ``beta`` 0 and 1 are TRL's special cases, forward and reverse KL.
    """
    if beta == 0.0:
        return forward_kl_terms(lq, q, lp, p)
    if beta == 1.0:
        return reverse_kl_terms(lq, q, lp, p)
    lm = logaddexp(lq + float(np.log1p(-beta)), lp + float(np.log(beta)))  # (N, V) log M
    U = q * (lq - lm)                                                   # (N, V)
    U *= 1.0 - beta                                                     # (1 - beta) q log(q / M)
    E = p * (lp - lm)                                                   # (N, V)
    E *= beta
    E += U                                                              # beta p log(p/M) + U
    return E, U


def skew_kl_terms(lq, q, lp, p, alpha):
    """Element-wise skew forward KL :math:`p_j \\log(p_j / M_j)`, :math:`M = \\alpha p + (1-\\alpha) q`,
    and its d/dlog q_j, :math:`-(1-\\alpha) p_j q_j / M_j` (finite: at most :math:`\\min(p/(1-\\alpha), q/\\alpha)`)."""
    with np.errstate(divide="ignore"):
        la, l1a = float(np.log(alpha)), float(np.log1p(-alpha))         # -inf at the ends
    lm = logaddexp(lp + la, lq + l1a)                                   # (N, V) log M
    return p * (lp - lm), -(1.0 - alpha) * np.exp(lp + lq - lm)         # (N, V) each


def skew_reverse_kl_terms(lq, q, lp, p, alpha):
    """Element-wise skew reverse KL :math:`q_j \\log(q_j / M_j)`, :math:`M = (1-\\alpha) p + \\alpha q`,
    and its d/dlog q_j, :math:`q_j(\\log(q_j/M_j) + 1 - \\alpha q_j / M_j)`."""
    with np.errstate(divide="ignore"):
        la, l1a = float(np.log(alpha)), float(np.log1p(-alpha))
    lm = logaddexp(lp + l1a, lq + la)                                   # (N, V) log M
    d = lq - lm                                                         # (N, V)
    return q * d, q * (d + 1.0 - np.exp(la + d))                        # (N, V) each; alpha q / M <= 1


def total_variation_terms(lq, q, lp, p):
    """Element-wise total variation :math:`|p_j - q_j|/2` and its subgradient in log q_j,
    :math:`\\mathrm{sign}(q_j - p_j)\\,q_j/2` (sign(0) = 0)."""
    diff = q - p                                                        # (N, V)
    return 0.5 * np.abs(diff), 0.5 * np.sign(diff) * q                  # (N, V) each


def divergence_kernel_rows(zs, zt, valid, row_scale, inv_t, *, divergence, **options):
    """The Numba twin of the fused head's chunk pass for a built-in ``divergence``
    (:func:`refimpl.kernels.distill_nb.divergence_rows`); ``options``: its one option, if any."""
    param = next(iter(options.values()), 0.0)                          # beta or alpha
    return kernel("distill_nb").divergence_rows(zs, np.ascontiguousarray(zt), valid, row_scale, divergence, param,
                                                inv_t)


def gjsd_kernel_rows(zs, zt, valid, row_scale, inv_t, beta):
    """The Numba twin of the fused head's generalized-JSD chunk pass (:mod:`refimpl.kernels.distill_nb`)."""
    return divergence_kernel_rows(zs, zt, valid, row_scale, inv_t, divergence="generalized_jsd", beta=beta)


#: The divergences by name (TRL / paper names; ``generalized_jsd`` is GKD's, TRL's default loss).
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence("forward_kl", forward_kl_terms, {},
                             partial(divergence_kernel_rows, divergence="forward_kl")),
    "reverse_kl": Divergence("reverse_kl", reverse_kl_terms, {},
                             partial(divergence_kernel_rows, divergence="reverse_kl")),
    "generalized_jsd": Divergence("generalized_jsd", gjsd_terms, {"beta": 0.5}, gjsd_kernel_rows),
    "skew_kl": Divergence("skew_kl", skew_kl_terms, {"alpha": 0.1},
                          partial(divergence_kernel_rows, divergence="skew_kl")),
    "skew_reverse_kl": Divergence("skew_reverse_kl", skew_reverse_kl_terms, {"alpha": 0.1},
                                  partial(divergence_kernel_rows, divergence="skew_reverse_kl")),
    "total_variation": Divergence("total_variation", total_variation_terms, {},
                                  partial(divergence_kernel_rows, divergence="total_variation")),
}


def register_divergence(entry: Divergence) -> Divergence:
    """Add (or replace) a divergence; the losses, the fused head and GKD then accept its name."""
    return register_entry(DIVERGENCES, entry, Divergence)


def get_divergence(name) -> Divergence:
    """The table entry of divergence ``name`` (ValueError naming ``divergence`` otherwise)."""
    return table_entry(DIVERGENCES, name, "divergence")


def divergence_options(name, options=None) -> dict:
    """The entry's options with ``options`` applied; unknown names raise, every value must lie in [0, 1]."""
    out = entry_options(get_divergence(name).options, options, "divergence_options", f"divergence={name!r}")
    return {k: check_unit(k, v) for k, v in out.items()}
