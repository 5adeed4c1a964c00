"""Shared data for the GRPO tests: batches whose ratios stay clear of every kink of the loss."""

import numpy as np

from refimpl.rl import group_advantages, logps_entropy_forward

MARGIN = 1e-3  # finite differences must not straddle a clip bound (reference §1.6, ties)


def kinks(loss_type, epsilon, epsilon_high, delta):
    """Ratio values where the loss is not differentiable (or, for cispo, where sg[min] switches)."""
    hi = epsilon if epsilon_high is None else epsilon_high
    if loss_type == "cispo":
        return [hi]
    if loss_type == "sapo":
        return []
    return [1 - epsilon, 1 + hi] + ([] if delta is None else [delta])


def _ratios(logps, old, mask, level):
    lr = np.where(mask, logps - old, 0.0)
    if level == "token":
        return np.exp(lr)[mask]
    n = np.maximum(mask.sum(1), 1)
    return np.exp(lr.sum(1) / n)


def make_batch(rng, *, groups=2, G=2, T=3, V=5, level="token", loss_type="grpo", epsilon=0.2,
               epsilon_high=None, delta=None, spread=0.4, temperature=1.0, token_advantages=False,
               scale=1.0):
    """(logits, ids, old, ref, advantages, mask) with every ratio >= MARGIN away from a kink."""
    B = groups * G
    logits = scale * rng.standard_normal((B, T, V))
    ids = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.8
    mask[0, 0] = True                                   # at least one active token
    if B > 1 and rng.random() < 0.3:
        mask[-1] = False                                # sometimes an empty completion
    logps, _, _ = logps_entropy_forward(logits, ids, temperature=temperature)
    bounds = np.array(kinks(loss_type, epsilon, epsilon_high, delta))
    for _ in range(200):
        old = logps - rng.uniform(-spread, spread, size=(B, T))
        r = _ratios(logps, old, mask, level)
        if bounds.size == 0 or np.min(np.abs(r[:, None] - bounds[None, :])) > MARGIN:
            break
    else:
        raise RuntimeError("could not keep the ratios away from the kinks")
    ref = logps + 0.5 * rng.standard_normal((B, T))
    rewards = rng.integers(0, 3, size=B).astype(np.float64)
    adv, _ = group_advantages(rewards, G)
    if token_advantages:
        adv = rng.standard_normal((B, T))
    return logits, ids, old, ref, adv, mask
