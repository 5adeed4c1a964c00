"""Memory bandwidth of this machine, measured in the same run as the GEMM peak (a STREAM-like test).

Two kernels over float64 arrays far larger than the caches (default 2**24 elements, 128 MiB each):

* copy:  ``c[i] = a[i]``               -- 16 bytes moved per element (one read, one write);
* triad: ``a[i] = b[i] + s * c[i]``    -- 24 bytes per element (two reads, one write).

Each runs in NumPy (``np.copyto``; ``np.multiply`` then ``np.add`` in place, which moves 40 bytes
per element in two passes but is what NumPy code achieves) and in a Numba ``prange`` loop (the
threads of the current numba setting). Bytes are counted as STREAM does (write-allocate reads not
counted), best of ``repeats``. The reference figure for bandwidth-bound benchmarks is the best triad
rate: a case's time divided by ``bytes_moved / bandwidth`` is its multiple of the bytes-moved bound
(1.0 would be perfect streaming; a cache-resident or compute-bound kernel shows much more).
"""

from __future__ import annotations

import time

import numpy as np


def _numba_kernels():
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def copy(a, c):
        for i in prange(a.shape[0]):
            c[i] = a[i]

    @njit(parallel=True, cache=True)
    def triad(a, b, c, s):
        for i in prange(a.shape[0]):
            a[i] = b[i] + s * c[i]
    return copy, triad


def _best(fn, repeats):
    fn()                                                        # warm-up: pages touched, JIT done
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def stream_bandwidth(n: int = 1 << 24, repeats: int = 5) -> dict:
    """GB/s of copy and triad in NumPy and Numba; ``"bandwidth_gbs"`` is the best triad rate."""
    a = np.full(n, 1.0)                                         # (n,) float64
    b = np.full(n, 2.0)
    c = np.full(n, 0.5)
    s = 3.0
    out = {"n": n, "dtype": "float64", "repeats": repeats, "array_MiB": a.nbytes / 2**20}

    def np_triad():
        np.multiply(c, s, out=a)
        np.add(a, b, out=a)
    out["numpy_copy_gbs"] = 16 * n / _best(lambda: np.copyto(c, a), repeats) / 1e9
    out["numpy_triad_gbs"] = 24 * n / _best(np_triad, repeats) / 1e9
    try:
        copy, triad = _numba_kernels()
    except ImportError:
        out["numba"] = "not installed"
    else:
        out["numba_copy_gbs"] = 16 * n / _best(lambda: copy(a, c), repeats) / 1e9
        out["numba_triad_gbs"] = 24 * n / _best(lambda: triad(a, b, c, s), repeats) / 1e9
    out["bandwidth_gbs"] = max(out.get("numba_triad_gbs", 0.0), out["numpy_triad_gbs"])
    return out
