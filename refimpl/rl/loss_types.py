r"""The table of GRPO ``loss_type`` variants: one :class:`LossType` entry per variant.

Every variant of :func:`refimpl.rl.grpo_loss` is :math:`J = \sum_{i,t} W_{i,t} L_{i,t}` with a
per-token surrogate :math:`L` of the importance ratio :math:`\rho` and the advantage :math:`\hat A`,
and aggregation weights :math:`W` (see :mod:`refimpl.rl.grpo` for the formulas and their sources).
An entry holds exactly what one variant decides:

* ``surrogate(ratio, A, logps, opts) -> (L, dL/drho, dL/dlogps or None)``: the per-token objective,
  its derivative through the ratio, and any derivative that bypasses the ratio (CISPO's);
* ``weights(mask, max_completion_length, num_items_in_batch) -> (W, normaliser)``;
* ``items_normalised``: whether ``num_items_in_batch`` also normalises TRL's entropy bonus;
* ``diagnostics(ratio, A, opts, frac) -> dict``: the variant's ``info`` entries (clip fractions);
* ``options``: the variant's own options with their defaults (e.g. SAPO's temperatures), passed
  as keyword arguments to :func:`~refimpl.rl.grpo_loss` or as ``GRPOConfig.loss_options``.

``opts`` holds ``epsilon_low``, ``epsilon_high`` and ``delta`` (the shared TRL options) and the
entry's own options. A new variant is one :func:`register_loss_type` call (or one line in
:data:`LOSS_TABLE`) plus its functions; the loss, the entropy bonus, the V3.2 loss and the trainer
read the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .._tables import entry_options, register_entry, table_entry
from .._validate import check_integer, check_positive_real


@dataclass(frozen=True)
class LossType:
    """One GRPO-family ``loss_type``: its surrogate, aggregation weights, diagnostics and options."""

    name: str
    surrogate: Callable
    weights: Callable
    items_normalised: bool = False
    diagnostics: Callable | None = None
    options: Mapping[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Aggregation weights W (B, T) and the scalar normaliser, TRL's single-process values
# ----------------------------------------------------------------------------------------------

def sequence_mean_weights(m, max_completion_length=None, num_items_in_batch=None):
    """``grpo``, ``sapo``: W = m / (B max(n_i, 1)), a mean per completion, then over completions."""
    B = m.shape[0]
    mf = m.astype(np.float64)                                           # (B, T)
    n = mf.sum(axis=1, keepdims=True)                                   # (B, 1)
    return mf / (B * np.maximum(n, 1.0)), float(B)                      # (B, T)


def token_mean_weights(m, max_completion_length=None, num_items_in_batch=None):
    """``bnpo``: W = m / max(N, 1), N the active tokens of this batch."""
    mf = m.astype(np.float64)                                           # (B, T)
    norm = max(float(mf.sum()), 1.0)
    return mf / norm, norm                                              # (B, T)


def constant_weights(m, max_completion_length=None, num_items_in_batch=None):
    """``dr_grpo``: W = m / (B L_max), a constant normaliser (Dr. GRPO §3.1)."""
    B, T = m.shape
    if max_completion_length is None:
        raise ValueError("max_completion_length: required for loss_type='dr_grpo' (normaliser B * L_max)")
    check_integer("max_completion_length", max_completion_length, low=max(T, 1))   # >= the completion length T
    mf = m.astype(np.float64)                                           # (B, T)
    norm = float(B * max_completion_length)
    return mf / norm, norm                                              # (B, T)


def items_weights(m, max_completion_length=None, num_items_in_batch=None):
    """``dapo``, ``cispo``: W = m / max(N_items, 1), N_items TRL's ``num_items_in_batch`` (default N)."""
    mf = m.astype(np.float64)                                           # (B, T)
    norm = max(float(mf.sum() if num_items_in_batch is None else num_items_in_batch), 1.0)
    return mf / norm, norm                                              # (B, T)


# ----------------------------------------------------------------------------------------------
# Per-token surrogates: (L, dL/drho, dL/dlogps not through rho or None)
# ----------------------------------------------------------------------------------------------

