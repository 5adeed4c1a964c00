"""Finite-difference gradient checking for hand-written backward passes.

:func:`check_grad` compares a backward pass with central differences of the scalar
:math:`\\langle \\bar y, f(x) \\rangle` in float64, where :math:`\\bar y` is a random upstream
gradient. A random :math:`\\bar y` (never all-ones) matters: with all-ones, a backward that forgets
a term summing to zero across outputs (softmax's, RMSNorm's) still passes.
"""

from __future__ import annotations

import numpy as np

from ..tree import tree_flatten


def _is_float(x):
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)


def _align(grad, like):
    """Reorder dict gradients to the key order of the input tree (missing keys become None)."""
    if isinstance(like, dict):
        if not isinstance(grad, dict):
            return grad
        extra = set(grad) - set(like)
        if extra:
            raise ValueError(f"f: gradient has keys {sorted(extra)} that the input does not")
        return {k: _align(grad.get(k), v) for k, v in like.items()}
    if isinstance(like, list | tuple) and not hasattr(like, "_fields") and isinstance(grad, list | tuple):
        return type(grad)(_align(g, v) for g, v in zip(grad, like, strict=True))
    return grad


def _to64(tree):
    leaves, rebuild = tree_flatten(tree)
    return rebuild([np.array(x, dtype=np.float64) if _is_float(x) else x for x in leaves])


def _second_look(objective, flat, k, eps, num, ana, scale, resolution):
    """Error of one entry, re-measured against the rounding noise of the objective itself.

    Central differences at ``2 eps``, ``3 eps`` and ``7 eps`` differ from the one at ``eps`` by rounding
    noise (which scales as 1/step) plus a truncation term (``~eps**2``, negligible here); their
    spread is the noise of ``num``, invisible from the output's magnitude when the objective is a
    small difference of large intermediates (a cross-entropy of 5e-10 computed as
    ``logsumexp(z) - z_t`` with ``|z| ~ 5``). The error is measured against 1e7 times that spread,
    as the global floor is. If the objective does not move at all (every difference exactly 0:
    a loss of 1e-60 computed as ``61.2 - 61.2``), the entry passes when its analytic gradient is
    too small to move the objective by an ulp of the inputs' scale (``resolution``) over 14 eps.
    """
    old = flat[k]
    nums = [num]
    for h in (2 * eps, 3 * eps, 7 * eps):
        flat[k] = old + h
        fp = objective()
        flat[k] = old - h
        fm = objective()
        flat[k] = old
        nums.append((fp - fm) / (2 * h))
    if not any(nums) and abs(ana) * 14 * eps < resolution:
        return 0.0
    spread = max(abs(v - num) for v in nums)
    return float(abs(ana - num) / max(scale, 1e7 * spread))


