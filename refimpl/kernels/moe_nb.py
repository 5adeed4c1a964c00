"""Numba twins of the MoE routing, dispatch and combine loops (:mod:`refimpl.moe`).

* :func:`select_experts` — per-token group-limited top-k by repeated arg-max, O(K*E) per token
  instead of a full sort; ties go to the lower index, exactly as the NumPy reference's stable
  argsort. Group scores are computed in the input dtype, as in NumPy, so float32 selections match.
* :func:`make_plan` — a counting sort of the (token, slot) copies by expert, O(N*K), in the same
  order as NumPy's stable argsort.
* :func:`dispatch`, :func:`combine`, :func:`combine_backward`, :func:`dispatch_backward` — twins
  of the functions of the same names in :mod:`refimpl.moe.dispatch` (the data movement), looping
  over rows or tokens. Every output row is written by exactly one iteration, so the loops run in
  parallel without atomics. Combine and dispatch backward accumulate over the K slots in slot
  order, two gathered rows per sweep of the output row (the NumPy reference's einsum may sum in
  another order: equal up to rounding). Dispatch and combine backward write their (N*K, D) output
  with streaming stores (:mod:`refimpl.kernels.stream_nb`) when it is larger than the last-level
  cache.

The data-movement kernels write into output arrays the caller allocates with NumPy: NumPy asks the
kernel for transparent huge pages on large allocations and numba's runtime allocator does not, and
first-touch page faults on a freshly allocated (N*K, D) buffer made a kernel-allocated output about
3x slower than ``x[token]`` (measured: 55 ms vs 19 ms for 4096 x 6 rows of 1024 float32).

``fastmath`` is off except in :func:`combine_backward_jit` (the reassociation flags only, so that
the float64 sum of float32 products vectorises). The expert GEMMs stay in
NumPy/BLAS for both backends.

The kernels run in parallel over tokens or rows (``prange``): every output row is written by
exactly one iteration, so there are no races. They used to be serial because numba's OpenMP workers
spin-waited after each region while the next OpenBLAS GEMM needed the cores (4x slower at 2
threads); :mod:`refimpl.backend`'s threading policy (passive wait) removed that.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import stream_nb
from .stream_nb import store_fence, stream_row, stream_scaled_row
from .vecmath_nb import cast_like

#: rows per parallel task of the row-wise kernels (each task ends with one store fence when streaming)
ROWS = 64

#: reassociation only (never nnan/ninf): lets a float64 dot product of float32 rows use vector lanes
REDUCE = {"reassoc", "contract", "arcp", "nsz"}


@njit(cache=True)
def group_scores(sel, t, n_group, per, group_mode, gs):
    """gs[g] = max (mode 1) or sum of the top two (mode 2) of row t's scores in group g."""
    for g in range(n_group):
        base = g * per
        if group_mode == 1:
            m1 = sel[t, base]
            for j in range(1, per):
                m1 = max(m1, sel[t, base + j])
            gs[g] = m1
        else:
            m1 = max(sel[t, base], sel[t, base + 1])
            m2 = min(sel[t, base], sel[t, base + 1])
            for j in range(2, per):
                v = sel[t, base + j]
                if v > m1:
                    m2 = m1
                    m1 = v
                elif v > m2:
                    m2 = v
            gs[g] = m2 + m1


SELECT_BLOCK = 64                   # tokens per parallel task: its scratch buffers are allocated once


