r"""Group-relative advantages: the group is the baseline (DeepSeekMath §4.1.2–4.1.3).

GRPO drops PPO's value network. For each prompt it samples a *group* of G completions
(``num_generations``), scores them, and uses the group's own statistics as the baseline: a
completion is good if it beats its siblings. With outcome supervision every token of completion
:math:`i` gets the same advantage

.. math:: \hat A_i = \frac{r_i - \mathrm{mean}(r_{\mathrm{group}})}{\mathrm{std}(r_{\mathrm{group}}) + \epsilon}.

The paper leaves the standard deviation's degrees of freedom and :math:`\epsilon` open. refimpl
follows TRL's ``GRPOTrainer``: sample standard deviation (``ddof=1``, Bessel-corrected) and
:math:`\epsilon = 10^{-4}` added to it; groups are *contiguous* blocks of ``num_generations`` rows,
as TRL reshapes rewards to ``(-1, num_generations)``. ``scale_rewards`` uses TRL's names:
``"group"`` (default), ``"batch"`` (mean per group, std over the whole batch) and ``"none"``
(Dr. GRPO, arXiv 2503.20783 §3.1: no division, which removes the bias toward questions whose
rewards vary little); ``True``/``False`` mean ``"group"``/``"none"``.

Where the public implementations differ (refimpl = TRL unless stated):

* **epsilon** — TRL 1e-4, verl 1e-6 (``std_eps`` selects it).
* **singleton groups** (G = 1) — TRL gives A = 0 (its std is set to 0 and the numerator is 0);
  verl sets mean 0, std 1, so A = r / (1 + 1e-6). refimpl returns 0: one sample has no baseline.
* **all-equal rewards** — the numerator vanishes. refimpl returns *exact* zeros (TRL can return
  ~1e-13 when the float mean of equal values is not bit-equal to them); these groups carry no
  policy-gradient signal and are counted in ``info["frac_reward_zero_std"]``.
* **NaN rewards** — TRL marks a completion for which every reward function returned ``None`` as
  NaN, leaves it out of the group's mean and std, and gives it A = 0. A NaN is more often a bug in
  a reward function, so refimpl raises by default; ``nan_policy="omit"`` gives TRL's behaviour.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float, check_integer, check_real

SCALE_REWARDS = ("group", "batch", "none")
NAN_POLICIES = ("raise", "omit")


def _scale_mode(scale_rewards) -> str:
    """Map TRL's ``scale_rewards`` (str or bool) to one of :data:`SCALE_REWARDS`."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {SCALE_REWARDS} or a bool, got {scale_rewards!r}")
    return scale_rewards


def _check_groups(name: str, n: int, num_generations) -> int:
    num_generations = check_integer("num_generations", num_generations, low=1)
    if n % num_generations:
        raise ValueError(f"{name}: expected a length divisible by num_generations={num_generations} "
                         f"(contiguous groups), got {n}")
    return int(num_generations)


def _nan_stats(x: np.ndarray, axis):
    """(count, mean, ddof=1 std) over ``axis`` ignoring NaN; std is 0 where fewer than 2 values."""
    valid = ~np.isnan(x)                                                # same shape as x
    count = valid.sum(axis=axis, keepdims=True)                         # (..., 1)
    xs = np.where(valid, x, 0.0)                                        # same shape as x
    mean = xs.sum(axis=axis, keepdims=True) / np.maximum(count, 1)      # (..., 1)
    dev = np.where(valid, x - mean, 0.0)                                # same shape as x
    var = (dev * dev).sum(axis=axis, keepdims=True) / np.maximum(count - 1, 1)  # (..., 1)
    std = np.where(count > 1, np.sqrt(var), 0.0)                        # (..., 1)
    return count, mean, std


def _unit(r: np.ndarray) -> float:
    """A power of two to divide rewards by so that sums of squares stay finite (1.0 for usual rewards)."""
    a = np.abs(r[np.isfinite(r)])
    top = float(a.max()) if a.size else 0.0
    return 1.0 if top < 1e150 else float(np.ldexp(1.0, np.frexp(top)[1] - 1))   # top / unit in [1, 2)