def check_grad(f, inputs, *, eps=1e-6, seed=0, max_entries=400, wrt=None, return_details=False):
    """Worst relative error between ``f``'s backward pass and central finite differences.

    Parameters
    ----------
    f : callable
        ``f(*inputs) -> (y, vjp)`` where ``y`` is an array (or a tree of arrays) and
        ``vjp(dy) -> grads`` returns a tuple with one gradient per input, in the inputs' tree structure (``None``
        for inputs without a gradient, e.g. token ids).
    inputs : sequence
        Arrays or trees (dicts/lists) of arrays. Float leaves are cast to float64; integer
        leaves are passed through unchanged and not differentiated.
    eps : float
        Central-difference step.
    seed : int
        Seeds the random upstream gradient and the choice of checked entries.
    max_entries : int
        At most this many entries of each leaf are perturbed (chosen at random); the analytic
        gradient is compared on those entries.
    wrt : sequence of int, optional
        Indices of the inputs to check (default: all).

    Returns
    -------
    float
        ``max_leaf ||g_analytic - g_numeric||_inf / max(||g_numeric||_inf, ||g_analytic||_inf, floor)``
        over the checked entries. ``floor`` is 1e7 times the rounding noise of a central difference,
        ``eps_machine * sum|y * dy| / eps``: a gradient far smaller than the objective (a softmax
        probability of 1e-6, say) cannot be resolved to 1e-6 relative by finite differences, so
        errors are then measured against what can be resolved. An entry whose error exceeds 1e-7
        gets a second look at steps ``2 eps``, ``3 eps`` and ``7 eps``: when the objective is a small
        difference of large numbers its rounding noise exceeds that floor, and the spread of the
        four differences measures it (see ``_second_look``). Absolute errors above ~10x that noise
        still exceed a 1e-6 tolerance. With ``return_details=True``, also a list of
        ``(input_index, leaf_index, error)``.
    """
    rng = np.random.default_rng(seed)
    inputs = [_to64(x) for x in inputs]
    y, vjp = f(*inputs)
    y_leaves, y_rebuild = tree_flatten(y)
    dy_leaves = [rng.standard_normal(np.shape(v)) for v in y_leaves]
    dy_leaves = [np.asarray(d) for d in dy_leaves]
    grads = vjp(y_rebuild(dy_leaves))
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(inputs):
        raise ValueError(f"f: vjp returned {len(grads)} gradients for {len(inputs)} inputs")

    magnitude = sum(float(np.sum(np.abs(np.asarray(v, dtype=np.float64) * d)))
                    for v, d in zip(y_leaves, dy_leaves, strict=True))
    floor = max(1e7 * np.finfo(np.float64).eps * magnitude / eps, 1e-300)

    def objective():
        out, _ = f(*inputs)
        leaves, _ = tree_flatten(out)
        return sum(float(np.sum(np.asarray(v, dtype=np.float64) * d)) for v, d in zip(leaves, dy_leaves,
                                                                                        strict=True))

    # the smallest change of the objective float64 can show at the inputs' scale (see _second_look)
    top = max([float(np.max(np.abs(v))) for x in inputs for v in tree_flatten(x)[0] if _is_float(v) and v.size]
              or [0.0])
    resolution = np.finfo(np.float64).eps * top * sum(float(np.sum(np.abs(d))) for d in dy_leaves)
    worst, details = 0.0, []
    for i in (range(len(inputs)) if wrt is None else wrt):
        x_leaves, _ = tree_flatten(inputs[i])
        g_tree = _align(grads[i], inputs[i])
        g_leaves = tree_flatten(g_tree)[0] if g_tree is not None else [None] * len(x_leaves)
        if len(g_leaves) != len(x_leaves):
            raise ValueError(f"f: gradient for input {i} has {len(g_leaves)} leaves, expected {len(x_leaves)}")
        for j, (x, g) in enumerate(zip(x_leaves, g_leaves, strict=True)):
            if not _is_float(x) or x.size == 0:
                continue
            if g is None:
                g = np.zeros_like(x)
            if np.shape(g) != x.shape:
                raise ValueError(f"f: gradient for input {i} leaf {j} has shape {np.shape(g)}, "
                                 f"expected {x.shape}")
            flat = x.reshape(-1)            # a view: perturbing it perturbs the input in place
            idx = np.arange(flat.size) if flat.size <= max_entries else rng.choice(
                flat.size, max_entries, replace=False)
            num = np.empty(idx.size)
            for n, k in enumerate(idx):
                old = flat[k]
                flat[k] = old + eps
                fp = objective()
                flat[k] = old - eps
                fm = objective()
                flat[k] = old
                num[n] = (fp - fm) / (2 * eps)
            ana = np.asarray(g, dtype=np.float64).reshape(-1)[idx]
            scale = max(np.max(np.abs(num)), np.max(np.abs(ana)), floor)
            errs = np.abs(ana - num) / scale                                 # (entries,)
            for n in np.flatnonzero(errs > 1e-7):   # a second look: is the difference rounding noise?
                errs[n] = _second_look(objective, flat, idx[n], eps, num[n], ana[n], scale, resolution)
            err = float(np.max(errs))
            details.append((i, j, err))
            worst = max(worst, err)
    return (worst, details) if return_details else worst