def min_clip(ratio, A, lo, hi, delta):
    """-min(r1 A, clip(ratio) A) with r1 = min(ratio, delta); returns (L, dL/dratio), PyTorch tie rules."""
    r1 = ratio if delta is None else np.minimum(ratio, delta)           # (B, T|1)
    dr1 = np.ones_like(ratio) if delta is None else (ratio <= delta).astype(ratio.dtype)  # (B, T|1)
    r2 = np.clip(ratio, lo, hi)                                         # (B, T|1)
    dr2 = ((ratio >= lo) & (ratio <= hi)).astype(ratio.dtype)           # (B, T|1)
    with np.errstate(invalid="ignore"):   # inf * 0: an overflowed ratio with A = 0 contributes 0
        b1 = np.where(A == 0, 0.0, r1 * A)                              # (B, T)
    b2 = r2 * A                                                         # (B, T)
    w1 = np.where(b1 < b2, 1.0, np.where(b1 == b2, 0.5, 0.0))           # (B, T) torch.min's split
    loss = -np.minimum(b1, b2)                                          # (B, T)
    # forward: L = -min(b1, b2), b1 = min(rho, delta) A, b2 = clip(rho) A
    # so: dL/drho = -A (w1 dr1 + (1 - w1) dr2)
    dldr = -A * (w1 * dr1 + (1.0 - w1) * dr2)                           # (B, T)
    return loss, dldr


def clipped_surrogate(ratio, A, logps, opts):
    """PPO's clipped surrogate (DeepSeekMath eq. 3) with INTELLECT-2's ``delta``: see :func:`min_clip`."""
    pg, dldr = min_clip(ratio, A, 1.0 - opts["epsilon_low"], 1.0 + opts["epsilon_high"], opts["delta"])
    return pg, dldr, None


def cispo_surrogate(ratio, A, logps, opts):
    """CISPO (MiniMax-M1): L = -sg[min(rho, eps_hi)] A l; the gradient bypasses the ratio."""
    c = np.minimum(ratio, opts["epsilon_high"])                         # (B, T|1) detached
    pg = -c * A * logps                                                 # (B, T)
    # forward: L = -sg[min(rho, eps_hi)] A l      so: dL/dl = -c A, nothing through rho
    return pg, np.zeros(logps.shape), -c * A                            # (B, T) each


def sapo_surrogate(ratio, A, logps, opts):
    """SAPO: L = -A (4/tau) sigmoid(tau (rho - 1)), tau = tau_pos if A > 0 else tau_neg."""
    tau_s = np.where(A > 0, opts["sapo_temperature_pos"], opts["sapo_temperature_neg"])  # (B, T)
    sig = 1.0 / (1.0 + np.exp(-np.clip(tau_s * (ratio - 1.0), -700, 700)))  # (B, T)
    pg = -A * (4.0 / tau_s) * sig                                       # (B, T)
    # forward: L = -A (4/tau) sigmoid(tau (rho - 1))   so: dL/drho = -4 A sigmoid (1 - sigmoid)
    return pg, -4.0 * A * sig * (1.0 - sig), None                       # (B, T) each


def clip_diagnostics(ratio, A, opts, frac):
    """TRL's clip fractions of the clipped family (``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``)."""
    low = (ratio < 1.0 - opts["epsilon_low"]) & (A < 0)                 # (B, T|1)
    high = (ratio > 1.0 + opts["epsilon_high"]) & (A > 0)               # (B, T|1)
    return {"clip_ratio/low_mean": frac(low), "clip_ratio/high_mean": frac(high),
            "clip_ratio/region_mean": frac(low | high)}


def cispo_diagnostics(ratio, A, opts, frac):
    """The fraction of tokens whose CISPO weight is capped (``cispo_clip_ratio``)."""
    return {"cispo_clip_ratio": frac((ratio > opts["epsilon_high"]) & (A > 0))}


#: The GRPO-family variants by ``loss_type`` name (TRL's names).
LOSS_TABLE: dict[str, LossType] = {
    "grpo": LossType("grpo", clipped_surrogate, sequence_mean_weights, diagnostics=clip_diagnostics),
    "bnpo": LossType("bnpo", clipped_surrogate, token_mean_weights, diagnostics=clip_diagnostics),
    "dr_grpo": LossType("dr_grpo", clipped_surrogate, constant_weights, diagnostics=clip_diagnostics),
    "dapo": LossType("dapo", clipped_surrogate, items_weights, True, clip_diagnostics),
    "cispo": LossType("cispo", cispo_surrogate, items_weights, True, cispo_diagnostics),
    "sapo": LossType("sapo", sapo_surrogate, sequence_mean_weights,
                     options={"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}),
}


def register_loss_type(entry: LossType) -> LossType:
    """Add (or replace) a ``loss_type``; :func:`~refimpl.rl.grpo_loss` and the trainer then accept it."""
    return register_entry(LOSS_TABLE, entry, LossType)


def get_loss_type(name) -> LossType:
    """The table entry of ``loss_type`` ``name`` (ValueError naming ``loss_type`` otherwise)."""
    return table_entry(LOSS_TABLE, name, "loss_type")


def loss_options(name, options=None) -> dict:
    """The entry's options with ``options`` applied: unknown names raise, values must be finite > 0."""
    out = entry_options(get_loss_type(name).options, options, "loss_options", f"loss_type={name!r}")
    for key, x in out.items():
        out[key] = check_positive_real(key, x)
    return out
