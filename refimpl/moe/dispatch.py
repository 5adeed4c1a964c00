"""Sparse dispatch: permute token copies by expert, one GEMM per expert, weighted combine.

A routed MoE layer sends each token to ``K`` of ``E`` experts. Running every expert on every token
and masking (the dense reference in :mod:`refimpl.testing.naive`) costs ``E/K`` times too much, so
real implementations *dispatch*: the ``N*K`` (token, slot) pairs are sorted by expert id, each
expert multiplies one contiguous block of rows, and the outputs are *combined* back into token
order, weighted by the gate values (DeepSeek-V2 §2.2 eq. 20; the expert-sorted layout is what the
all-to-all of expert parallelism sends, V3 §3.2.2). The bookkeeping is a :class:`DispatchPlan`:
``pos[n, k]`` is the sorted row of token ``n``'s ``k``-th copy (``-1`` if it was dropped), and rows
``offsets[e]:offsets[e+1]`` belong to expert ``e``. Within an expert, rows keep token order.

Both directions are written as *gathers* indexed by ``pos`` (never scatter-adds), so the Numba
twins in :mod:`refimpl.kernels.moe_nb` run over tokens in parallel without races. Optional V2-style
device-level token dropping (:func:`capacity_keep`) decides which copies are dispatched at all.
The four data-movement functions take an optional ``out=`` buffer (validated by :func:`check_out`),
so a training loop can reuse its (A, D) and (N, D) arrays instead of faulting in fresh pages.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_int, check_integer
from ..backend import kernel, resolve_backend
from ..core.activations import SwiGLUCache, swiglu_backward, swiglu_forward
from ..core.linear import active_gemm


class DispatchPlan(NamedTuple):
    """What :func:`make_plan` returns. The data-movement functions check a plan's shapes and index
    bounds (:func:`check_plan`), which is what keeps the Numba twins' unchecked indexing in memory;
    they do not check that a hand-made plan is consistent (``token[pos[n, k]] == n``)."""

    pos: np.ndarray        # (N, K) int64 row of each (token, slot) in the expert-sorted layout, -1 if dropped
    token: np.ndarray      # (A,) int64 source token of each sorted row (A = kept copies)
    offsets: np.ndarray    # (E + 1,) int64 rows offsets[e]:offsets[e+1] belong to expert e


def make_plan(idx, n_experts, keep=None, *, backend=None):
    """Sort the kept (token, slot) copies by expert id (stable: token order within an expert).

    Shapes: idx (N, K) int64, keep (N, K) bool or None -> DispatchPlan.
    """
    n_experts = check_integer("n_experts", n_experts, low=1)
    idx = check_int("idx", idx, low=0, high=n_experts)          # the Numba twin does not bounds-check
    if idx.ndim != 2:
        raise ValueError(f"idx: expected shape (N, K), got {idx.shape}")
    n, k = idx.shape
    keep = np.ones((n, k), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != idx.shape:
        raise ValueError(f"keep: expected shape {idx.shape} (like idx), got {keep.shape}")
    if resolve_backend(backend, work=idx.size) == "numba":
        pos, token, offsets = kernel("moe_nb").make_plan(np.ascontiguousarray(idx), n_experts,
                                                         np.ascontiguousarray(keep))
        return DispatchPlan(pos, token, offsets)
    flat = idx.reshape(-1)                                                # (N*K,)
    slots = np.flatnonzero(keep)                                          # (A,) kept flat slot ids
    order = slots[np.argsort(flat[slots], kind="stable")]                 # (A,) slots sorted by expert
    counts = np.bincount(flat[slots], minlength=n_experts)                # (E,)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)   # (E + 1,)
    pos = np.full(n * k, -1, dtype=np.int64)                              # (N*K,)
    pos[order] = np.arange(order.size)
    return DispatchPlan(pos.reshape(n, k), (order // k).astype(np.int64), offsets)


def check_plan(plan):
    """Raise unless ``plan`` has :class:`DispatchPlan`'s fields with integer arrays of the right
    shapes and every index in bounds: ``pos`` (N, K) in [-1, A), ``token`` (A,) in [0, N)
    (:func:`refimpl._validate.check_int`: TypeError for a non-integer array, ValueError otherwise).

    A pass over the plan's N*K + A integers (tens of microseconds at 4096 x 6), so each
    data-movement call can afford it; the Numba twins index without bounds checks, and NumPy's
    gathers would wrap a negative index or clip (``np.take(mode="clip")``) instead of failing.
    """
    if not (isinstance(plan, tuple) and len(plan) == 3):
        raise ValueError(f"plan: expected a DispatchPlan (pos, token, offsets), got {type(plan).__name__}")
    pos, token, _ = plan
    if np.ndim(pos) != 2 or np.ndim(token) != 1:
        raise ValueError(f"plan: expected pos (N, K) and token (A,), got shapes {np.shape(pos)} and {np.shape(token)}")
    check_int("plan.pos", pos, low=-1, high=np.shape(token)[0])
    check_int("plan.token", token, low=0, high=np.shape(pos)[0])


def _rows(name, a, n, what):
    """Shape guard: the Numba twins index without bounds checks."""
    if np.ndim(a) != 2 or a.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n}, D) ({what}), got {np.shape(a)}")


def check_out(name, out, shape, dtype, inputs):
    """Validate ``out``, a caller's buffer for a result (None passes): right shape and dtype,
    C-contiguous, writeable, and not overlapping any of ``inputs`` (the kernels read while they write)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array or None, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name}: expected shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got {out.shape} {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name}: expected a writeable C-contiguous array")
    if any(a is not None and np.may_share_memory(out, a) for a in inputs):
        raise ValueError(f"{name}: must not overlap the inputs")
    return out


