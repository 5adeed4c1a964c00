"""Optimisation: AdamW, global gradient-norm clipping and the warmup + cosine schedule.

DeepSeek-V2 and V3 train with AdamW (Loshchilov & Hutter 2019) with β1 = 0.9, β2 = 0.95 and weight
decay 0.1, clip the global gradient norm to 1.0, and warm the learning rate up linearly before a
decay (DeepSeek-V2 §3.1.2; DeepSeek-V3 §4.2, where the decay is cosine). Everything here is a pure
function over nested parameter dicts: the optimizer state is returned, never hidden.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .tree import tree_flatten, tree_map, tree_paths


class AdamWState(NamedTuple):
    step: int
    m: object      # first moments, same tree as the params
    v: object      # second moments, same tree as the params


def adamw_init(params) -> AdamWState:
    """Zero moments for every leaf of ``params``."""
    return AdamWState(0, tree_map(np.zeros_like, params), tree_map(np.zeros_like, params))


def default_decay_mask(path: str, p: np.ndarray) -> bool:
    """Decay matrices only (not norms' gains, biases or the router's correction bias)."""
    return p.ndim >= 2


def adamw_update(params, grads, state, *, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 decay_mask=default_decay_mask):
    r"""One AdamW step with decoupled weight decay, as ``torch.optim.AdamW`` computes it.

    .. math::
        \theta &\leftarrow \theta(1 - \eta\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
                 \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    ``decay_mask(path, param) -> bool`` selects the decayed leaves (default: matrices only; pass
    ``lambda *_: True`` to decay everything as torch does by default).

    Returns ``(new_params, new_state)``; inputs are not modified.
    """
    if not lr >= 0:
        raise ValueError(f"lr: expected a non-negative number, got {lr!r}")
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas: expected values in [0, 1), got {betas!r}")
    p_leaves, rebuild = tree_flatten(params)
    g_leaves, _ = tree_flatten(grads)
    if len(g_leaves) != len(p_leaves):
        raise ValueError(f"grads: expected a tree with {len(p_leaves)} leaves like params, got {len(g_leaves)}")
    m_leaves, _ = tree_flatten(state.m)
    v_leaves, _ = tree_flatten(state.v)
    t = state.step + 1
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    new_p, new_m, new_v = [], [], []
    for path, p, g, m, v in zip(tree_paths(params), p_leaves, g_leaves, m_leaves, v_leaves, strict=True):
        if g.shape != p.shape:
            raise ValueError(f"grads: leaf '{path}' has shape {g.shape}, expected {p.shape}")
        if weight_decay and decay_mask(path, p):
            p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
        new_p.append(p.astype(g.dtype, copy=False))
        new_m.append(m)
        new_v.append(v)
    return rebuild(new_p), AdamWState(t, rebuild(new_m), rebuild(new_v))


def global_grad_norm(grads) -> float:
    r""":math:`\lVert g \rVert_2` over every leaf of the tree."""
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in tree_flatten(grads)[0]))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients by ``max_norm / (norm + 1e-6)`` when that is below 1 (as
    ``torch.nn.utils.clip_grad_norm_``). Returns ``(clipped_grads, norm_before_clipping)``."""
    if not max_norm > 0:
        raise ValueError(f"max_norm: expected a positive number, got {max_norm!r}")
    norm = global_grad_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return grads, norm
    return tree_map(lambda g: g * np.asarray(coef, dtype=g.dtype), grads), norm


def warmup_cosine_lr(step, *, lr, warmup_steps, total_steps, min_lr=0.0, hold_steps=0):
    r"""Linear warmup (``lr * (step + 1) / warmup_steps``, reaching ``lr`` at step ``warmup_steps - 1``),
    an optional constant hold of ``hold_steps``, then a
    cosine decay to ``min_lr`` at ``total_steps`` (the shape of DeepSeek-V3 §4.2's schedule).

    .. math:: \eta(s) = \eta_\min + \tfrac12(\eta - \eta_\min)(1 + \cos(\pi\,p)),\quad
              p = \frac{s - s_w - s_h}{S - s_w - s_h}
    """
    if not (0 <= warmup_steps and 0 <= hold_steps and warmup_steps + hold_steps <= total_steps):
        raise ValueError(f"total_steps: expected >= warmup_steps + hold_steps ({warmup_steps} + {hold_steps}), "
                         f"got {total_steps}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step < warmup_steps + hold_steps:
        return lr
    span = max(total_steps - warmup_steps - hold_steps, 1)
    progress = min((step - warmup_steps - hold_steps) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
