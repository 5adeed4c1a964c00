r"""Load balancing for DeepSeekMoE: V2's auxiliary losses, V3's sequence-wise loss and bias update.

If a router is free to choose, a few experts win early, get trained more, and win more: routing
collapses and the other experts' parameters are wasted (DeepSeekMoE §3.3; DeepSeek-V2 §2.2.3). With
expert parallelism an unbalanced load also idles devices. The remedies implemented here:

* **V2** (§2.2.3, eq. 23-31): three auxiliary losses of the form :math:`\alpha\sum f P`, where
  :math:`f` counts how often experts (or devices) are chosen and :math:`P` is the mean score
  mass they receive. :math:`f` is piecewise constant, so the gradient flows through :math:`P`:
  experts that are both popular and confident have their scores pushed down.
  :func:`expert_balance_forward`, :func:`device_balance_forward`, :func:`comm_balance_forward`.
* **V3** (§2.1.2): no auxiliary loss for balance; instead a per-expert bias, used only for
  selection, is nudged after every step (:func:`bias_update`), plus a tiny complementary
  sequence-wise loss (:func:`seq_balance_forward`, eq. 17-20) against extreme imbalance within
  one sequence.

Every loss takes ``scores`` (B, T, E) and ``idx`` (B, T, K) and is computed per sequence of T
tokens then averaged over the B sequences (as DeepSeek's V2 remote code with ``seq_aux=True``);
pass (1, B*T, ...) arrays for a batch-wise loss (V3 §4.5.3 compares the two). All share
:func:`balance_backward`, which returns the gradient with respect to ``scores``; feed it to
:func:`refimpl.moe.layer.moe_backward` as ``dscores``. Each loss equals its ``alpha`` when routing
is exactly uniform and scores are uniform (a test checks it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_int, check_integer, check_real, check_upstream


class BalanceCache(NamedTuple):
    coef: np.ndarray       # (B, E) dL/dP_i for each sequence (already includes alpha / B)
    n_tokens: int          # T, the tokens per sequence
    norm: np.ndarray | None  # (B, T, E) renormalised scores s' (V3 loss only), else None
    denom: np.ndarray | None  # (B, T, 1) sum_j s_j (V3 loss only), else None
    shape: tuple           # shape of the scores as given
    dtype: np.dtype


def _prepare(scores, idx):
    check_float("scores", scores)
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores: expected shape (T, E) or (B, T, E), got {scores.shape}")
    s = scores if scores.ndim == 3 else scores[None]                      # (B, T, E)
    b, t, e = s.shape
    idx = check_int("idx", idx, low=0, high=e)
    i = idx if idx.ndim == 3 else idx[None]                               # (B, T, K)
    if i.ndim != 3 or i.shape[:2] != (b, t):
        raise ValueError(f"idx: expected shape {scores.shape[:-1] + ('K',)} to match scores, got {idx.shape}")
    flat = (i + e * np.arange(b)[:, None, None]).reshape(-1)              # (B*T*K,)
    counts = np.bincount(flat, minlength=b * e).reshape(b, e)             # (B, E) selections per expert
    return s, i, counts


def _check_devices(n_devices, e):
    if e % check_integer("n_devices", n_devices, low=1):
        raise ValueError(f"n_devices: expected a divisor of the {e} experts, got {n_devices!r}")


def _loss(coef_f, p, alpha, b):
    check_real("alpha", alpha, low=0.0)
    return float(alpha) * float(np.sum(coef_f * p)) / b


def expert_balance_forward(scores, idx, alpha):
    r"""V2 expert-level balance loss (DeepSeek-V2 eq. 23-25).

    .. math:: \mathcal{L}_{\mathrm{ExpBal}} = \alpha_1 \sum_{i=1}^{E} f_i P_i,\quad
              f_i = \frac{E}{K T}\sum_t \mathbb{1}(\text{token } t \text{ selects } i),\quad
              P_i = \frac{1}{T}\sum_t s_{i,t}

    Shapes: scores (B, T, E) or (T, E), idx (..., K) -> loss (), BalanceCache.
    """
    s, i, counts = _prepare(scores, idx)
    b, t, e = s.shape
    k = i.shape[-1]
    f = counts * (e / (k * t))                                            # (B, E)
    p = s.mean(axis=1)                                                    # (B, E)
    loss = _loss(f, p, alpha, b)
    return np.asarray(loss, dtype=s.dtype), BalanceCache(alpha * f / b, t, None, None, scores.shape, s.dtype)


def device_balance_forward(scores, idx, n_devices, alpha):
    r"""V2 device-level balance loss (DeepSeek-V2 eq. 26-28); experts sit on devices in contiguous blocks.

    .. math:: \mathcal{L}_{\mathrm{DevBal}} = \alpha_2 \sum_{d=1}^{D} f'_d P'_d,\quad
              f'_d = \frac{1}{|\mathcal{E}_d|}\sum_{j\in\mathcal{E}_d} f_j,\quad
              P'_d = \sum_{j\in\mathcal{E}_d} P_j

    Shapes: scores (B, T, E) or (T, E), idx (..., K) -> loss (), BalanceCache.
    """
    s, i, counts = _prepare(scores, idx)
    b, t, e = s.shape
    _check_devices(n_devices, e)
    k = i.shape[-1]
    f = counts * (e / (k * t))                                            # (B, E)
    f_dev = f.reshape(b, n_devices, -1).mean(axis=-1)                     # (B, D)
    p_dev = s.mean(axis=1).reshape(b, n_devices, -1).sum(axis=-1)         # (B, D)
    loss = _loss(f_dev, p_dev, alpha, b)
    coef = np.repeat(alpha * f_dev / b, e // n_devices, axis=1)           # (B, E) dL/dP_j = alpha f'_dev(j) / B
    return np.asarray(loss, dtype=s.dtype), BalanceCache(coef, t, None, None, scores.shape, s.dtype)


def comm_balance_forward(scores, idx, n_devices, max_devices, alpha):
    r"""V2 communication balance loss (DeepSeek-V2 eq. 29-31), with M = ``max_devices`` per token.

    .. math:: \mathcal{L}_{\mathrm{CommBal}} = \alpha_3 \sum_{d=1}^{D} f''_d P''_d,\quad
              f''_d = \frac{D}{M T}\sum_t \mathbb{1}(\text{token } t \text{ is sent to device } d),\quad
              P''_d = \sum_{j\in\mathcal{E}_d} P_j

    Shapes: scores (B, T, E) or (T, E), idx (..., K) -> loss (), BalanceCache.
    """
    s, i, _ = _prepare(scores, idx)
    b, t, e = s.shape
    _check_devices(n_devices, e)
    if not 1 <= max_devices <= n_devices:
        raise ValueError(f"max_devices: expected 1..n_devices ({n_devices}), got {max_devices}")
    dev = i // (e // n_devices)                                           # (B, T, K) device of each choice
    sent = np.zeros((b, t, n_devices), dtype=bool)                        # (B, T, D)
    np.put_along_axis(sent, dev, True, axis=-1)
    f_dev = sent.sum(axis=1) * (n_devices / (max_devices * t))            # (B, D)
    p_dev = s.mean(axis=1).reshape(b, n_devices, -1).sum(axis=-1)         # (B, D)
    loss = _loss(f_dev, p_dev, alpha, b)
    coef = np.repeat(alpha * f_dev / b, e // n_devices, axis=1)           # (B, E)
    return np.asarray(loss, dtype=s.dtype), BalanceCache(coef, t, None, None, scores.shape, s.dtype)


def seq_balance_forward(scores, idx, alpha):
    r"""V3 complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20).

    .. math:: \mathcal{L}_{\mathrm{Bal}} = \alpha \sum_{i=1}^{E} f_i P_i,\quad
              f_i = \frac{E}{K T}\sum_t \mathbb{1}(i \in \mathcal{K}_t),\quad
              s'_{i,t} = \frac{s_{i,t}}{\sum_j s_{j,t}},\quad P_i = \frac{1}{T}\sum_t s'_{i,t}

    Eq. 18 writes the indicator with the top-K of the unbiased scores, while the layer routes on
    biased scores; pass whichever ``idx`` you mean (DeepSeek published no V3 training code to
    settle it; :func:`refimpl.moe.layer.moe_forward` reports the routed ``idx``).

    Shapes: scores (B, T, E) or (T, E), idx (..., K) -> loss (), BalanceCache.
    """
    s, i, counts = _prepare(scores, idx)
    b, t, e = s.shape
    k = i.shape[-1]
    f = counts * (e / (k * t))                                            # (B, E)
    denom = s.sum(axis=-1, keepdims=True)                                 # (B, T, 1)
    # a token whose scores all underflowed to 0 (sigmoid of very negative logits) has s' = 0: it
    # adds nothing to P and gets no gradient (0/0 would make the loss NaN)
    norm = s / np.where(denom > 0, denom, 1.0)                            # (B, T, E) s'
    p = norm.mean(axis=1)                                                 # (B, E)
    loss = _loss(f, p, alpha, b)
    return np.asarray(loss, dtype=s.dtype), BalanceCache(alpha * f / b, t, norm, denom, scores.shape, s.dtype)


def balance_backward(dloss, cache):
    r"""Gradient of any balance loss with respect to ``scores`` (the counts :math:`f` are constant).

    Shapes: dloss () -> dscores, shaped like the ``scores`` given to the forward.
    """
    coef, t, norm, denom, shape, dtype = cache
    check_upstream("dloss", dloss, ())
    # forward: L = sum_b sum_i coef[b, i] * P[b, i],  P[b, i] = mean_t x[b, t, i]
    dx = np.broadcast_to(float(dloss) * coef[:, None, :] / t, (coef.shape[0], t, coef.shape[1]))  # (B, T, E)
    if norm is not None:
        # forward: x = s' = s / sum_j s_j     so: ds = (ds' - sum_j ds'_j s'_j) / sum_j s_j
        dx = (dx - np.sum(dx * norm, axis=-1, keepdims=True)) / np.where(denom > 0, denom, 1.0)  # (B, T, E)
        dx = np.where(denom > 0, dx, 0.0)                                 # (B, T, E) all-zero tokens
    return np.array(dx, dtype=dtype).reshape(shape)


def expert_load(idx, n_experts, keep=None):
    """Selections per expert (optionally only the kept copies). Shapes: idx (..., K) -> (E,) int64."""
    n_experts = check_integer("n_experts", n_experts, low=1)
    idx = check_int("idx", idx, low=0, high=n_experts)
    flat = idx.reshape(-1) if keep is None else idx[np.asarray(keep, dtype=bool)]
    return np.bincount(flat, minlength=n_experts).astype(np.int64)


def max_violation(load):
    r"""MaxVio, the imbalance measure of Wang et al. (2024), who introduced the auxiliary-loss-free bias update.

    .. math:: \mathrm{MaxVio} = \frac{\max_i \mathrm{load}_i - \overline{\mathrm{load}}}{\overline{\mathrm{load}}}

    0 for perfect balance; ``E - 1`` when one expert takes everything (with K = 1).
    """
    load = np.asarray(load)
    if load.dtype.kind in "iub":
        load = load.astype(np.float64)                                    # counts
    check_float("load", load, min_ndim=1)
    if load.shape[-1] == 0:
        raise ValueError("load: expected at least one expert, got an empty last axis")
    mean = load.mean(axis=-1)
    return (load.max(axis=-1) - mean) / np.where(mean > 0, mean, 1.0)


def bias_update(bias, load, gamma):
    r"""DeepSeek-V3 auxiliary-loss-free balancing step (§2.1.2), applied outside the gradient.

    .. math:: b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\overline{\mathrm{load}} - \mathrm{load}_i)

    Overloaded experts (above the mean load over the batch) are pushed down by ``gamma``,
    underloaded ones up; an expert exactly at the mean is left alone (the paper does not say;
    this is the natural reading). V3 uses gamma = 0.001 for the first 14.3T tokens, then 0.

    Shapes: bias (E,), load (E,) -> new bias (E,) (a new array, same dtype).
    """
    check_float("bias", bias, ndim=1)
    load = np.asarray(load)
    if load.dtype.kind not in "iuf":
        raise TypeError(f"load: expected numbers (one count per expert), got dtype {load.dtype}")
    load = load.astype(np.float64)
    if load.shape != bias.shape:
        raise ValueError(f"load: expected shape {bias.shape} (one count per expert), got {load.shape}")
    check_float("load", load)
    check_real("gamma", gamma, low=0.0)
    return (bias + gamma * np.sign(load.mean() - load)).astype(bias.dtype)  # (E,)
