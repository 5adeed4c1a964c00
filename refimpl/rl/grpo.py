r"""The GRPO loss and its variants, with the gradient with respect to the per-token log-probs.

GRPO (DeepSeekMath §4.1, eq. 3; DeepSeek-R1 §2.2.1, eq. 1) is PPO's clipped surrogate with a
group-relative advantage (:mod:`refimpl.rl.advantages`) and a KL penalty to a frozen reference
policy added to the loss. Per completion token (:math:`\ell = \log\pi_\theta(o_{i,t})`):

.. math:: L_{i,t} = -\min\big(\rho_{i,t}\hat A_{i},\
          \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{lo}, 1+\epsilon_{hi})\hat A_{i}\big) + \beta\,\mathrm{KL}_{i,t},
          \qquad \rho_{i,t} = e^{\ell_{i,t} - \ell^{old}_{i,t}}

and the loss is a weighted sum :math:`J = \sum_{i,t} W_{i,t} L_{i,t}` whose weights :math:`W` are
what the ``loss_type`` variants disagree about. Each variant is one entry of the table
:data:`refimpl.rl.loss_types.LOSS_TABLE` (its surrogate, weights, diagnostics and options). All
option names and semantics are TRL's ``GRPOTrainer`` / ``GRPOConfig`` (one process, no gradient
accumulation):

* ``grpo``, ``sapo``: :math:`W_{i,t} = m_{i,t} / (B\,\max(n_i,1))`, with ``m`` the mask and
  :math:`n_i` its row sum (DeepSeekMath eq. 3: :math:`1/G`, then :math:`1/\lvert o_i\rvert`);
* ``bnpo``: :math:`W_{i,t} = m_{i,t} / \max(N,1)`, :math:`N = \sum m` (TRL's, not the BNPO paper's);
* ``dr_grpo``: :math:`W_{i,t} = m_{i,t} / (B\,L_{max})` (Dr. GRPO §3.1);
* ``dapo``, ``cispo``: :math:`W_{i,t} = m_{i,t} / \max(N_{items},1)` (DAPO §3.3, token-level).

:math:`N_{items}` is TRL's ``num_items_in_batch``: the active tokens of the whole generation batch.
It defaults to this batch's N (so ``dapo`` equals ``bnpo`` here); pass it when splitting a batch
into micro-batches, and the micro-batch gradients add up to the full-batch gradient.

``cispo`` (MiniMax-M1): :math:`L = -\mathrm{sg}[\min(\rho, \epsilon_{hi})]\,\hat A\,\ell` — TRL caps at
``epsilon_high`` itself (recommended 5.0), verl clips the detached ratio to
:math:`[1-\epsilon_{lo}, 1+\epsilon_{hi}]`. ``sapo``: :math:`L = -\hat A\,\tfrac{4}{\tau_s}\sigma(\tau_s(\rho-1))`
with :math:`\tau_s` = ``sapo_temperature_pos`` if :math:`\hat A>0` else ``sapo_temperature_neg``.
``importance_sampling_level="sequence"`` (GSPO, arXiv 2507.18071) uses one ratio per sequence,
:math:`s_i = \exp(\sum_t m(\ell-\ell^{old})/\max(n_i,1))`, broadcast over its tokens; TRL warns
that with a token-sum ``loss_type`` this weights sequences by length (use ``grpo`` for GSPO).

KL estimators of :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})` at the sampled token, :math:`x = \ell^{ref} - \ell`
(Schulman's k1/k2/k3; TRL implements only k3, the DeepSeekMath eq. 4 one):
k1 :math:`= -x`, k2 :math:`= x^2/2`, k3 :math:`= e^x - x - 1`. TRL and refimpl leave the log-ratio
and k3 unclamped; verl clamps the log-ratio to [-20, 20] and k3 to [-10, 10].

Where the public implementations differ (refimpl follows TRL, and the tests pin each choice):

* ``dr_grpo`` divides by :math:`B L_{max}`; verl's ``seq-mean-token-sum-norm`` divides by the
  padded length T only, a loss scale B times larger.
* ``dapo`` divides by the batch's active tokens (``num_items_in_batch``); verl's ``token-mean``
  and TRL's Liger path (at the reference snapshot) use the micro-batch's count and divide by the
  gradient-accumulation steps, so micro-batches do not add up to the batch gradient.
* Ratios and k3 are unclamped (verl: log-ratio in [-20, 20], k3 in [-10, 10]). Where PyTorch would
  return NaN or inf because an exponential overflows, refimpl returns the exact value when it is
  finite (a token with :math:`\hat A = 0` contributes 0 even if its ratio overflows) and otherwise
  raises a ValueError naming ``old_logps`` or ``ref_logps``; verl's dual clip
  (``clip_ratio_c``) is not implemented, TRL's ``delta`` is.
* verl's ``gspo`` (token ratio :math:`\mathrm{sg}[s_i]\,\pi/\mathrm{sg}[\pi]`) has the value and
  gradient of ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` (up to verl's
  clamp of the log-ratio at 10 and its 1e-8 in the length divisor); Liger rejects
  the sequence level for ``cispo``/``sapo``, TRL and refimpl accept it.
* TRL's ``bnpo`` is only an aggregation; the BNPO paper (arXiv 2506.02864) normalises advantages.

The gradient is assembled by hand (reference §1.6): with :math:`a_{i,t}` the derivative of the
``min``/``clip`` pair (PyTorch's: ties split 1/2–1/2, ``clamp`` passes the gradient at its bounds),

.. math:: \frac{\partial J}{\partial \ell_{i,t}} = W_{i,t}\big[-\hat A\rho\,a + \beta\,k'(\ell_{i,t})\big]
          \quad\text{(token level)}.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float, check_int, check_real, check_same_dtype
from ..backend import resolve_backend
from .logprobs import logps_entropy_backward, logps_entropy_forward
from .loss_types import LOSS_TABLE, get_loss_type, loss_options

#: the built-in ``loss_type`` names (the table :data:`~refimpl.rl.loss_types.LOSS_TABLE` may hold more)
LOSS_TYPES = tuple(LOSS_TABLE)
IS_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_mask(mask, shape) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask: expected a numpy.ndarray, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask: expected shape {shape} to match logps, got {mask.shape}")
    if mask.dtype != bool:
        if mask.dtype.kind not in "iuf" or not np.isin(mask, (0, 1)).all():
            raise ValueError("mask: expected a bool array or 0/1 values")
    return mask.astype(bool)


def _check_scalar(name, x, *, low=0.0, allow_none=False, strict=False):
    if x is None and allow_none:
        return None
    return check_real(name, x, low=low, low_open=strict)


def _kl(estimator, logps, ref, m):
    """Per-token KL estimate and its derivative in logps; masked positions give 0."""
    x = np.where(m, ref - logps, 0.0)                                   # (B, T) log(pi_ref / pi)
    if estimator == "k1":
        return -x, np.ones_like(x)
    if estimator == "k2":
        return 0.5 * x * x, -x
    with np.errstate(over="ignore"):      # exp(x) > float64's range: reported by grpo_loss
        ex = np.exp(x)                                                  # (B, T)
    return ex - x - 1.0, 1.0 - ex                                       # k3 and dk3/dlogps


def per_token_kl(logps, ref_logps, *, kl_estimator="k3"):
    r"""Schulman's estimators of :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})` at sampled tokens, and their derivative.

    With :math:`x = \ell^{ref} - \ell`: k1 :math:`= -x` (derivative 1), k2 :math:`= x^2/2` (derivative
    :math:`-x`), k3 :math:`= e^x - x - 1` (derivative :math:`1 - e^x`; DeepSeekMath eq. 4). Only k1 and
    k3 are unbiased for the KL's value; the gradient of k3 in the loss is, in expectation, that of
    :math:`\mathrm{KL}(\pi_{ref}\|\pi_\theta)` (reference §1.4; verl's ``k3+`` uses k2's gradient).

    Shapes: logps (...), ref_logps (...) -> kl (...), dkl/dlogps (...), float64.
    """
    check_float("logps", logps)
    check_float("ref_logps", ref_logps)
    if ref_logps.shape != logps.shape:
        raise ValueError(f"ref_logps: expected shape {logps.shape} to match logps, got {ref_logps.shape}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    kl, dkl = _kl(kl_estimator, logps.astype(np.float64), ref_logps.astype(np.float64), np.ones(logps.shape, bool))
    if not (np.isfinite(kl).all() and np.isfinite(dkl).all()):
        raise ValueError(_overflow_message(np.zeros(1), logps.astype(np.float64), ref_logps.astype(np.float64),
                                           np.ones(logps.shape, bool), np.float64))
    return kl, dkl


@np.errstate(over="ignore", invalid="ignore")   # an overflowed exponential is reported as a ValueError
def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type="dapo", epsilon=0.2,
              epsilon_high=None, delta=None, beta=0.0, kl_estimator="k3", importance_sampling_level="token",
              max_completion_length=None, num_items_in_batch=None, **options):
    r"""GRPO-family policy loss and its gradient with respect to ``logps`` (DeepSeekMath eq. 3).

    Parameters
    ----------
    logps : ndarray (B, T)
        :math:`\ell_{i,t}`, log-probs of the completion tokens under the current policy (at the
        sampling temperature, see :mod:`refimpl.rl.logprobs`).
    old_logps : ndarray (B, T) or None
        :math:`\ell^{old}` of the policy that sampled. None means on-policy: TRL then uses
        :math:`\mathrm{sg}(\ell)`, so :math:`\rho \equiv 1` in value but not in gradient.
    ref_logps : ndarray (B, T) or None
        Reference-policy log-probs; required when ``beta != 0``.
    advantages : ndarray (B,) or (B, T)
        :math:`\hat A`, constants. (B, T) allows per-token (process) advantages.
    mask : ndarray (B, T), bool or 0/1
        Completion-token mask; masked entries never affect the loss or the gradient.
    loss_type, epsilon, epsilon_high, delta, beta, importance_sampling_level : TRL options
        See the module docstring.
    max_completion_length, num_items_in_batch : TRL options
        TRL's ``GRPOConfig`` options (``epsilon_high`` defaults to ``epsilon``; ``delta`` is
        INTELLECT-2's upper bound on the unclipped ratio). ``max_completion_length`` is required
        for ``dr_grpo``. ``num_items_in_batch`` overrides the ``dapo``/``cispo`` token count.
    **options : the ``loss_type``'s own options
        Declared by its :class:`~refimpl.rl.loss_types.LossType` entry, with defaults (``sapo``:
        ``sapo_temperature_pos=1.0``, ``sapo_temperature_neg=1.05``); others raise ValueError.
    kl_estimator : {"k1", "k2", "k3"}
        refimpl's option (TRL: always ``"k3"``).

    Returns
    -------
    loss : 0-d ndarray (logps' dtype)
    dlogps : ndarray (B, T), :math:`\partial J/\partial\ell`, zero at masked positions
    info : dict
        ``policy_loss`` (the surrogate part), ``kl`` (masked mean of the estimator, when
        ``ref_logps`` is given), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (clipped family; TRL's definitions and names), ``cispo_clip_ratio``,
        ``ratio_mean``, ``num_tokens``, ``normalizer``.
    """
    check_float("logps", logps, ndim=2)
    shape, dt = logps.shape, logps.dtype
    B, T = shape
    m = _check_mask(mask, shape)
    for name, arr in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if arr is not None:
            check_float(name, arr, ndim=2)
            if arr.shape != shape:
                raise ValueError(f"{name}: expected shape {shape} to match logps, got {arr.shape}")
            check_same_dtype(name, arr, "logps", logps)
    check_float("advantages", advantages)
    if advantages.shape not in ((B,), shape):
        raise ValueError(f"advantages: expected shape ({B},) or {shape}, got {advantages.shape}")
    entry = get_loss_type(loss_type)
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level: expected one of {IS_LEVELS}, got {importance_sampling_level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    eps_lo = _check_scalar("epsilon", epsilon)
    eps_hi = eps_lo if epsilon_high is None else _check_scalar("epsilon_high", epsilon_high)
    delta = _check_scalar("delta", delta, allow_none=True, strict=True)
    beta = _check_scalar("beta", beta)
    opts = {"epsilon_low": eps_lo, "epsilon_high": eps_hi, "delta": delta, **loss_options(loss_type, options)}
    if beta != 0.0 and ref_logps is None:
        raise ValueError("ref_logps: required when beta != 0 (the KL term needs the reference log-probs)")
    if num_items_in_batch is not None:
        num_items_in_batch = _check_scalar("num_items_in_batch", num_items_in_batch)

    lp = logps.astype(np.float64)                                       # (B, T)
    A = advantages.astype(np.float64)                                   # (B,) or (B, T)
    A = A[:, None] if A.ndim == 1 else A                                # (B, 1) or (B, T)
    At = np.broadcast_to(A, shape)                                      # (B, T)
    mf = m.astype(np.float64)                                           # (B, T)
    n = mf.sum(axis=1, keepdims=True)                                   # (B, 1)
    W, norm = entry.weights(m, max_completion_length, num_items_in_batch)  # (B, T), float

    # importance ratio: on-policy (old_logps None) is rho = exp(l - sg(l)) = 1 with d rho/dl = 1
    log_ratio = np.zeros(shape) if old_logps is None else np.where(m, lp - old_logps, 0.0)  # (B, T)
    if importance_sampling_level == "token":
        log_w = log_ratio                                               # (B, T)
    else:
        log_w = (log_ratio * mf).sum(axis=1, keepdims=True) / np.maximum(n, 1.0)  # (B, 1)
    with np.errstate(over="ignore"):
        ratio = np.exp(log_w)                                           # (B, T) or (B, 1)

    info = {}
    pg, dldr, direct = entry.surrogate(ratio, At, lp, opts)             # (B, T) each; direct may be None
    direct = np.zeros(shape) if direct is None else direct              # (B, T) dL/dl not through rho
    kl = dkl = None
    if ref_logps is not None:
        kl, dkl = _kl(kl_estimator, lp, ref_logps.astype(np.float64), m)  # (B, T) each
    per_token = pg if beta == 0.0 else pg + beta * kl                   # (B, T)
    per_token = np.where(m, per_token, 0.0)                             # (B, T) masked garbage never leaks
    loss = float(np.sum(W * per_token))

    # backward: J = sum W L,  L = L_pg(rho, l) + beta k(l)
    dJdr = np.where(m & (dldr != 0), W * dldr, 0.0)                     # (B, T) dJ/drho_{i,t} (0 * inf guarded)
    if importance_sampling_level == "token":
        # rho = exp(l - l_old)                        so: drho/dl = rho
        dlogps = np.where(dJdr != 0, dJdr * ratio, 0.0)                 # (B, T)
    else:
        # s_i = exp(sum_t m (l - l_old) / max(n_i, 1))   so: ds_i/dl_t = s_i m_t / max(n_i, 1)
        S = dJdr.sum(axis=1, keepdims=True)                             # (B, 1) dJ/ds_i
        dlogps = np.where(S != 0, S * ratio, 0.0) * mf / np.maximum(n, 1.0)  # (B, T)
    dlogps = dlogps + W * direct                                        # (B, T)
    if beta != 0.0:
        dlogps = dlogps + beta * W * dkl                                # (B, T)

    N = float(mf.sum())
    masked_mean = lambda x: float((np.broadcast_to(x, shape) * mf).sum() / max(N, 1.0))
    per_seq = importance_sampling_level == "sequence" and advantages.ndim == 1
    frac = (lambda x: float(np.mean(x)) if B else 0.0) if per_seq else masked_mean
    A_r = A if per_seq else At                                          # (B, 1) or (B, T)
    info["policy_loss"] = float(np.sum(W * np.where(m, pg, 0.0)))
    if kl is not None:
        info["kl"] = masked_mean(kl)
    if entry.diagnostics is not None:
        info.update(entry.diagnostics(ratio, A_r, opts, frac))
    info["ratio_mean"] = frac(ratio) if per_seq else masked_mean(ratio)
    info["num_tokens"] = int(N)
    info["normalizer"] = norm
    loss, dlogps = np.asarray(loss, dtype=dt), dlogps.astype(dt)
    if not (np.isfinite(loss) and np.isfinite(dlogps).all()):
        raise ValueError(_overflow_message(log_w, lp, ref_logps, m, dt))
    return loss, dlogps, info


def _overflow_message(log_w, lp, ref_logps, m, dt):
    """Say which exponential left the dtype's range (never return a silent inf/NaN loss)."""
    big = float(np.log(np.finfo(dt).max))
    lw = float(np.max(log_w, initial=-np.inf))
    if lw > big - 1.0 or ref_logps is None:
        return (f"old_logps: the importance ratio exp(logps - old_logps) reaches exp({lw:.4g}), so the loss or its "
                f"gradient is not representable in {np.dtype(dt).name} (exp overflows above exp({big:.4g})). The "
                f"sampling policy and the current one disagree completely on some token; refimpl, like TRL, does "
                f"not clamp the ratio (verl clamps the log-ratio to [-20, 20]): clamp it or drop those samples")
    x = float(np.max(np.where(m, ref_logps - lp, -np.inf), initial=-np.inf))
    return (f"ref_logps: the KL estimator's exp(ref_logps - logps) reaches exp({x:.4g}), so the loss or its "
            f"gradient is not representable in {np.dtype(dt).name}; refimpl, like TRL, does not clamp it "
            f"(verl clamps k3 to [-10, 10]): use kl_estimator='k1'/'k2', clamp, or drop those samples")


def entropy_bonus(entropies, mask, *, entropy_coef, loss_type="dapo", num_items_in_batch=None):
    r"""TRL's entropy bonus: the term :math:`-c\,\bar H` added to the loss, and its gradient.

    :math:`\bar H` is the mean entropy over active tokens — for ``dapo``/``cispo`` the sum divided
    by ``num_items_in_batch`` (default: the active tokens), so micro-batch terms add up to the
    batch mean, as TRL does. Shapes: entropies (B, T), mask (B, T) -> term (), dentropies (B, T).
    """
    check_float("entropies", entropies, ndim=2)
    m = _check_mask(mask, entropies.shape).astype(np.float64)           # (B, T)
    coef = _check_scalar("entropy_coef", entropy_coef)
    if get_loss_type(loss_type).items_normalised and num_items_in_batch is not None:
        norm = max(_check_scalar("num_items_in_batch", num_items_in_batch), 1.0)
    else:
        norm = max(float(m.sum()), 1.0)
    term = -coef * float(np.sum(entropies * m)) / norm
    # forward: term = -c sum(m H) / norm           so: dterm/dH = -c m / norm
    return np.asarray(term, dtype=entropies.dtype), (-coef * m / norm).astype(entropies.dtype)


def grpo_loss_from_logits(logits, completion_ids, old_logps, ref_logps, advantages, mask, *, temperature=1.0,
                          entropy_coef=0.0, backend=None, **loss_kwargs):
    r"""Log-prob gathering + :func:`grpo_loss` + entropy bonus, with the gradient into the logits.

    .. math:: J = J_{\mathrm{GRPO}}(\ell(z/\tau)) - c\,\bar H(z/\tau),\qquad
              \frac{\partial J}{\partial z_{t,k}} = \frac{g_t(\mathbb 1[k=o_t]-\pi_{t,k})
              - h_t\pi_{t,k}(\log\pi_{t,k}+H_t)}{\tau}

    with :math:`g = \partial J/\partial\ell` from :func:`grpo_loss` and :math:`h = \partial J/\partial H`.
    ``loss_kwargs`` are :func:`grpo_loss`'s options. ``backend``: of the log-prob/entropy pass and its
    backward (:func:`~refimpl.rl.logps_entropy_forward`, whose docstring says why ``None`` means
    ``"numpy"`` there, unless ``REFIMPL_BACKEND`` is set, rather than the package's ``"auto"``).

    Shapes: logits (B, T, V), completion_ids (B, T) int64, old_logps / ref_logps (B, T) or None,
    advantages (B,) or (B, T), mask (B, T) -> loss (), dlogits (B, T, V), info (adds ``entropy``).
    """
    check_float("logits", logits, ndim=3, scan=False)
    if resolve_backend(backend, work=logits.size, default="numpy") == "numpy":  # the twin tests values itself
        check_float("logits", logits, ndim=3)
    completion_ids = check_int("completion_ids", completion_ids, low=0, high=logits.shape[-1])
    if completion_ids.shape != logits.shape[:-1]:
        raise ValueError(f"completion_ids: expected shape {logits.shape[:-1]} to match logits, "
                         f"got {completion_ids.shape}")
    logps, ent, cache = logps_entropy_forward(logits, completion_ids, temperature=temperature,
                                              backend=backend)          # (B, T) each
    loss, dlogps, info = grpo_loss(logps, old_logps, ref_logps, advantages, mask, **loss_kwargs)
    m = _check_mask(mask, logps.shape)
    lt = loss_kwargs.get("loss_type", "dapo")
    if entropy_coef != 0.0:
        term, dent = entropy_bonus(ent, m, entropy_coef=entropy_coef, loss_type=lt,
                                   num_items_in_batch=loss_kwargs.get("num_items_in_batch"))  # (), (B, T)
        loss = loss + term
    else:
        _check_scalar("entropy_coef", entropy_coef)
        dent = None
    info["entropy"] = float((ent * m).sum() / max(float(m.sum()), 1.0))
    dlogits = logps_entropy_backward(dlogps, dent, cache)              # (B, T, V)
    return np.asarray(loss, dtype=logits.dtype), dlogits, info


def aggregation_weights(loss_type, mask, *, max_completion_length=None, num_items_in_batch=None):
    r"""The weights :math:`W_{i,t}` of :math:`J=\sum_{i,t}W_{i,t}L_{i,t}` that :func:`grpo_loss` uses for
    ``loss_type`` (TRL's single-process normalisers, see the module docstring), for terms added to
    the same per-token loss (e.g. :mod:`refimpl.rl.stable`'s unbiased KL).

    Shapes: mask (B, T) bool -> W (B, T) float64.
    """
    m = _check_mask(mask, np.shape(mask))
    return get_loss_type(loss_type).weights(m, max_completion_length, num_items_in_batch)[0]
