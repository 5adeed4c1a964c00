"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--threads N] [NAME ...]``.

Measures the machine's float32 GEMM peak, imports every ``benchmarks/bench_*.py`` (each registers
its benchmarks with :func:`benchmarks.harness.register`), runs the selected ones side by side and
writes ``results.json`` and ``results.md`` (both git-ignored) into ``--out-dir`` (default: this
directory). ``NAME`` selects benchmarks by substring (or fnmatch pattern) of their names. The exit
status is 1 if any benchmark's variants disagreed or a module failed to import or run.

NumPy is imported only after the BLAS thread environment variables are set, so that OpenBLAS/MKL
start with the same thread count as numba and torch even without threadpoolctl.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="run only benchmarks whose name contains one of these "
                                            "(fnmatch patterns allowed)")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats (smoke run)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numba, torch and BLAS (default: usable CPUs)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls after the first call")
    p.add_argument("--min-time", type=float, default=None,
                   help="minimum seconds per timed round (default 0.2, quick 0.02)")
    p.add_argument("--gemm-n", type=int, default=None, help="GEMM peak size (default 2048, quick 512)")
    p.add_argument("--cold-jit", action="store_true",
                   help="use an empty numba cache dir, so first calls include real JIT compilation")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where results.json/.md go")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p.parse_args(argv)


def _default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def discover(log=print) -> list[dict]:
    """Import every ``benchmarks.bench_*`` module; return the import errors (they do not abort)."""
    errors = []
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_")):
        try:
            importlib.import_module(f"benchmarks.{mod}")
        except Exception as e:  # noqa: BLE001 - one broken module must not hide the others
            log(f"IMPORT ERROR benchmarks.{mod}: {type(e).__name__}: {e}")
            errors.append({"module": f"benchmarks.{mod}", "error": f"{type(e).__name__}: {e}"})
    return errors


def _run_one(harness, registry, name, args, repeats, min_time, gemm_gflops, log, bandwidth_gbs=None) -> dict:
    """Build and run one case (its data is freed on return); errors become a result entry."""
    try:
        case = registry.factories[name](args.quick)
        res = harness.run_case(name, case, repeats=repeats, warmup=args.warmup, min_time=min_time,
                               gemm_gflops=gemm_gflops, bandwidth_gbs=bandwidth_gbs, log=log)
    except harness.MismatchError as e:
        return {"name": name, "status": "mismatch", "error": str(e), "params": {}, "variants": {},
                "ratios": {}}
    except Exception as e:  # noqa: BLE001 - record, keep going, exit non-zero
        log(traceback.format_exc())
        return {"name": name, "status": "error", "error": f"{type(e).__name__}: {e}", "params": {},
                "variants": {}, "ratios": {}}
    for pair, r in res["ratios"].items():
        log(f"  {pair}: {r:.2f}x")
    return res


def main(argv=None, registry=None, log=print) -> int:
    """Entry point; ``registry`` (default: discover ``bench_*`` modules) is for tests."""
    args = _parse(argv)
    threads = args.threads or _default_threads()
    numpy_preloaded = "numpy" in sys.modules
    if not numpy_preloaded:  # afterwards the variables would no longer reach NumPy's BLAS
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # refimpl.backend's policy, before any OpenMP runtime
    if args.cold_jit:
        if "numba" in sys.modules:
            log("warning: --cold-jit has no effect once numba is imported")
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="refimpl-numba-cache-")

    from . import harness  # imports numpy: after the environment is set
    from .report import render_markdown

    import_errors = []
    if registry is None:
        import_errors = discover(log)
        registry = harness.REGISTRY
    names = registry.select(args.names)
    if args.list:
        for n in names:
            log(n)
        return 0
    if args.names and not names:
        log(f"no benchmark matches {args.names}; known: {sorted(registry.factories)}")
        return 1
    repeats = args.repeats or (3 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.2)
    gemm_n = args.gemm_n or (512 if args.quick else 2048)

    results = {"machine": harness.machine_info(), "quick": args.quick, "repeats": repeats,
               "warmup": args.warmup, "min_time_s": min_time, "selected": args.names,
               "import_errors": import_errors, "benchmarks": []}
    failed = bool(import_errors)
    load = results["machine"].get("loadavg")
    usable = results["machine"].get("cpu_affinity") or results["machine"]["cpu_count"] or 1
    if load and load[0] + threads > usable + 1:
        msg = (f"machine busy: load average {load[0]:.1f} + {threads} benchmark threads > {usable} CPUs; "
               "multi-threaded timings (OpenMP barriers waiting on preempted threads) will be "
               "unreliable -- compare with --threads 1")
        log(f"WARNING: {msg}")
        results["warnings"] = [msg]
    with harness.thread_limits(threads) as tinfo:
        tinfo["blas"]["env_set_before_numpy_import"] = not numpy_preloaded
        results["threads"] = tinfo
        log(f"threads: {threads} (numba {tinfo['numba']}, torch {tinfo['torch']})")
        results["gemm_peak"] = harness.gemm_peak(gemm_n)
        results["torch_gemm_peak"] = harness.torch_gemm_peak(gemm_n)
        log(f"float32 GEMM peak ({gemm_n}^3, numpy): {results['gemm_peak']['gflops']:.1f} GFLOP/s"
            + (f"; torch.mm {results['torch_gemm_peak']['gflops']:.1f} GFLOP/s"
               if results["torch_gemm_peak"] else ""))
        from .bandwidth import stream_bandwidth
        results["bandwidth"] = bw = stream_bandwidth(1 << (22 if args.quick else 24))
        log(f"memory bandwidth (STREAM triad, best of NumPy/Numba): {bw['bandwidth_gbs']:.1f} GB/s; copy "
            f"NumPy {bw['numpy_copy_gbs']:.1f}, Numba {bw.get('numba_copy_gbs', float('nan')):.1f} GB/s")
        for name in names:
            log(f"{name}")
            res = _run_one(harness, registry, name, args, repeats, min_time, results["gemm_peak"]["gflops"],
                           log, bw["bandwidth_gbs"])
            failed |= res["status"] != "ok"
            results["benchmarks"].append(res)
    try:
        import numba
        results["machine"]["numba_threading_layer"] = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no parallel region has run yet
        pass

    if hasattr(os, "getloadavg"):
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    try:
        import resource
        results["max_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:
        pass

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out_dir / "results.md").write_text(render_markdown(results))
    log(f"wrote {args.out_dir / 'results.json'} and {args.out_dir / 'results.md'}")
    if failed:
        log("FAILED: see the errors above (variants disagreeing are never timed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