def dispatch(x, plan, *, backend=None, out=None):
    """Copy each token's row to its sorted positions: ``xs[r] = x[token[r]]``. Shapes: x (N, D) -> (A, D).

    ``out``: an (A, D) array of x's dtype to write the result into (e.g. reused from the previous
    step, which saves the first-touch page faults of a fresh buffer), or None for a new array.
    """
    check_plan(plan)
    _rows("x", x, plan.pos.shape[0], "N tokens of the plan")
    shape = (plan.token.size, x.shape[1])
    out = check_out("out", out, shape, x.dtype, (x, *plan))
    if resolve_backend(backend, work=x.size) == "numba":
        out = np.empty(shape, dtype=x.dtype) if out is None else out      # (A, D)
        return kernel("moe_nb").dispatch(np.ascontiguousarray(x), plan.token, out)
    if out is None:
        return x[plan.token]                                              # (A, D)
    # the same gather written into out; plan rows are in range, and mode="raise" would gather into
    # a temporary first
    return np.take(x, plan.token, axis=0, out=out, mode="clip")           # (A, D)


def dispatch_backward(dxs, plan, *, backend=None, out=None):
    """Gradient of :func:`dispatch`: each token sums the gradients of its copies. (A, D) -> (N, D).

    ``out``: an (N, D) array of dxs's dtype for the result, or None (see :func:`dispatch`).
    """
    check_plan(plan)
    _rows("dxs", dxs, plan.token.size, "A kept copies of the plan")
    shape = (plan.pos.shape[0], dxs.shape[1])
    out = check_out("out", out, shape, dxs.dtype, (dxs, *plan))
    if resolve_backend(backend, work=dxs.size) == "numba":
        out = np.empty(shape, dtype=dxs.dtype) if out is None else out    # (N, D)
        return kernel("moe_nb").dispatch_backward(np.ascontiguousarray(dxs), plan.pos, out)
    # forward: xs[pos[n, k]] = x[n]       so: dx[n] = sum_k dxs[pos[n, k]] over kept copies
    valid = plan.pos >= 0                                                 # (N, K)
    g = dxs[np.where(valid, plan.pos, 0)]                                 # (N, K, D)
    return np.einsum("nk,nkd->nd", valid.astype(dxs.dtype), g, out=out)  # (N, D)


