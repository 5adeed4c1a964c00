r"""DeepSeek-V3.2's GRPO changes for stable RL on MoE policies (arXiv 2512.02556 §3.1), as trainer options.

V3.2 keeps GRPO (:mod:`refimpl.rl.grpo`) with the mean-only advantage and adds four changes, each
an option of :class:`~refimpl.rl.trainer.GRPOConfig` (TRL ``GRPOConfig`` names where TRL has them):

* ``use_bias_correction_kl`` (TRL's name) — the **unbiased KL estimate** (§3.1 eq. 7): k3 times the
  importance ratio to the sampling policy, :math:`\mathbb D=\rho\,(e^{x}-x-1)`, :math:`x=\ell^{ref}-\ell`.
  Its expectation under π_old is :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})` and so is the expectation of
  its gradient, :math:`\partial\mathbb D/\partial\ell=\rho\,(\ell-\ell^{ref})` (:func:`unbiased_kl`); plain
  k3's gradient :math:`1-\pi_{ref}/\pi_\theta` is biased and unbounded where :math:`\pi_\theta\ll\pi_{ref}`.
* ``off_policy_mask_threshold`` (TRL's name, the paper's δ) — **off-policy sequence masking**
  (§3.1 eq. 8–9): a sequence with negative advantage whose mean log-ratio
  :math:`\frac1{|o_i|}\sum_t\log(\pi_{old}/\pi_\theta)` to the *sampling* policy exceeds δ drops out of
  the surrogate (not of the KL term) (:func:`off_policy_sequence_mask`).
* ``keep_routing`` (no TRL equivalent) — **Keep Routing**: the training forward uses the experts
  recorded at sampling time in every MoE layer (:func:`refimpl.moe.moe_forward` ``routes=``); the
  gate values are recomputed from the current router on those experts, so the router still learns.
* ``keep_sampling_mask`` (no TRL equivalent) — **Keep Sampling Mask**: the top-p truncation of the
  sampler is recorded and applied to π_θ (and π_old, π_ref) as a renormalised softmax over the kept
  tokens (:func:`masked_logps_entropy_forward`), so that π_θ and π_old share one action space.

Recording (:func:`sampling_record`): refimpl's "inference engine" is the same NumPy model, so the
routes and the nucleus are those of one full forward of the sampling parameters over the sampled
rows (cached decoding computes the same up to floating-point rounding; the sampled token is always
added to the kept set, since rounding can only move the nucleus boundary). The record also gives
π_old's log-probs, which with ``keep_sampling_mask`` are truncated and renormalised, as an engine
returns them.

Choices where the paper is silent (reference notes §9), each documented where it is made: the
gate values on kept routes are recomputed (not replayed); π_ref is restricted to the kept set too,
so the KL compares two distributions on the same support; OPSM uses the sampling policy's
log-probs for the divergence (TRL: ``sampling_per_token_logps``, defaulting to π_old) and the
current log-probs detached, as TRL does; the KL's ratio is the token ratio of eq. 7 at every
``importance_sampling_level`` (TRL multiplies by its sequence ratio under GSPO).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_real
from ..model.generate import top_p_mask
from ..model.transformer import model_forward
from ..moe.gating import GROUP_SCORE, select_experts
from .grpo import aggregation_weights, entropy_bonus, grpo_loss
from .logprobs import logps_entropy_backward, logps_entropy_forward

#: distance (in units of z/τ) below the best kept logit at which excluded logits are parked:
#: exp(-1e4) is exactly 0 in float32 and float64, so excluded tokens get probability and gradient 0.
FILL_GAP = 1e4

STABLE_OPTIONS = ("use_bias_correction_kl", "off_policy_mask_threshold", "keep_routing", "keep_sampling_mask")


def uses_stable(gc) -> bool:
    """Whether a :class:`~refimpl.rl.trainer.GRPOConfig` turns on any of the V3.2 options."""
    return bool(gc.use_bias_correction_kl or gc.off_policy_mask_threshold is not None or gc.keep_routing
                or gc.keep_sampling_mask)


def check_stable_options(gc):
    """Validate the V3.2 fields of a GRPOConfig (raise ValueError naming the field)."""
    for name in ("use_bias_correction_kl", "keep_routing", "keep_sampling_mask"):
        if not isinstance(getattr(gc, name), bool):
            raise ValueError(f"{name}: expected a bool, got {getattr(gc, name)!r}")
    d = gc.off_policy_mask_threshold
    if d is not None:
        check_real("off_policy_mask_threshold", d, low=0.0)


# ----------------------------------------------------------------------------------------------
# The two loss changes
# ----------------------------------------------------------------------------------------------

def unbiased_kl(logps, old_logps, ref_logps):
    r"""V3.2's unbiased KL estimate (arXiv 2512.02556 §3.1, eq. 7) at the sampled tokens, and its derivative.

    .. math:: \mathbb D = \rho\,(e^{x}-x-1),\quad x=\ell^{ref}-\ell,\ \rho=e^{\ell-\ell^{old}},\qquad
              \frac{\partial\mathbb D}{\partial\ell}=\rho\,(\ell-\ell^{ref})

    (:math:`\rho` is *not* detached: differentiating :math:`\rho k_3` gives
    :math:`\rho k_3+\rho(1-e^x)=-\rho x`.) ``old_logps`` None means on-policy: :math:`\rho=e^{\ell-\mathrm{sg}(\ell)}`,
    1 in value, and the derivative is :math:`\ell-\ell^{ref}` (k2's gradient, verl's "k3+").

    Shapes: logps, old_logps (or None), ref_logps (...) -> D (...), dD/dlogps (...), float64.
    """
    check_float("logps", logps)
    for name, a in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if a is not None:
            check_float(name, a)
            if a.shape != logps.shape:
                raise ValueError(f"{name}: expected shape {logps.shape} to match logps, got {a.shape}")
    if ref_logps is None:
        raise ValueError("ref_logps: required (the KL term needs the reference log-probs)")
    lp = logps.astype(np.float64)                                       # (...)
    x = ref_logps.astype(np.float64) - lp                               # (...) log(pi_ref / pi)
    with np.errstate(over="ignore"):
        rho = np.ones_like(lp) if old_logps is None else np.exp(lp - old_logps)  # (...)
        k3 = np.expm1(x) - x                                            # (...) e^x - x - 1, exact near 0
    # forward: D = rho k3(l), rho = exp(l - l_old)    so: dD/dl = rho k3 + rho (1 - e^x) = -rho x
    with np.errstate(over="ignore", invalid="ignore"):
        d, dd = rho * k3, -rho * x                                      # (...), (...)
    if not (np.isfinite(d).all() and np.isfinite(dd).all()):
        raise ValueError("ref_logps/old_logps: the KL estimate overflows float64 (exp of a log-ratio beyond "
                         "~709); the policies disagree too much at some token for an unclamped estimate")
    return d, dd


def off_policy_sequence_mask(advantages, logps, sampling_logps, mask, threshold):
    r"""Off-policy sequence masking (arXiv 2512.02556 §3.1, eq. 8–9): which sequences keep their surrogate.

    .. math:: M_{i,t}=0\ \text{ iff }\ \hat A_{i,t}<0\ \text{ and }\
              \frac{1}{|o_i|}\sum_{t'}\big(\ell^{old}_{i,t'}-\ell_{i,t'}\big)>\delta,\qquad 1\ \text{otherwise},

    with :math:`\ell^{old}` the sampling policy's log-probs and :math:`\ell` the current ones
    (constants: M is a step function of θ). ``|o_i|`` counts the row's active tokens (at least 1,
    TRL's clamp). Only negative advantages are ever masked, and only strictly above δ.

    Shapes: advantages (B,) or (B, T), logps / sampling_logps (B, T), mask (B, T) ->
    keep (B, 1) or (B, T) bool (broadcast to the advantages), divergence (B,) float64.
    """
    check_float("logps", logps, ndim=2)
    check_float("sampling_logps", sampling_logps, ndim=2)
    check_float("advantages", advantages)
    B, T = logps.shape
    if sampling_logps.shape != logps.shape:
        raise ValueError(f"sampling_logps: expected shape {logps.shape} to match logps, got {sampling_logps.shape}")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages: expected shape ({B},) or {(B, T)}, got {advantages.shape}")
    m = np.asarray(mask)
    if m.shape != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)} to match logps, got {m.shape}")
    m = m.astype(bool)
    threshold = check_real("threshold", threshold)
    diff = np.where(m, sampling_logps.astype(np.float64) - logps, 0.0)  # (B, T) log(pi_old / pi)
    div = diff.sum(axis=1) / np.maximum(m.sum(axis=1), 1)               # (B,)
    A = advantages[:, None] if advantages.ndim == 1 else advantages     # (B, 1) or (B, T)
    keep = (A >= 0) | (div[:, None] <= threshold)                       # (B, 1) or (B, T)
    return keep, div


def v32_grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, sampling_logps=None,
                  use_bias_correction_kl=False, off_policy_mask_threshold=None, **loss_kwargs):
    r""":func:`~refimpl.rl.grpo_loss` with V3.2's unbiased KL and off-policy sequence masking (§3.1 eq. 8).

    .. math:: J=\sum_{i,t}W_{i,t}\Big[L^{pg}_{i,t}(\rho,\hat A_{i}M_{i})+\beta\,\mathbb D_{i,t}\Big],\qquad
              \frac{\partial J}{\partial\ell_{i,t}}=W_{i,t}\big[\partial L^{pg}/\partial\ell
              +\beta\rho_{i,t}(\ell_{i,t}-\ell^{ref}_{i,t})\big]

    Masking the surrogate of a sequence is the same as zeroing its advantage (every surrogate of
    :data:`~refimpl.rl.grpo.LOSS_TYPES` vanishes with its gradient at :math:`\hat A=0`), so the
    surrogate is :func:`grpo_loss` on :math:`\hat A M`; the KL term is not masked. ``sampling_logps``
    (default ``old_logps``, as TRL) is π_old for OPSM; with both None nothing is masked.
    ``loss_kwargs``: :func:`grpo_loss`'s options (``loss_type``, ``beta``, ...).

    Returns ``loss, dlogps, info`` like :func:`grpo_loss`; ``info`` adds ``opsm_masked_fraction``
    (masked sequences / sequences), and, when ``old_logps`` is given, ``ratio_std``, ``ratio_max``,
    ``ratio_min`` over active tokens.
    """
    check_float("logps", logps, ndim=2)
    beta = loss_kwargs.get("beta", 0.0)
    adv = advantages
    info_extra = {}
    if off_policy_mask_threshold is not None:
        ref_old = old_logps if sampling_logps is None else sampling_logps
        ref_old = logps if ref_old is None else ref_old                 # on-policy: divergence 0
        keep, _ = off_policy_sequence_mask(advantages, logps, ref_old, mask, off_policy_mask_threshold)
        adv = np.where(keep[:, 0] if advantages.ndim == 1 else keep, advantages, 0.0).astype(advantages.dtype)
        info_extra["opsm_masked_fraction"] = float(np.mean(~keep.all(axis=1))) if len(keep) else 0.0
    else:
        info_extra["opsm_masked_fraction"] = 0.0
    if not (use_bias_correction_kl and beta != 0.0):
        loss, dlogps, info = grpo_loss(logps, old_logps, ref_logps, adv, mask, **loss_kwargs)
    else:
        kw = {**loss_kwargs, "beta": 0.0}
        loss, dlogps, info = grpo_loss(logps, old_logps, None, adv, mask, **kw)
        m = np.asarray(mask).astype(bool)                               # (B, T)
        W = aggregation_weights(kw.get("loss_type", "dapo"), m, max_completion_length=kw.get("max_completion_length"),
                                num_items_in_batch=kw.get("num_items_in_batch"))  # (B, T)
        D, dD = unbiased_kl(logps, old_logps, ref_logps)                # (B, T) each
        D, dD = np.where(m, D, 0.0), np.where(m, dD, 0.0)               # (B, T) masked garbage never leaks
        loss = np.asarray(float(loss) + beta * float(np.sum(W * D)), dtype=logps.dtype)
        dlogps = (dlogps + beta * W * dD).astype(logps.dtype)           # (B, T)
        info["kl"] = float(D.sum() / max(float(m.sum()), 1.0))
    if old_logps is not None:
        m = np.asarray(mask).astype(bool)
        with np.errstate(over="ignore"):
            r = np.exp(np.asarray(logps, np.float64)[m] - old_logps[m])  # (N,) active tokens
        info_extra.update(ratio_std=float(r.std()) if r.size else 0.0, ratio_max=float(r.max(initial=1.0)),
                          ratio_min=float(r.min(initial=1.0)))
    info.update(info_extra)
    return loss, dlogps, info


# ----------------------------------------------------------------------------------------------
# Keep Sampling Mask: log-probs renormalised over the kept tokens
# ----------------------------------------------------------------------------------------------

class MaskedLogProbCache(NamedTuple):
    inner: object          # LogProbCache of the filled logits
    keep: np.ndarray       # (..., V) bool kept tokens


def check_sampling_mask(keep, logits, ids):
    """Validate a recorded sampling mask: bool (..., V) like ``logits``, keeping every sampled token."""
    keep = np.asarray(keep)
    if keep.shape != logits.shape:
        raise ValueError(f"sampling_mask: expected shape {logits.shape} to match logits, got {keep.shape}")
    if keep.dtype != bool:
        raise ValueError(f"sampling_mask: expected a bool array, got dtype {keep.dtype}")
    if not np.take_along_axis(keep, np.asarray(ids)[..., None], axis=-1).all():
        raise ValueError("sampling_mask: every sampled token must be kept (a sampler never draws outside its mask)")
    return keep


def masked_logps_entropy_forward(logits, ids, keep, *, temperature=1.0):
    r"""Log-probs and entropies of :math:`\pi^{\mathcal V}=\mathrm{softmax}(z/\tau)` restricted to the kept set
    :math:`\mathcal V` (Keep Sampling Mask, arXiv 2512.02556 §3.1):

    .. math:: \ell^{\mathcal V}_t=\frac{z_{t,o_t}}{\tau}-\log\sum_{u\in\mathcal V_t}e^{z_{t,u}/\tau},\qquad
              \frac{\partial\ell^{\mathcal V}_t}{\partial z_{t,v}}
              =\frac{\mathbb 1[v=o_t]-\pi^{\mathcal V}_{t,v}}{\tau}\,\mathbb 1[v\in\mathcal V_t]

    Computed by :func:`~refimpl.rl.logps_entropy_forward` on logits whose excluded entries are
    parked :data:`FILL_GAP` (in units of :math:`z/\tau`) below the best kept one, where their
    probability is exactly 0; the parked values are constants, so the backward zeroes their entries.

    Shapes: logits (..., V), ids (...), keep (..., V) bool -> logps (...), entropy (...), cache.
    """
    check_float("logits", logits, min_ndim=1)
    keep = check_sampling_mask(keep, logits, ids)
    best = np.max(np.where(keep, logits, -np.inf), axis=-1, keepdims=True)  # (..., 1) >= the sampled logit
    fill = best - logits.dtype.type(FILL_GAP * float(temperature))      # (..., 1)
    filled = np.where(keep, logits, fill).astype(logits.dtype)          # (..., V)
    logp, ent, cache = logps_entropy_forward(filled, ids, temperature=temperature)
    return logp, ent, MaskedLogProbCache(cache, keep)


def masked_logps_entropy_backward(dlogps, dentropy, cache):
    """Gradient of :func:`masked_logps_entropy_forward` into the logits (0 outside the kept set).

    Shapes: dlogps (...), dentropy (...) or None -> dlogits (..., V).
    """
    dz = logps_entropy_backward(dlogps, dentropy, cache.inner)          # (..., V)
    # forward: z_filled = where(keep, z, const)          so: dz = where(keep, dz_filled, 0)
    return np.where(cache.keep, dz, 0.0).astype(dz.dtype)               # (..., V)


def v32_grpo_loss_from_logits(logits, completion_ids, old_logps, ref_logps, advantages, mask, *, sampling_mask=None,
                              temperature=1.0, entropy_coef=0.0, **loss_kwargs):
    r""":func:`~refimpl.rl.grpo_loss_from_logits` with the V3.2 options: log-probs over the kept tokens
    when ``sampling_mask`` (..., V) is given (Keep Sampling Mask), then :func:`v32_grpo_loss`
    (``loss_kwargs``: its options) and TRL's entropy bonus, with the gradient into the logits.

    Shapes: logits (B, T, V), completion_ids (B, T), old / ref (B, T) or None, advantages (B,) or
    (B, T), mask (B, T), sampling_mask (B, T, V) bool or None -> loss (), dlogits (B, T, V), info.
    """
    check_float("logits", logits, ndim=3)
    if sampling_mask is None:
        logps, ent, cache = logps_entropy_forward(logits, completion_ids, temperature=temperature)  # (B, T) each
        back = logps_entropy_backward
    else:
        logps, ent, cache = masked_logps_entropy_forward(logits, completion_ids, sampling_mask,
                                                         temperature=temperature)  # (B, T) each
        back = masked_logps_entropy_backward
    loss, dlogps, info = v32_grpo_loss(logps, old_logps, ref_logps, advantages, mask, **loss_kwargs)
    m = np.asarray(mask).astype(bool)                                   # (B, T)
    dent = None
    if entropy_coef != 0.0:
        term, dent = entropy_bonus(ent, m, entropy_coef=entropy_coef, loss_type=loss_kwargs.get("loss_type", "dapo"),
                                   num_items_in_batch=loss_kwargs.get("num_items_in_batch"))  # (), (B, T)
        loss = loss + term
    info["entropy"] = float((ent * m).sum() / max(float(m.sum()), 1.0))
    return np.asarray(loss, dtype=logits.dtype), back(dlogps, dent, cache), info


# ----------------------------------------------------------------------------------------------
# Recording at sampling time, and what drifts afterwards
# ----------------------------------------------------------------------------------------------

class SamplingRecord(NamedTuple):
    """What the sampler knew, for the updates of one rollout batch."""

    logps: np.ndarray               # (B, Tc) pi_old at the sampled tokens (over the kept set if vocab_mask)
    routes: list                    # per layer: (B, T, K) int64 experts of the sampling forward, or None (dense)
    vocab_mask: np.ndarray | None   # (B, Tc, V) bool nucleus of each completion position, or None


def sampling_record(params, config, batch, gc):
    """Record π_old's log-probs, every MoE layer's experts and (with ``gc.keep_sampling_mask``) the
    top-p nucleus of each completion position, from one forward of the sampling parameters over the
    :class:`~refimpl.rl.RolloutBatch` (see the module docstring).

    The nucleus is :func:`refimpl.model.generate.top_p_mask` at ``gc.temperature``, ``gc.top_p``,
    plus the sampled token; padded positions keep the whole vocabulary.
    """
    logits, _, info = model_forward(batch.ids, params, config, backend=gc.backend)  # (B, T, V)
    lc = batch.gather(logits)                                           # (B, Tc, V)
    routes = [None if i is None else i["idx"] for i in info["moe"]]
    vocab = None
    if gc.keep_sampling_mask:
        vocab = top_p_mask(lc, temperature=gc.temperature, top_p=gc.top_p)  # (B, Tc, V)
        np.put_along_axis(vocab, batch.comp[..., None], True, axis=-1)
        pad = np.arange(batch.comp.shape[1])[None, :] >= batch.lc[:, None]  # (B, Tc)
        vocab[pad] = True
        logps = masked_logps_entropy_forward(lc, batch.comp, vocab, temperature=gc.temperature)[0]  # (B, Tc)
    else:
        logps = logps_entropy_forward(lc, batch.comp, temperature=gc.temperature)[0]  # (B, Tc)
    return SamplingRecord(logps, routes, vocab)


def policy_logps(params, config, batch, gc, record=None):
    """Log-probs of the sampled tokens under ``params`` (e.g. π_ref), over the recorded kept set when
    ``record.vocab_mask`` is given (π_ref restricted like π_θ; the paper does not say). Shapes: -> (B, Tc)."""
    lc = batch.gather(model_forward(batch.ids, params, config, backend=gc.backend)[0])  # (B, Tc, V)
    if record is None or record.vocab_mask is None:
        return logps_entropy_forward(lc, batch.comp, temperature=gc.temperature)[0]
    return masked_logps_entropy_forward(lc, batch.comp, record.vocab_mask, temperature=gc.temperature)[0]


def router_choice(info, gate_params, config):
    """The experts the router itself would pick for the scores in an MoE layer's ``info`` (bias added,
    group limit applied; :func:`refimpl.moe.gating.gate_forward`'s selection). Shapes: -> (..., K)."""
    scores = info["scores"]                                             # (..., E)
    e = scores.shape[-1]
    sel = scores.reshape(-1, e)                                         # (N, E)
    bias = gate_params.get("e_score_correction_bias")
    if bias is not None:
        sel = sel + bias.astype(sel.dtype)                              # (N, E)
    idx = select_experts(sel, config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                         group_score=GROUP_SCORE[config.topk_method])   # (N, K)
    return idx.reshape(*scores.shape[:-1], -1)


def drifted_routes(moe_infos, routes, params, config):
    """Per MoE layer, which tokens' top-K expert *set* differs between the recorded ``routes``
    (:attr:`SamplingRecord.routes`) and the router's current choice (from ``model_forward``'s
    ``info["moe"]`` at the current ``params``). Shapes: -> list of (B, T) bool (None for dense layers)."""
    out = []
    for n, (info, rec) in enumerate(zip(moe_infos, routes, strict=True)):
        if info is None:
            out.append(None)
            continue
        own = np.sort(router_choice(info, params["model"]["layers"][n]["mlp"]["gate"], config), axis=-1)  # (B, T, K)
        out.append((own != np.sort(rec, axis=-1)).any(axis=-1))         # (B, T)
    return out


def routing_drift(moe_infos, routes, params, config, positions=None):
    r"""Fraction of tokens whose top-K expert set changed since sampling (:func:`drifted_routes`), over all
    MoE layers (each token and layer counts once); ``positions`` (B, T) bool: which tokens count (default all).
    """
    changed = total = 0
    for diff in drifted_routes(moe_infos, routes, params, config):
        if diff is None:
            continue
        sel = np.ones(diff.shape, bool) if positions is None else positions
        changed += int(diff[sel].sum())
        total += int(sel.sum())
    return changed / total if total else 0.0
