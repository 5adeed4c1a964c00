"""Render a benchmark run (the dict written to results.json) as a markdown page."""

from __future__ import annotations

from .harness import MEMORY_NOTE


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/m"
    return f"{b / 2**20:.1f} MiB"


def render_markdown(results: dict) -> str:
    """The results as a markdown page (machine, then one table per benchmark)."""
    m, th, gp = results["machine"], results["threads"], results.get("gemm_peak") or {}
    lines = ["# refimpl benchmarks", ""]
    lines.append(f"- CPU: {m['cpu']} ({m['cpu_count']} logical CPUs, {m.get('cpu_affinity')} usable); "
                 f"load average at start {[round(x, 2) for x in m.get('loadavg') or []]}")
    lines.append(f"- Python {m['python']}, NumPy {m['numpy']}, Numba {m['numba']}, torch {m['torch']}")
    blas = th.get("blas", {})
    tpc = blas.get("threadpoolctl")
    tpc_s = "threadpoolctl limits applied" if isinstance(tpc, list) else f"env {blas.get('env')}"
    lines.append(f"- Threads: {th['threads']} for all variants (numba {th.get('numba')}, threading layer "
                 f"{m.get('numba_threading_layer')}, OMP_WAIT_POLICY "
                 f"{(m.get('openmp') or {}).get('OMP_WAIT_POLICY')}; torch {th.get('torch')}; BLAS: {tpc_s})")
    if gp:
        lines.append(f"- float32 GEMM peak (NumPy, {gp['n']}x{gp['n']}, best of {gp['repeats']}): "
                     f"**{gp['gflops']:.1f} GFLOP/s**"
                     + (f"; torch.mm {results['torch_gemm_peak']['gflops']:.1f} GFLOP/s"
                        if results.get("torch_gemm_peak") else ""))
    bw = results.get("bandwidth")
    if bw:
        lines.append(f"- Memory bandwidth (STREAM-like, {bw['array_MiB']:.0f} MiB arrays): triad NumPy "
                     f"{bw['numpy_triad_gbs']:.1f}, Numba {bw.get('numba_triad_gbs', float('nan')):.1f} GB/s; "
                     f"copy NumPy {bw['numpy_copy_gbs']:.1f}, Numba {bw.get('numba_copy_gbs', float('nan')):.1f} "
                     f"GB/s. Bandwidth-bound cases show time / (bytes moved / **{bw['bandwidth_gbs']:.1f} GB/s**).")
    lines.append(f"- Mode: {'quick' if results.get('quick') else 'full'}; repeats {results.get('repeats')}, "
                 f"warm-up calls {results.get('warmup')}. Times are per call; ratios are best-time "
                 "speed-ups (`a vs b` = t(b) / t(a), > 1 means a is faster). CPU time and page faults "
                 "are process-wide means over the timed calls (CPU / wall ~ busy threads; a large sys "
                 "share means first-touch page faults on fresh temporaries).")
    for w in results.get("warnings", []):
        lines.append(f"- **Warning**: {w}")
    if m.get("loadavg_end"):
        lines.append(f"- Load average at the end: {[round(x, 2) for x in m['loadavg_end']]}")
    if results.get("max_rss_MiB"):
        lines.append(f"- Peak resident memory of the whole run: {results['max_rss_MiB']:.0f} MiB")
    lines.append("")
    for b in results["benchmarks"]:
        lines.append(f"## {b['name']}")
        lines.append("")
        if b.get("description"):
            lines.append(b["description"])
            lines.append("")
        lines.append("Params: " + ", ".join(f"`{k}={v}`" for k, v in b["params"].items()))
        lines.append("")
        if b["status"] != "ok":
            lines.append(f"**{b['status'].upper()}**: {b.get('error')}")
            lines.append("")
            continue
        mem = any("peak_mem_bytes" in v for v in b["variants"].values())
        cpu = any("user_s_per_call" in v for v in b["variants"].values())
        head = ["variant", "best", "median", "first call (compile/init)", "warm-up"]
        if cpu:
            head += ["CPU user+sys / call", "page faults / call"]
        if b.get("flops"):
            head += ["GFLOP/s", "% GEMM peak"]
        bound = any("bound_multiple" in v for v in b["variants"].values())
        if bound:
            head += ["x bytes-moved bound"]
        if mem:
            head += ["peak mem (tracemalloc)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for name, v in b["variants"].items():
            first = _fmt_time(v["first_call_s"])
            jit = v.get("jit")
            if jit and jit["cache_misses"]:
                first += " (JIT compiled)"
            elif jit and jit["cache_hits"]:
                first += " (JIT cache load)"
            row = [name, _fmt_time(v["best_s"]), _fmt_time(v["median_s"]), first, _fmt_time(v["warmup_s"])]
            if cpu:
                if "user_s_per_call" in v:
                    row += [f"{_fmt_time(v['user_s_per_call'])} + {_fmt_time(v['sys_s_per_call'])}",
                            f"{v['minor_faults_per_call']:.0f}"]
                else:
                    row += ["-", "-"]
            if b.get("flops"):
                pf = v.get("peak_fraction")
                row += [f"{v['gflops']:.1f}", f"{100 * pf:.1f}%" if pf is not None else "-"]
            if bound:
                row += [f"{v['bound_multiple']:.1f}" if "bound_multiple" in v else "-"]
            if mem:
                row += [_fmt_bytes(v.get("peak_mem_bytes"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if b["ratios"]:
            lines.append("Speed-ups: " + "; ".join(f"{k}: **{r:.2f}x**" for k, r in b["ratios"].items()))
            lines.append("")
        for k, reason in b.get("skipped", {}).items():
            lines.append(f"- {k} skipped: {reason}")
        if mem:
            lines.append(f"- peak mem n/m: {MEMORY_NOTE}.")
        for note in b.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    for err in results.get("import_errors", []):
        lines.append(f"- import error in `{err['module']}`: {err['error']}")
    return "\n".join(lines).rstrip() + "\n"