def combine(ys, weights, plan, *, backend=None, out=None):
    r"""Weighted sum of each token's expert outputs: :math:`y_n = \sum_k g_{n,k}\, ys[pos_{n,k}]`.

    Dropped copies contribute nothing. Shapes: ys (A, D), weights (N, K) -> y (N, D).
    ``out``: an (N, D) array of ys's dtype for the result, or None (see :func:`dispatch`).
    """
    check_plan(plan)
    _rows("ys", ys, plan.token.size, "A kept copies of the plan")
    if np.shape(weights) != plan.pos.shape:
        raise ValueError(f"weights: expected shape {plan.pos.shape} (N, K), got {np.shape(weights)}")
    shape = (plan.pos.shape[0], ys.shape[1])
    out = check_out("out", out, shape, ys.dtype, (ys, weights, *plan))
    if resolve_backend(backend, work=ys.size) == "numba":
        out = np.empty(shape, dtype=ys.dtype) if out is None else out     # (N, D)
        return kernel("moe_nb").combine(np.ascontiguousarray(ys), np.ascontiguousarray(weights, dtype=ys.dtype),
                                        plan.pos, out)
    valid = plan.pos >= 0                                                 # (N, K)
    g = ys[np.where(valid, plan.pos, 0)]                                  # (N, K, D)
    return np.einsum("nk,nkd->nd", np.where(valid, weights, 0.0).astype(ys.dtype), g, out=out)  # (N, D)


def combine_backward(dy, ys, weights, plan, *, backend=None, out=None):
    """Gradients of :func:`combine`. Shapes: dy (N, D) -> dys (A, D), dweights (N, K) (0 where dropped).

    ``out``: a pair ``(dys, dweights)`` of arrays to write the results into (dtypes of ys and of
    weights), or None (see :func:`dispatch`).
    """
    check_plan(plan)
    _rows("dy", dy, plan.pos.shape[0], "N tokens of the plan")
    _rows("ys", ys, plan.token.size, "A kept copies of the plan")
    if out is not None and (not isinstance(out, tuple | list) or len(out) != 2):
        raise ValueError(f"out: expected a pair (dys, dweights) or None, got {type(out).__name__}")
    dys, dw = (None, None) if out is None else out
    wdtype = np.asarray(weights).dtype
    check_out("out[0] (dys)", dys, ys.shape, ys.dtype, (dy, ys, weights, *plan))
    check_out("out[1] (dweights)", dw, plan.pos.shape, wdtype, (dy, ys, weights, *plan, dys))
    dys = np.empty_like(ys) if dys is None else dys                       # (A, D)
    dw = np.empty(plan.pos.shape, dtype=wdtype) if dw is None else dw     # (N, K)
    if resolve_backend(backend, work=ys.size) == "numba":
        return kernel("moe_nb").combine_backward(np.ascontiguousarray(dy), np.ascontiguousarray(ys),
                                                 np.ascontiguousarray(weights), plan.pos, plan.token, dys, dw)
    valid = plan.pos >= 0                                                 # (N, K)
    p = np.where(valid, plan.pos, 0)                                      # (N, K)
    # forward: y[n] = sum_k w[n, k] * ys[pos[n, k]]
    # so: dw[n, k] = <dy[n], ys[pos[n, k]]>   and   dys[pos[n, k]] = w[n, k] * dy[n]
    dw[...] = np.einsum("nd,nkd->nk", dy, ys[p]) * valid                  # (N, K)
    dys[plan.pos[valid]] = (weights[..., None] * dy[:, None, :])[valid]   # every row is one kept copy
    return dys, dw


