"""Machine facts for the benchmark runner: thread limits, CPU and library versions, GEMM peak.

Split from :mod:`benchmarks.harness` (which re-exports these names). The OpenMP wait policy is set
in :mod:`benchmarks` (the package's ``__init__``) before NumPy, numba or torch can load an OpenMP
runtime; see :func:`openmp_info` and the threading policy in :mod:`refimpl.backend`.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def import_torch():
    """``torch`` if it imports, else None (torch variants are then skipped, not failed)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def blas_info() -> dict:
    info: dict[str, Any] = {}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")
                              if blas.get(k) is not None}
    except Exception as e:  # noqa: BLE001 - numpy's config layout is not a stable API
        info["numpy_blas"] = f"unavailable ({type(e).__name__})"
    info["env"] = {k: os.environ.get(k) for k in BLAS_ENV_VARS}
    return info


@contextmanager
def thread_limits(n: int) -> Iterator[dict]:
    """Run numba, torch and (with threadpoolctl) BLAS with ``n`` threads; restore them after.

    Yields a dict recording what was set. Without threadpoolctl the BLAS pools cannot be changed
    once NumPy is loaded, so the dict says so and shows the environment variables.
    """
    info: dict[str, Any] = {"threads": n}
    restore: list[Callable[[], None]] = []
    try:
        try:
            import numba
        except ImportError:
            info["numba"] = "not installed"
        else:
            if n > numba.config.NUMBA_NUM_THREADS:
                raise ValueError(f"threads: {n} exceeds numba's pool size NUMBA_NUM_THREADS="
                                 f"{numba.config.NUMBA_NUM_THREADS}")
            old = numba.get_num_threads()
            numba.set_num_threads(n)
            restore.append(lambda: numba.set_num_threads(old))
            info["numba"] = numba.get_num_threads()
        torch = import_torch()
        if torch is None:
            info["torch"] = "not installed"
        else:
            old_t = torch.get_num_threads()
            torch.set_num_threads(n)
            restore.append(lambda: torch.set_num_threads(old_t))
            info["torch"] = torch.get_num_threads()
        info["blas"] = blas_info()
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError:
            info["blas"]["threadpoolctl"] = ("not installed: BLAS threads not set in-process; "
                                             "see env (set before NumPy import by benchmarks.run)")
        else:
            limiter = threadpool_limits(limits=n)
            restore.append(limiter.restore_original_limits)
            info["blas"]["threadpoolctl"] = [
                {k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                       "threading_layer", "filepath")} for p in threadpool_info()]
        yield info
    finally:
        for undo in reversed(restore):
            undo()


def openmp_info() -> dict:
    """The OpenMP wait policy in force and the OpenMP runtimes mapped into this process (Linux)."""
    info: dict[str, Any] = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        with open("/proc/self/maps") as f:
            info["runtimes"] = sorted({line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1]})
    except OSError:
        pass
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, library versions and load -- everything needed to read the numbers later."""
    def version(mod):
        try:
            return __import__(mod).__version__
        except ImportError:
            return None
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": version("numba"),
        "torch": version("torch"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "openmp": openmp_info(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
    }
    return info


def git_commit() -> str | None:
    """The measured code's commit (short hash, ``+changes`` when refimpl/ or benchmarks/ differ from it),
    or None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        head = run("rev-parse", "--short=12", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "refimpl", "benchmarks")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def gemm_peak(n: int = 2048, repeats: int = 7, dtype=np.float32) -> dict:
    """Best-of-``repeats`` GFLOP/s of NumPy's ``a @ b`` for (n, n) matrices (2 n^3 FLOPs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=dtype)
    b = rng.standard_normal((n, n), dtype=dtype)
    c = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=c)                                          # warm-up (thread pool start)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {"n": n, "dtype": np.dtype(dtype).name, "repeats": repeats, "best_s": min(times),
            "gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}


def torch_gemm_peak(n: int = 2048, repeats: int = 7) -> dict | None:
    """The same with ``torch.mm`` (for information: torch's BLAS may differ from NumPy's)."""
    torch = import_torch()
    if torch is None:
        return None
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return {"n": n, "repeats": repeats, "best_s": min(times), "gflops": 2.0 * n**3 / min(times) / 1e9}
