"""Numba twins of the MoE routing, dispatch and combine loops (:mod:`refimpl.moe`).

* :func:`select_experts` — per-token group-limited top-k by repeated arg-max, O(K*E) per token
  instead of a full sort; ties go to the lower index, exactly as the NumPy reference's stable
  argsort. Group scores are computed in the input dtype, as in NumPy, so float32 selections match.
* :func:`make_plan` — a counting sort of the (token, slot) copies by expert, O(N*K), in the same
  order as NumPy's stable argsort.
* :func:`gather_rows`, :func:`combine`, :func:`combine_backward`, :func:`gather_sum` — the data
  movement of dispatch and combine, looping over rows or tokens. Every output row is written by
  exactly one iteration, so the loops could run in parallel without atomics. Combine accumulates
  over the K slots in slot order (the NumPy reference's einsum may sum in another order: equal up
  to rounding).

The data-movement kernels write into output arrays the caller allocates with NumPy: NumPy asks the
kernel for transparent huge pages on large allocations and numba's runtime allocator does not, and
first-touch page faults on a freshly allocated (N*K, D) buffer made a kernel-allocated output about
3x slower than ``x[token]`` (measured: 55 ms vs 19 ms for 4096 x 6 rows of 1024 float32).

``fastmath`` is off. The expert GEMMs stay in NumPy/BLAS for both backends.

The kernels are deliberately serial (no ``parallel=True``). numba's OpenMP workers spin-wait after
a parallel region, and in the MoE layer every kernel is followed by OpenBLAS GEMMs that then
compete with the spinning workers for the same cores. On a 2-core machine this made the tiny
benchmark layer 4x slower (22 ms vs 5 ms) and cancelled the Numba gain at full size (2.56 s vs
2.30 s serial), unless ``OMP_WAIT_POLICY=passive`` was set. The loops are memory-bound, so one
thread already gets most of the bandwidth.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def select_experts(sel, k, n_group, topk_group, group_mode, mask_value):
    """idx (N, k): top-k of each row of sel (N, E) within its best topk_group groups.

    group_mode: 0 no group step, 1 group score = max, 2 group score = sum of the top two.
    """
    n, e = sel.shape
    per = e // n_group
    idx = np.empty((n, k), dtype=np.int64)
    for t in range(n):
        row = sel[t].copy()
        if group_mode != 0:
            gs = np.empty(n_group, dtype=sel.dtype)
            for g in range(n_group):
                base = g * per
                if group_mode == 1:
                    m1 = row[base]
                    for j in range(1, per):
                        if row[base + j] > m1:
                            m1 = row[base + j]
                    gs[g] = m1
                else:
                    m1 = max(row[base], row[base + 1])
                    m2 = min(row[base], row[base + 1])
                    for j in range(2, per):
                        v = row[base + j]
                        if v > m1:
                            m2 = m1
                            m1 = v
                        elif v > m2:
                            m2 = v
                    gs[g] = m2 + m1
            chosen = np.zeros(n_group, dtype=np.bool_)
            for _ in range(topk_group):
                best = -1
                for g in range(n_group):
                    if not chosen[g] and (best < 0 or gs[g] > gs[best]):
                        best = g
                chosen[best] = True
            for g in range(n_group):
                if not chosen[g]:
                    for j in range(per):
                        row[g * per + j] = mask_value
        taken = np.zeros(e, dtype=np.bool_)
        for r in range(k):
            best = -1
            for j in range(e):
                if not taken[j] and (best < 0 or row[j] > row[best]):
                    best = j
            taken[best] = True
            idx[t, r] = best
    return idx


@njit(cache=True)
def make_plan(idx, n_experts, keep):
    """Counting sort of kept copies by expert: pos (N, K), token (A,), offsets (E + 1,)."""
    n, k = idx.shape
    counts = np.zeros(n_experts, dtype=np.int64)
    for t in range(n):
        for s in range(k):
            if keep[t, s]:
                counts[idx[t, s]] += 1
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    for e in range(n_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    fill = offsets[:-1].copy()
    token = np.empty(offsets[n_experts], dtype=np.int64)
    pos = np.full((n, k), -1, dtype=np.int64)
    for t in range(n):
        for s in range(k):
            if keep[t, s]:
                e = idx[t, s]
                r = fill[e]
                fill[e] = r + 1
                pos[t, s] = r
                token[r] = t
    return pos, token, offsets


@njit(cache=True)
def gather_rows(x, token, out):
    """out[r] = x[token[r]]; out (A, D) is preallocated by the caller."""
    d = x.shape[1]
    for r in range(token.shape[0]):
        src = token[r]
        for j in range(d):
            out[r, j] = x[src, j]
    return out


@njit(cache=True)
def combine(ys, weights, pos, out):
    """out[n] = sum_k weights[n, k] * ys[pos[n, k]] over kept copies (pos >= 0); out (N, D) preallocated."""
    n, k = pos.shape
    d = ys.shape[1]
    for t in range(n):
        for j in range(d):
            out[t, j] = 0.0
        for s in range(k):
            p = pos[t, s]
            if p >= 0:
                w = weights[t, s]
                for j in range(d):
                    out[t, j] += w * ys[p, j]
    return out


@njit(cache=True)
def combine_backward(dy, ys, weights, pos, dys, dw):
    """dys[pos[n, k]] = weights[n, k] * dy[n];  dw[n, k] = <dy[n], ys[pos[n, k]]> (0 if dropped).

    dys (A, D) and dw (N, K) are preallocated; the dot products accumulate in float64.
    """
    n, k = pos.shape
    d = ys.shape[1]
    for t in range(n):
        for s in range(k):
            p = pos[t, s]
            if p < 0:
                dw[t, s] = 0.0
                continue
            w = weights[t, s]
            for j in range(d):
                dys[p, j] = w * dy[t, j]
            acc = 0.0
            for j in range(d):
                acc += dy[t, j] * ys[p, j]
            dw[t, s] = acc
    return dys, dw


@njit(cache=True)
def gather_sum(dxs, pos, out):
    """out[n] = sum_k dxs[pos[n, k]] over kept copies; out (N, D) preallocated."""
    n, k = pos.shape
    d = dxs.shape[1]
    for t in range(n):
        for j in range(d):
            out[t, j] = 0.0
        for s in range(k):
            p = pos[t, s]
            if p >= 0:
                for j in range(d):
                    out[t, j] += dxs[p, j]
    return out