class ExpertsCache(NamedTuple):
    xs: np.ndarray         # (A, D) dispatched rows
    experts: dict          # stacked weights: gate_proj (E, I, D), up_proj (E, I, D), down_proj (E, D, I)
    offsets: np.ndarray    # (E + 1,)
    act: object            # SwiGLUCache over all rows: gate (A, I), up (A, I), sig (A, I)
    h: np.ndarray          # (A, I) silu(gate) * up
    gemms: tuple | None = None  # low-precision GEMM providers of (gate, up, down), or None


def experts_forward(xs, experts, offsets, *, backend=None):
    r"""Every routed expert's SwiGLU FFN on its block of rows: one GEMM per expert and projection.

    .. math:: \mathrm{FFN}_e(u) = W_2^{(e)}\bigl(\mathrm{silu}(W_1^{(e)} u) \odot W_3^{(e)} u\bigr)

    ``experts`` holds the stacked HF projections ``gate_proj`` (E, I, D), ``up_proj`` (E, I, D),
    ``down_proj`` (E, D, I). Under a low-precision hook (:func:`refimpl.quant.fp8_autocast`, via
    :func:`refimpl.core.linear.active_gemm` on each stacked array) the per-expert GEMMs, forward and
    backward, go through the hook like any linear layer's.

    ``backend``: ``"numba"`` (or ``"auto"``) computes the SwiGLU between the GEMMs with the fused
    twin :mod:`refimpl.kernels.activations_nb` (float32 only: with libm's scalar float64 ``exp`` the
    twin did not beat NumPy, so float64 stays on the reference); the backward follows the forward's
    choice. ``None`` is ``REFIMPL_BACKEND`` if set, else ``"numpy"``, not the package's ``"auto"``:
    :func:`refimpl.moe.moe_forward` passes its own ``backend`` through unresolved, and with its
    default the MoE layer's rounding, which the book's experiments depend on, stays the reference's
    (:mod:`refimpl.backend`, "Sites whose default is the reference").
    Shapes: xs (A, D), offsets (E + 1,) -> ys (A, D), ExpertsCache.
    """
    wg, wu, wd = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    gemms = tuple(active_gemm(w) for w in (wg, wu, wd))
    if any(g is not None for g in gemms):
        return _experts_forward_hooked(xs, experts, offsets, gemms)
    a, n_inter = xs.shape[0], wg.shape[1]
    gate = np.empty((a, n_inter), dtype=xs.dtype)                         # (A, I)
    up = np.empty((a, n_inter), dtype=xs.dtype)                           # (A, I)
    blocks = [(e, offsets[e], offsets[e + 1]) for e in range(wg.shape[0]) if offsets[e + 1] > offsets[e]]
    for e, r0, r1 in blocks:
        np.matmul(xs[r0:r1], wg[e].T, out=gate[r0:r1])                    # (n_e, I)
        np.matmul(xs[r0:r1], wu[e].T, out=up[r0:r1])                      # (n_e, I)
    if xs.dtype == np.float32 and resolve_backend(backend, work=gate.size, default="numpy") == "numba":
        h = kernel("activations_nb").swiglu(gate, up)                     # (A, I) fused, one pass
        act = SwiGLUCache(gate, up, None)         # no sig: the twin's backward recomputes it
    else:
        h, act = swiglu_forward(gate, up)                                 # (A, I)
    ys = np.empty((a, wd.shape[1]), dtype=xs.dtype)                       # (A, D)
    for e, r0, r1 in blocks:
        np.matmul(h[r0:r1], wd[e].T, out=ys[r0:r1])                       # (n_e, D)
    return ys, ExpertsCache(xs, experts, offsets, act, h)


