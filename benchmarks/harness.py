"""Side-by-side benchmark harness: refimpl-NumPy vs refimpl-Numba vs PyTorch CPU in one process.

A benchmark module (``benchmarks/bench_<area>.py``) registers *factories* with :func:`register`.
A factory takes ``quick`` (smaller shapes for a smoke run) and returns a :class:`Case`: the shapes,
one zero-argument callable per variant that runs the same computation on the same data, and a
check that the variants agree. The runner (:func:`run_case`)

1. calls every variant once and times that *first call* apart (it includes Numba JIT compilation,
   or loading the machine code from numba's cache, and torch's lazy initialisation);
2. runs the case's ``check`` on the first-call outputs and raises :class:`MismatchError` if the
   variants disagree -- nothing more runs for such a case -- then runs ``warmup`` more calls
   per variant, also timed apart;
3. times ``repeats`` rounds with :func:`time.perf_counter`, each round running every variant
   ``number`` times in turn (round-robin, so slow drift of a shared machine hits all variants
   alike; ``number`` is calibrated per variant so that one round lasts at least ``min_time``),
   with the garbage collector off, and keeps the per-call time of every round;
4. reports best and median per-call times, speed-up ratios (computed from the best times), the
   fraction of the machine's measured float32 GEMM peak when the case declares its FLOP count,
   and, when the case asks for it, the peak traced memory of NumPy variants (tracemalloc sees
   NumPy's allocations but not Numba's NRT or torch's allocator, so those are reported as not
   measured rather than as a wrong number), and per call the process's user and system CPU time
   and minor page faults (system time is where first-touch faults on fresh temporaries go).

All variants run under the same thread count (:func:`benchmarks.machine.thread_limits` sets numba's
and torch's, and the BLAS pools' when threadpoolctl is installed; otherwise ``benchmarks.run`` sets
the BLAS environment variables before NumPy is imported). Machine measurements (GEMM peak, thread
limits, machine information) live in :mod:`benchmarks.machine`, the bandwidth in
:mod:`benchmarks.bandwidth`.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .machine import (  # noqa: F401  (re-exported: the runner and the bench modules use them from here)
    BLAS_ENV_VARS,
    gemm_peak,
    import_torch,
    machine_info,
    thread_limits,
    torch_gemm_peak,
)

# Canonical variant names. Other names are allowed (e.g. "refimpl-numpy-chunked") with an explicit kind.
NUMPY, NUMBA, TORCH = "refimpl-numpy", "refimpl-numba", "torch"
KINDS = {NUMPY: "numpy", NUMBA: "numba", TORCH: "torch"}
# (a, b): the ratio "a vs b" is time(b) / time(a), i.e. the speed-up of a over b (> 1: a is faster).
RATIO_PAIRS = ((NUMBA, NUMPY), (NUMBA, TORCH), (NUMPY, TORCH))
MEMORY_NOTE = "not measured: tracemalloc does not see numba (NRT) or torch allocations"


class MismatchError(AssertionError):
    """Raised when the variants of a case do not agree numerically (nothing is timed then)."""


# ----------------------------------------------------------------------------------------------
# Cases and the registry
# ----------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    fn: Callable[[], Any]
    kind: str                      # "numpy", "numba", "torch" or "other"
    jit: tuple = ()                # numba dispatchers whose compile/cache stats to report


@dataclass
class Case:
    """One computation at one set of shapes, with one callable per variant.

    ``flops``: FLOPs of one call, for GEMM-bound work (gives GFLOP/s and the fraction of the
    measured GEMM peak). ``bytes_moved``: the least memory traffic of one call, for bandwidth-bound
    work (gives the time as a multiple of ``bytes_moved`` / measured bandwidth).
    ``measure_memory``: report tracemalloc peaks for NumPy variants.
    ``check(outputs)``: receives ``{variant name: first-call output}`` for all variants and raises
    (e.g. with :func:`assert_outputs_close`) if they disagree. All first-call outputs are alive at
    once: mind the memory of GiB-sized outputs.
    """

    params: dict
    description: str = ""
    flops: float | None = None
    bytes_moved: float | None = None
    measure_memory: bool = False
    check: Callable[[dict[str, Any]], None] | None = None
    variants: dict[str, Variant] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, fn: Callable[[], Any], *, kind: str | None = None, jit=()) -> None:
        """Register variant ``name``; ``fn()`` runs one call and returns what ``check`` compares."""
        if name in self.variants:
            raise ValueError(f"name: variant {name!r} is already registered")
        kind = kind or KINDS.get(name)
        if kind is None:
            raise ValueError(f"kind: variant {name!r} is not one of {sorted(KINDS)}; pass kind= "
                             f"('numpy', 'numba', 'torch' or 'other')")
        self.variants[name] = Variant(name, fn, kind, tuple(jit))

    def skip(self, name: str, reason: str) -> None:
        """Record that variant ``name`` is not run here, and why (e.g. torch not installed)."""
        self.skipped[name] = reason


Factory = Callable[[bool], Case]


class Registry:
    """Benchmark name -> factory. Factories run only when their benchmark is selected."""

    def __init__(self) -> None:
        self.factories: dict[str, Factory] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """Decorator: ``@register("area/what")`` on ``def factory(quick: bool) -> Case``."""
        def deco(factory: Factory) -> Factory:
            old = self.factories.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (
                    factory.__module__, factory.__qualname__):
                raise ValueError(f"name: benchmark {name!r} is already registered by "
                                 f"{old.__module__}.{old.__qualname__}")
            self.factories[name] = factory
            return factory
        return deco

    def select(self, selectors: list[str] | None = None) -> list[str]:
        """Names matching any selector (substring, or fnmatch pattern if it has * ? or [)."""
        from fnmatch import fnmatch
        names = sorted(self.factories)
        if not selectors:
            return names
        def hit(name, s):
            return fnmatch(name, s) if any(c in s for c in "*?[") else s in name
        return [n for n in names if any(hit(n, s) for s in selectors)]


REGISTRY = Registry()
register = REGISTRY.register


# ----------------------------------------------------------------------------------------------
# Numerical agreement
# ----------------------------------------------------------------------------------------------

def to_numpy(x) -> Any:
    """Convert torch tensors (also inside tuples/lists) to NumPy arrays; leave the rest alone."""
    if isinstance(x, tuple | list):
        return type(x)(to_numpy(y) for y in x)
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return x


def assert_outputs_close(outputs: dict[str, Any], *, reference: str = NUMPY, rtol: float,
                         atol_scale: float = 0.0, labels: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MismatchError` unless every variant's output matches ``reference``'s.

    Outputs are arrays or tuples of arrays (torch tensors are converted). Element ``k`` of a
    variant passes when ``|x - r| <= rtol * |r| + atol_scale * max|r|`` elementwise -- the
    absolute part is scaled by the reference's magnitude so that it stays meaningful for tiny
    values such as a mean-reduced gradient (~1 / (N V)).
    """
    if reference not in outputs:
        raise ValueError(f"reference: {reference!r} is not among the variants {sorted(outputs)}")
    ref = to_numpy(outputs[reference])
    ref = ref if isinstance(ref, tuple | list) else (ref,)
    for name, out in outputs.items():
        if name == reference:
            continue
        out = to_numpy(out)
        out = out if isinstance(out, tuple | list) else (out,)
        if len(out) != len(ref):
            raise MismatchError(f"{name}: returned {len(out)} outputs, {reference} returned {len(ref)}")
        for k, (x, r) in enumerate(zip(out, ref, strict=True)):
            label = labels[k] if labels else f"output {k}"
            x, r = np.asarray(x), np.asarray(r)
            if x.shape != r.shape:
                raise MismatchError(f"{name} {label}: shape {x.shape}, {reference} has {r.shape}")
            r64, x64 = r.astype(np.float64), x.astype(np.float64)
            scale = float(np.max(np.abs(r64))) if r64.size else 0.0
            bound = rtol * np.abs(r64) + atol_scale * scale
            err = np.abs(x64 - r64)
            bad = ~(err <= bound)                     # NaN counts as bad
            if bad.any():
                i = np.unravel_index(int(np.argmax(np.where(bad, err - bound, -np.inf))), r.shape)
                raise MismatchError(
                    f"{name} {label} disagrees with {reference}: {int(bad.sum())} of {r.size} elements "
                    f"out of tolerance (rtol={rtol}, atol={atol_scale}*max|ref|={atol_scale * scale:.3g}); "
                    f"worst at {tuple(int(j) for j in i)}: {x64[i]!r} vs {r64[i]!r}")


def numba_dispatchers(module) -> tuple:
    """Every numba-jitted function of ``module`` (e.g. ``refimpl.backend.kernel("x_nb")``), for
    ``Case.add(..., jit=...)``: the report then says whether the first call compiled or loaded
    the machine code from numba's on-disk cache."""
    return tuple(f for f in vars(module).values() if hasattr(f, "py_func") and hasattr(f, "stats"))


def _jit_counts(dispatchers) -> tuple[int, int]:
    hits = misses = 0
    for d in dispatchers:
        stats = getattr(d, "stats", None)
        if stats is not None:
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    return hits, misses


def _rusage() -> tuple[float, float, int] | None:
    """(user s, sys s, minor page faults) of this process so far, None where unsupported."""
    try:
        import resource
    except ImportError:
        return None
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt


def _timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _peak_traced(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del out
    return peak


def run_case(name: str, case: Case, *, repeats: int = 5, warmup: int = 1, min_time: float = 0.2,
             gemm_gflops: float | None = None, bandwidth_gbs: float | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Check and time every variant of ``case``; return the JSON-ready result.

    Raises :class:`MismatchError` (after logging it) if the variants disagree.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    variants = list(case.variants.values())
    res: dict[str, Any] = {
        "name": name, "description": case.description, "params": case.params, "flops": case.flops,
        "bytes_moved": case.bytes_moved,
        "status": "ok", "variants": {}, "skipped": dict(case.skipped), "ratios": {},
        "notes": list(case.notes)}
    # 1. first call (JIT compile / cache load / lazy init), timed apart
    outputs = {}
    for v in variants:
        before = _jit_counts(v.jit)
        first, outputs[v.name] = _timed(v.fn)
        after = _jit_counts(v.jit)
        r: dict[str, Any] = {"kind": v.kind, "first_call_s": first}
        if v.jit:
            r["jit"] = {"cache_hits": after[0] - before[0], "cache_misses": after[1] - before[1]}
        res["variants"][v.name] = r
        log(f"  {v.name:<16} first call {first:8.3f} s" + (f"  (jit: {r['jit']})" if v.jit else ""))
    # 2. numerical agreement before anything else runs
    if case.check is not None:
        try:
            case.check(outputs)
        except AssertionError as e:
            log(f"  MISMATCH in {name}: {e}")
            raise MismatchError(f"{name}: {e}") from e
    del outputs
    gc.collect()
    # warm-up, timed apart (also gives the per-call estimate used to calibrate `number`)
    steady = {}
    for v in variants:
        warm = [_timed(v.fn)[0] for _ in range(warmup)]
        steady[v.name] = min(warm) if warm else res["variants"][v.name]["first_call_s"]
        res["variants"][v.name].update(warmup_s=sum(warm), warmup_calls=warmup)
    # 3. round-robin timing
    number = {k: max(1, min(10_000, math.ceil(min_time / max(t, 1e-9)))) for k, t in steady.items()}
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    usage = {v.name: [0.0, 0.0, 0] for v in variants}     # user s, sys s, minor faults (all rounds)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for v in variants:
                fn, k = v.fn, number[v.name]
                u0 = _rusage()
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                t1 = time.perf_counter()
                u1 = _rusage()
                times[v.name].append((t1 - t0) / k)
                if u0 is not None:
                    for j in range(3):
                        usage[v.name][j] += u1[j] - u0[j]
    finally:
        if gc_was_enabled:
            gc.enable()
    # 4. summaries
    for v in variants:
        r = res["variants"][v.name]
        best = min(times[v.name])
        r.update(best_s=best, median_s=statistics.median(times[v.name]), times_s=times[v.name],
                 number=number[v.name], repeats=repeats)
        if v.kind == "numba":   # JIT compile (or cache load) estimate: first call minus a steady call
            r["compile_s"] = max(r["first_call_s"] - best, 0.0)
        if _rusage() is not None:
            calls = repeats * number[v.name]
            user, sys_, faults = usage[v.name]
            # process-wide CPU time of all threads per call: (user + sys) / wall ~ threads kept busy;
            # a large sys share with many minor faults = first-touch page faults of fresh temporaries
            r.update(user_s_per_call=user / calls, sys_s_per_call=sys_ / calls,
                     minor_faults_per_call=faults / calls)
        if case.flops:
            r["gflops"] = case.flops / best / 1e9
            r["peak_fraction"] = r["gflops"] / gemm_gflops if gemm_gflops else None
        if case.bytes_moved and bandwidth_gbs:
            r["bound_multiple"] = best / (case.bytes_moved / (bandwidth_gbs * 1e9))
        if case.measure_memory:
            if v.kind == "numpy":
                r["peak_mem_bytes"] = _peak_traced(v.fn)
            else:
                r["peak_mem_bytes"] = None
                r["peak_mem_note"] = MEMORY_NOTE
        log(f"  {v.name:<16} best {best * 1e3:10.3f} ms  median {r['median_s'] * 1e3:10.3f} ms"
            f"  ({repeats} x {number[v.name]} calls)")
    for a, b in RATIO_PAIRS:
        if a in res["variants"] and b in res["variants"]:
            res["ratios"][f"{a} vs {b}"] = res["variants"][b]["best_s"] / res["variants"][a]["best_s"]
    return res