@njit(cache=True, parallel=True)
def select_experts_jit(sel, k, n_group, topk_group, group_mode, mask_value):
    """idx (N, k): top-k of each row of sel (N, E) within its best topk_group groups.

    group_mode: 0 no group step, 1 group score = max, 2 group score = sum of the top two. One pass
    over the row keeps a sorted list of the k best (value desc, index asc), so the result equals
    repeated arg-max with ties to the lower index (the NumPy reference's stable sort).
    """
    n, e = sel.shape
    per = e // n_group
    idx = np.empty((n, k), dtype=np.int64)
    mv = cast_like(sel[0, 0], mask_value)
    for blk in prange((n + SELECT_BLOCK - 1) // SELECT_BLOCK):
        gs = np.empty(n_group, dtype=sel.dtype)
        chosen = np.ones(n_group, dtype=np.bool_)
        vals = np.empty(k, dtype=sel.dtype)
        ids = np.empty(k, dtype=np.int64)
        for t in range(blk * SELECT_BLOCK, min((blk + 1) * SELECT_BLOCK, n)):
            if group_mode != 0:
                group_scores(sel, t, n_group, per, group_mode, gs)
                chosen[:] = False
                for _ in range(topk_group):             # repeated arg-max: ties to the lower group
                    best = -1
                    for g in range(n_group):
                        if not chosen[g] and (best < 0 or gs[g] > gs[best]):
                            best = g
                    chosen[best] = True
            c = 0                                       # vals[:c] descending, ties in index order
            full = False
            last = mv                                   # vals[k - 1] once the list is full
            for g in range(n_group):
                keep = chosen[g]
                for j in range(g * per, (g + 1) * per):
                    v = sel[t, j] if keep else mv
                    if full and not v > last:
                        continue                        # the common case: not among the k best
                    i = c - 1 if c < k else k - 2
                    while i >= 0 and vals[i] < v:
                        vals[i + 1] = vals[i]
                        ids[i + 1] = ids[i]
                        i -= 1
                    vals[i + 1] = v
                    ids[i + 1] = j
                    c = min(c + 1, k)
                    full = c == k
                    last = vals[k - 1]
            for r in range(k):
                idx[t, r] = ids[r]
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


@njit(cache=True, parallel=True)
def dispatch_jit(x, token, out, stream):
    """out[r] = x[token[r]]; out (A, D) is preallocated by the caller. ``stream``: write the rows with
    streaming stores (:mod:`refimpl.kernels.stream_nb`), for an output larger than the cache."""
    a = token.shape[0]
    d = x.shape[1]
    if stream:
        for b in prange((a + ROWS - 1) // ROWS):
            for r in range(b * ROWS, min(a, b * ROWS + ROWS)):
                stream_row(out[r], x[token[r]])
            store_fence()                   # this task's rows reach memory before the region ends
    else:
        for r in prange(a):
            src = token[r]
            for j in range(d):
                out[r, j] = x[src, j]
    return out


@njit(inline="always")
def next_kept(pos, t, s):
    """The first slot >= s of token t whose copy was kept (pos >= 0), or K if there is none."""
    k = pos.shape[1]
    while s < k and pos[t, s] < 0:
        s += 1
    return s


@njit(cache=True, parallel=True)
def combine_jit(ys, weights, pos, out):
    """out[n] = sum_k weights[n, k] * ys[pos[n, k]] over kept copies (pos >= 0); out (N, D) preallocated.

    The sum runs in slot order, ``((0 + w0 y0) + w1 y1) + ...``, two copies per sweep of the row:
    the rounding is that of one sweep per copy (fastmath is off, so nothing is fused or
    reordered), but two gathered 4 KiB rows are read side by side. Gathered rows are where this
    kernel's time goes; measured (4096 x 1024, K=6, float32, 2 threads, medians of 20 calls):
    5.3 ms, against 6.5 ms for one row per sweep and 4.1 ms for the same bytes read in memory order.
    """
    n, k = pos.shape
    d = ys.shape[1]
    for t in prange(n):
        for j in range(d):
            out[t, j] = 0.0
        s = next_kept(pos, t, 0)
        while s < k:
            u = next_kept(pos, t, s + 1)
            pa, wa = pos[t, s], weights[t, s]
            if u < k:
                pb, wb = pos[t, u], weights[t, u]
                for j in range(d):
                    out[t, j] = (out[t, j] + wa * ys[pa, j]) + wb * ys[pb, j]
                s = next_kept(pos, t, u + 1)
            else:
                for j in range(d):
                    out[t, j] = out[t, j] + wa * ys[pa, j]
                s = u
    return out


@njit(cache=True, parallel=True, fastmath=REDUCE)
def combine_backward_jit(dy, ys, weights, pos, token, dys, dw, stream):
    """dys[pos[n, k]] = weights[n, k] * dy[n];  dw[n, k] = <dy[n], ys[pos[n, k]]> (0 if dropped).

    dys (A, D) and dw (N, K) are preallocated; the dot products accumulate in float64. The loop
    runs over the sorted rows r, so ys and dys stream in memory order and only the (N, D) dy is
    gathered; each row's slot is found in pos[token[r]] (K entries). Measured (4096 x 1024, K=6,
    float32, reused outputs, one thread, CPU time per call): 11.5 ms, against 14.5 ms with the
    product and the dot product in two loops and ~17 ms for a loop over tokens (which gathers
    the rows of ys and scatters those of dys across 96 MiB, one 4 KiB row at a time).
    ``REDUCE`` is what lets the float64 sum use vector lanes; the only other arithmetic is the
    single product ``w * dy``, which no flag of that set can change. With ``stream`` (an output
    larger than the cache) the product row goes to ``dys`` through streaming stores and the dot
    product takes a second sweep over the two rows (dy's row is then in L1); measured in the
    sequence of the four data-movement kernels (2 threads, medians of 30, three runs): 7.2-10.9 ms
    against 8.7-10.5 ms, a gain within the shared machine's spread (dispatch gains more). Both
    paths give the same bits (tested).
    """
    n, k = pos.shape
    d = ys.shape[1]
    a = token.shape[0]
    for b in prange((a + ROWS - 1) // ROWS):
        for r in range(b * ROWS, min(a, b * ROWS + ROWS)):
            t = token[r]
            s = 0
            for c in range(k):
                if pos[t, c] == r:
                    s = c
            w = weights[t, s]
            acc = 0.0
            if stream:
                stream_scaled_row(dys[r], dy[t], w)                 # dys[r, j] = w * dy[t, j]
                for j in range(d):
                    acc += np.float64(dy[t, j]) * np.float64(ys[r, j])
            else:                                                   # one loop: dy[t] is read once
                for j in range(d):
                    g = dy[t, j]
                    dys[r, j] = w * g
                    acc += np.float64(g) * np.float64(ys[r, j])
            dw[t, s] = acc
        if stream:
            store_fence()
    for t in prange(n):
        for s in range(k):
            if pos[t, s] < 0:
                dw[t, s] = 0.0
    return dys, dw


@njit(cache=True, parallel=True)
def dispatch_backward_jit(dxs, pos, out):
    """out[n] = sum_k dxs[pos[n, k]] over kept copies, in slot order, two copies per sweep of the
    row (as :func:`combine_jit`); out (N, D) preallocated."""
    n, k = pos.shape
    d = dxs.shape[1]
    for t in prange(n):
        for j in range(d):
            out[t, j] = 0.0
        s = next_kept(pos, t, 0)
        while s < k:
            u = next_kept(pos, t, s + 1)
            pa = pos[t, s]
            if u < k:
                pb = pos[t, u]
                for j in range(d):
                    out[t, j] = (out[t, j] + dxs[pa, j]) + dxs[pb, j]
                s = next_kept(pos, t, u + 1)
            else:
                for j in range(d):
                    out[t, j] = out[t, j] + dxs[pa, j]
                s = u
    return out


# ------------------------------------------------------------------ entry points: serial below a size

#: Below this many elements a kernel runs on one thread. A parallel region costs a wake-up and a
#: barrier; on a shared machine the barrier may wait a scheduler time slice for a preempted worker,
#: which dwarfs a kernel of a few hundred microseconds (the quick MoE layer: 256 tokens x 128).
PARALLEL_MIN_WORK = 1 << 18

_SERIAL = {}


def serial_twin(fn):
    """``fn`` (a ``parallel=True`` kernel) compiled once more without ``parallel``: ``prange`` runs
    as ``range`` and no thread pool is touched.

    A parallel kernel called with one thread (``numba.set_num_threads(1)``) still enters the
    parallel scheduler; measured on the quick MoE shapes (1536 rows of 128 float32, one process,
    5000 calls): the dispatch gather took 29-33 us that way, 18-20 us compiled serial, NumPy's
    ``take`` 19-21 us. The copy gets its own name (``<name>_serial``) because numba's on-disk cache
    keys an entry by function name, source line and signature, not by the compile options: under the
    same name the two compilations would load each other's machine code. Same arithmetic in the same
    order, so results are bit-identical to the parallel kernel's (each output row is one iteration).
    """
    twin = _SERIAL.get(fn)
    if twin is None:
        import types

        from numba import njit

        py = fn.py_func
        name = f"{py.__name__}_serial"
        copy = types.FunctionType(py.__code__, py.__globals__, name, py.__defaults__, py.__closure__)
        copy.__qualname__ = name
        copy.__doc__ = py.__doc__
        options = {k: v for k, v in fn.targetoptions.items() if k not in ("parallel", "nopython")}
        twin = _SERIAL[fn] = njit(cache=True, **options)(copy)       # the kernels here all cache
    return twin


def run_sized(fn, work, *args, serial=True):
    """``fn(*args)`` on numba's threads when ``work >= PARALLEL_MIN_WORK``; below it, on one thread:
    ``fn``'s :func:`serial_twin` (``serial=True``) or ``fn`` itself with numba's thread count set to 1.

    ``serial=False`` is for kernels whose serial compilation does not vectorise: LLVM vectorises the
    SwiGLU twins' element loops inside the parallel region's outlined body but not in a plain
    ``njit`` (measured, (1536, 64) float32, per call: forward 369 us serial against 65 us for the
    parallel kernel on one thread, backward 498 against 73). The MoE data-movement kernels take
    the same time either way (17-50 us) and skip the thread-count switch.
    """
    if work >= PARALLEL_MIN_WORK:
        return fn(*args)
    if serial:
        return serial_twin(fn)(*args)
    import numba
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(old)


def select_experts(sel, k, n_group, topk_group, group_mode, mask_value):
    """Runs :func:`select_experts_jit` (see :data:`PARALLEL_MIN_WORK`)."""
    return run_sized(select_experts_jit, sel.size, sel, k, n_group, topk_group, group_mode, mask_value)


def dispatch(x, token, out):
    """Runs :func:`dispatch_jit` (see :data:`PARALLEL_MIN_WORK`), streaming an output of at least
    :data:`refimpl.kernels.stream_nb.STREAM_MIN_BYTES`."""
    return run_sized(dispatch_jit, out.size, x, token, out, out.nbytes >= stream_nb.STREAM_MIN_BYTES)


def combine(ys, weights, pos, out):
    """Runs :func:`combine_jit` (see :data:`PARALLEL_MIN_WORK`)."""
    return run_sized(combine_jit, out.size + ys.size, ys, weights, pos, out)


def combine_backward(dy, ys, weights, pos, token, dys, dw):
    """Runs :func:`combine_backward_jit` (see :data:`PARALLEL_MIN_WORK`), streaming a ``dys`` of at
    least :data:`refimpl.kernels.stream_nb.STREAM_MIN_BYTES`."""
    return run_sized(combine_backward_jit, 2 * dys.size, dy, ys, weights, pos, token, dys, dw,
                     dys.nbytes >= stream_nb.STREAM_MIN_BYTES)


def dispatch_backward(dxs, pos, out):
    """Runs :func:`dispatch_backward_jit` (see :data:`PARALLEL_MIN_WORK`)."""
    return run_sized(dispatch_backward_jit, dxs.size, dxs, pos, out)