def _rescale(adv: np.ndarray, unit: float, dtype, name: str) -> np.ndarray:
    """``adv * unit`` in ``dtype``; a ValueError naming ``name`` if that is out of the dtype's range."""
    with np.errstate(over="ignore"):
        out = (adv * unit).astype(dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: advantages (r - mean) overflow {np.dtype(dtype).name} "
                         "(rewards too far apart for scale_rewards='none')")
    return out


def _constant(x: np.ndarray, axis) -> np.ndarray:
    """True where all non-NaN values along ``axis`` are equal (or there are none)."""
    hi = np.where(np.isnan(x), -np.inf, x).max(axis=axis, keepdims=True)  # (..., 1)
    lo = np.where(np.isnan(x), np.inf, x).min(axis=axis, keepdims=True)   # (..., 1)
    return ~(hi > lo)                                                   # (..., 1)


def _check_rewards(name: str, rewards, nan_policy: str) -> np.ndarray:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
    if isinstance(rewards, np.ndarray) and rewards.dtype.kind == "f" and np.isnan(rewards).any():
        if nan_policy == "raise":
            raise ValueError(f"{name}: contains NaN (a reward function failed?); pass nan_policy='omit' to "
                             "leave NaN rewards out of the baseline with zero advantage, as TRL does")
        check_float(name, np.where(np.isnan(rewards), 0.0, rewards).astype(rewards.dtype))
        return rewards
    return check_float(name, rewards)


def group_advantages(rewards, num_generations, *, scale_rewards="group", std_eps=1e-4, nan_policy="raise"):
    r"""Outcome-supervision GRPO advantages, one per completion (DeepSeekMath §4.1.2).

    .. math:: \hat A_i = \frac{r_i - \mu_g}{\sigma + \epsilon},\qquad
              \mu_g = \tfrac1G\textstyle\sum_{j\in g} r_j,\quad
              \sigma = \sqrt{\tfrac{1}{G-1}\textstyle\sum_{j\in g}(r_j-\mu_g)^2}

    with :math:`\sigma` the group's (``"group"``) or the whole batch's (``"batch"``) sample std, or
    no division at all (``"none"``). Groups are contiguous blocks of ``num_generations`` rows.

    Parameters
    ----------
    rewards : ndarray, shape (B,)
        Scalar reward per completion (already the weighted sum of the reward functions), float32
        or float64; ``B = n_prompts * num_generations``.
    num_generations : int
        Group size G (TRL's name).
    scale_rewards : {"group", "batch", "none"} or bool
        TRL's option; ``True`` is ``"group"`` and ``False`` is ``"none"``.
    std_eps : float
        Added to the standard deviation (TRL 1e-4; verl 1e-6).
    nan_policy : {"raise", "omit"}
        ``"omit"``: NaN rewards are left out of the mean and std and get advantage 0 (TRL).

    Returns
    -------
    advantages : ndarray, shape (B,), the rewards' dtype
    info : dict
        ``reward_mean``, ``reward_std`` (mean over completions of the std used, as TRL logs it),
        ``frac_reward_zero_std`` (fraction of *groups* whose rewards are all equal; TRL's metric of
        that name compares the std it divides by with 0, which under ``"batch"`` is the batch std).
    """
    rewards = _check_rewards("rewards", rewards, nan_policy)
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected shape (B,), got {rewards.shape}")
    mode = _scale_mode(scale_rewards)
    std_eps = check_real("std_eps", std_eps, low=0.0)
    g = _check_groups("rewards", rewards.shape[0], num_generations)
    r = rewards.astype(np.float64).reshape(-1, g)                       # (P, G) P prompts
    unit = _unit(r)                                                     # 1.0 unless squares would overflow
    r, std_eps = r / unit, std_eps / unit                               # (P, G) the same advantages
    count, mean, std = _nan_stats(r, axis=1)                            # (P, 1) each
    flat = _constant(r, axis=1)                                         # (P, 1)
    if mode == "batch":
        _, _, std_b = _nan_stats(r.reshape(-1), axis=0)                 # (1,)
        std = np.broadcast_to(std_b, std.shape)                         # (P, 1)
    centred = np.where(flat, 0.0, r - mean)                             # (P, G) exact zeros in flat groups
    den = std + std_eps                                                 # (P, 1) 0 only in flat groups
    adv = centred if mode == "none" else centred / np.where(den > 0, den, 1.0)  # (P, G)
    adv = np.where(np.isnan(r) | (count < 2), 0.0, adv)                 # (P, G) omitted rows, singletons
    adv = _rescale(adv, unit if mode == "none" else 1.0, rewards.dtype, "rewards")  # (P, G)
    info = {
        "reward_mean": float(np.nanmean(r)) * unit if np.isfinite(r).any() else 0.0,
        "reward_std": float(np.mean(np.broadcast_to(std, r.shape))) * unit if r.size else 0.0,
        "frac_reward_zero_std": float(np.mean(flat)) if r.size else 0.0,
    }
    return adv.reshape(-1), info