def experts_backward(dys, cache):
    """Gradients of :func:`experts_forward`: dxs (A, D) and the stacked weight gradients."""
    if cache.gemms is not None:
        return _experts_backward_hooked(dys, cache)
    xs, experts, offsets, act, h, _ = cache
    wg, wu, wd = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    blocks = [(e, offsets[e], offsets[e + 1]) for e in range(wg.shape[0]) if offsets[e + 1] > offsets[e]]
    dwg, dwu, dwd = np.empty_like(wg), np.empty_like(wu), np.empty_like(wd)  # (E, I, D) x2, (E, D, I)
    idle = np.flatnonzero(np.diff(offsets) == 0)                          # experts that got no rows
    dwg[idle], dwu[idle], dwd[idle] = 0.0, 0.0, 0.0
    dh = np.empty_like(h)                                                 # (A, I)
    for e, r0, r1 in blocks:
        # forward: ys_e = h_e @ wd[e].T
        np.matmul(dys[r0:r1], wd[e], out=dh[r0:r1])                       # (n_e, I)
        np.matmul(dys[r0:r1].T, h[r0:r1], out=dwd[e])                     # (D, I)
    # forward: h = silu(gate) * up
    if act.sig is None:                                                   # made by the Numba twin
        dgate, dup = kernel("activations_nb").swiglu_grad(dh, act.gate, act.up)  # (A, I)
    else:
        dgate, dup = swiglu_backward(dh, act)                             # (A, I)
    dxs = np.empty_like(xs)                                               # (A, D)
    for e, r0, r1 in blocks:
        # forward: gate_e = xs_e @ wg[e].T,  up_e = xs_e @ wu[e].T
        np.matmul(dgate[r0:r1].T, xs[r0:r1], out=dwg[e])                  # (I, D)
        np.matmul(dup[r0:r1].T, xs[r0:r1], out=dwu[e])                    # (I, D)
        np.matmul(dgate[r0:r1], wg[e], out=dxs[r0:r1])                    # (n_e, D)
        dxs[r0:r1] += dup[r0:r1] @ wu[e]                                  # (n_e, D)
    return dxs, {"gate_proj": dwg, "up_proj": dwu, "down_proj": dwd}


def _gemm(gemm, kind, a, b):
    """One product through a hook, or plainly when ``gemm`` is None (a projection not hooked)."""
    if gemm is not None:
        return getattr(gemm, kind)(a, b)
    return {"fprop": lambda: a @ b.T, "dgrad": lambda: a @ b, "wgrad": lambda: a.T @ b}[kind]()


def _experts_forward_hooked(xs, experts, offsets, gemms):
    """:func:`experts_forward` with each expert's three GEMMs through the low-precision hook."""
    wg, wu, wd = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    gg, gu, gd = gemms
    a, n_inter = xs.shape[0], wg.shape[1]
    gate = np.empty((a, n_inter), dtype=xs.dtype)                         # (A, I)
    up = np.empty((a, n_inter), dtype=xs.dtype)                           # (A, I)
    blocks = [(e, offsets[e], offsets[e + 1]) for e in range(wg.shape[0]) if offsets[e + 1] > offsets[e]]
    for e, r0, r1 in blocks:
        gate[r0:r1] = _gemm(gg, "fprop", xs[r0:r1], wg[e])                # (n_e, I)
        up[r0:r1] = _gemm(gu, "fprop", xs[r0:r1], wu[e])                  # (n_e, I)
    h, act = swiglu_forward(gate, up)                                     # (A, I)
    ys = np.empty((a, wd.shape[1]), dtype=xs.dtype)                       # (A, D)
    for e, r0, r1 in blocks:
        ys[r0:r1] = _gemm(gd, "fprop", h[r0:r1], wd[e])                   # (n_e, D)
    return ys, ExpertsCache(xs, experts, offsets, act, h, gemms)


def _experts_backward_hooked(dys, cache):
    """:func:`experts_backward` with the Dgrad and Wgrad GEMMs through the cached hooks."""
    xs, experts, offsets, act, h, (gg, gu, gd) = cache
    wg, wu, wd = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    blocks = [(e, offsets[e], offsets[e + 1]) for e in range(wg.shape[0]) if offsets[e + 1] > offsets[e]]
    dwg, dwu, dwd = np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wd)  # (E, I, D) x2, (E, D, I)
    dh = np.empty_like(h)                                                 # (A, I)
    for e, r0, r1 in blocks:
        # forward: ys_e = h_e @ wd[e].T
        dh[r0:r1] = _gemm(gd, "dgrad", dys[r0:r1], wd[e])                 # (n_e, I)
        dwd[e] = _gemm(gd, "wgrad", dys[r0:r1], h[r0:r1])                 # (D, I)
    # forward: h = silu(gate) * up
    dgate, dup = swiglu_backward(dh, act)                                 # (A, I)
    dxs = np.empty_like(xs)                                               # (A, D)
    for e, r0, r1 in blocks:
        # forward: gate_e = xs_e @ wg[e].T,  up_e = xs_e @ wu[e].T
        dwg[e] = _gemm(gg, "wgrad", dgate[r0:r1], xs[r0:r1])              # (I, D)
        dwu[e] = _gemm(gu, "wgrad", dup[r0:r1], xs[r0:r1])                # (I, D)
        dxs[r0:r1] = _gemm(gg, "dgrad", dgate[r0:r1], wg[e]) + _gemm(gu, "dgrad", dup[r0:r1], wu[e])  # (n_e, D)
    return dxs, {"gate_proj": dwg, "up_proj": dwu, "down_proj": dwd}


def capacity_keep(idx, affinity, n_experts, n_devices, capacity_factor):
    r"""DeepSeek-V2 device-level token dropping (§2.2.4): which (token, slot) copies are computed.

    Experts are placed on ``n_devices`` devices in contiguous blocks. Each device computes at most
    :math:`C = \lceil \text{capacity\_factor}\cdot NK / \text{n\_devices}\rceil` copies (the average
    budget times the factor); beyond that, the copies with the lowest affinity on that device are
    dropped (ties: the later token is dropped). A dropped copy contributes nothing to its token's
    output; the residual connection carries the token. V2 drops only in training and keeps about
    10% of sequences undropped; V3 never drops (§2.1.2). This function decides for every token.

    Shapes: idx (N, K), affinity (N, K) -> keep (N, K) bool, info dict.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if capacity_factor is None or not capacity_factor > 0:
        raise ValueError(f"capacity_factor: expected a positive number, got {capacity_factor!r}")
    if n_devices < 1 or n_experts % n_devices:
        raise ValueError(f"n_devices: expected a divisor of the {n_experts} experts, got {n_devices}")
    if np.shape(affinity) != idx.shape:
        raise ValueError(f"affinity: expected shape {idx.shape} (like idx), got {np.shape(affinity)}")
    n, k = idx.shape
    dev = (idx // (n_experts // n_devices)).reshape(-1)                   # (N*K,) device of each copy
    cap = int(np.ceil(capacity_factor * n * k / n_devices))
    order = np.lexsort((np.arange(n * k), -np.asarray(affinity, dtype=np.float64).reshape(-1), dev))  # (N*K,)
    counts = np.bincount(dev, minlength=n_devices)                        # (n_devices,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])                # (n_devices,)
    rank = np.empty(n * k, dtype=np.int64)                                # (N*K,) rank within device
    rank[order] = np.arange(n * k) - np.repeat(starts, counts)
    keep = (rank < cap).reshape(n, k)                                     # (N, K)
    dropped_dev = np.bincount(dev[~keep.reshape(-1)], minlength=n_devices)  # (n_devices,)
    info = {"capacity": cap, "dropped": int(dropped_dev.sum()), "drop_fraction": float(dropped_dev.sum()) / (n * k),
            "device_load": counts, "device_dropped": dropped_dev,
            "tokens_fully_dropped": int(np.sum(~keep.any(axis=1)))}
    return keep, info