def process_advantages(step_rewards, step_mask, num_generations, *, scale_rewards="group", std_eps=1e-4):
    r"""Process-supervision advantages (DeepSeekMath §4.1.3).

    Each completion :math:`i` has rewards :math:`r_i^{\mathrm{index}(j)}` at the last token of each
    reasoning step :math:`j`. They are normalised with the mean and std over *all steps of all G
    completions* of the group, :math:`\tilde r = (r - \mu)/(\sigma + \epsilon)`, and each token's
    advantage is the sum of the normalised rewards of the steps that end at or after it:

    .. math:: \hat A_{i,t} = \sum_{j:\ \mathrm{index}(j) \ge t} \tilde r_i^{\mathrm{index}(j)}

    The paper fixes neither the std's ddof nor :math:`\epsilon`; refimpl uses the outcome
    convention (ddof=1, ``std_eps = 1e-4``). A group with fewer than two step rewards, or whose step
    rewards are all equal, gets zeros. Tokens after a completion's last step get 0.

    Shapes: step_rewards (B, T) float, step_mask (B, T) bool (True at step-end tokens; rewards
    elsewhere are ignored) -> advantages (B, T), info.
    """
    step_rewards = check_float("step_rewards", step_rewards, ndim=2)
    step_mask = np.asarray(step_mask)
    if step_mask.dtype != bool:
        raise TypeError(f"step_mask: expected a bool array, got dtype {step_mask.dtype}")
    if step_mask.shape != step_rewards.shape:
        raise ValueError(f"step_mask: expected shape {step_rewards.shape} to match step_rewards, "
                         f"got {step_mask.shape}")
    mode = _scale_mode(scale_rewards)
    std_eps = check_real("std_eps", std_eps, low=0.0)
    g = _check_groups("step_rewards", step_rewards.shape[0], num_generations)
    B, T = step_rewards.shape
    r = np.where(step_mask, step_rewards.astype(np.float64), np.nan).reshape(-1, g * T)  # (P, G*T)
    unit = _unit(r)                                                     # 1.0 unless squares would overflow
    r, std_eps = r / unit, std_eps / unit                               # (P, G*T)
    count, mean, std = _nan_stats(r, axis=1)                            # (P, 1) each
    flat = _constant(r, axis=1) | (count < 2)                           # (P, 1)
    if mode == "batch":
        _, _, std_b = _nan_stats(r.reshape(-1), axis=0)                 # (1,)
        std = np.broadcast_to(std_b, std.shape)                         # (P, 1)
    centred = np.where(flat, 0.0, r - mean)                             # (P, G*T)
    den = std + std_eps                                                 # (P, 1) 0 only in flat groups
    norm = centred if mode == "none" else centred / np.where(den > 0, den, 1.0)  # (P, G*T)
    norm = np.where(np.isnan(r), 0.0, norm).reshape(B, T)               # (B, T) zero off step ends
    # A_t = sum_{t' >= t} norm_{t'}: a reversed cumulative sum along T
    adv = np.cumsum(norm[:, ::-1], axis=1)[:, ::-1]                     # (B, T)
    adv = _rescale(adv, unit if mode == "none" else 1.0, step_rewards.dtype, "step_rewards")  # (B, T)
    info = {"frac_reward_zero_std": float(np.mean(flat)) if flat.size else 0.0,
            "num_steps": int(step_mask.sum())}
    return np.ascontiguousarray(adv), info
