# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Performance: the benchmarks, side by side
#
# Every chapter so far showed the readable NumPy reference. Where a loop is hot (the cross-entropy
# of {doc}`02_backprop_by_hand`, the expert dispatch of {doc}`04_moe`), refimpl also has a
# Numba twin behind the same signature (`backend="numba"`), and the benchmark harness in
# `benchmarks/` times the reference, the twin and PyTorch's CPU kernels side by side, on the same
# data, in one process, with the same thread count. This page shows one such run, and says which:
#
# * if `benchmarks/results.json` holds a complete full-shape run (`make bench`) without failures,
#   the page shows it, with its date, machine, threads, GEMM peak and memory bandwidth;
# * otherwise the page runs the harness **during the book build** at its `--quick` shapes (seconds,
#   not minutes), which are too small for the GEMM-bound cases to reach the machine's peak; the full
#   shapes (for example the fused cross-entropy at 8192 tokens x 32768 vocabulary) take several
#   minutes and gigabytes.
#
# The machine is often shared, so absolute times move between runs. Ratios measured side by side
# move much less, and the harness records the load average so a surprise can be checked.
#
# PyTorch is an optional oracle, not a dependency: if it is not installed, its column is missing
# and the page says so.

# %%
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numba
import numpy as np
from IPython.display import Markdown, display

import refimpl
from refimpl.display import show_source

ROOT = Path(refimpl.__file__).resolve().parents[1]   # the repository (refimpl is installed editable)
assert (ROOT / "benchmarks" / "run.py").exists(), ROOT

# %% [markdown]
# ## How a benchmark is defined
#
# A benchmark module registers a factory that builds the data and returns a `Case`: named variants,
# each a closure that runs one call. The harness first checks that the variants agree numerically
# (a fast path that is fast because it is wrong would otherwise win), then times a first call
# (JIT compilation or cache load), warm-up calls, and round-robin rounds. Here is the case of the
# fused softmax cross-entropy, the first twin written for the project:

# %%
sys.path.insert(0, str(ROOT))
import benchmarks.bench_cross_entropy as bench_ce  # noqa: E402

show_source(bench_ce._case)

# %% [markdown]
# ## The run
#
# A saved full run is used when it is complete and clean; otherwise the runner is started as a
# separate process (it must set the BLAS, Numba and torch thread counts before NumPy is imported).

# %%
saved_path = ROOT / "benchmarks" / "results.json"
saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
use_saved = bool(saved and not saved.get("quick") and not saved.get("selected") and not saved.get("import_errors")
                 and all(b["status"] == "ok" for b in saved["benchmarks"]))
if use_saved:
    results, returncode, stderr = saved, 0, ""
    commit = saved["machine"].get("commit")
    source = (f"the latest full run (`make bench`, saved {saved['machine']['time']}"
              + (f", code at commit `{commit}`" if commit else "") + ")")
else:
    out = Path(tempfile.mkdtemp(prefix="refimpl-bench-"))
    # every variant gets the same thread count: the usable cores, capped by Numba's pool (NUMBA_NUM_THREADS)
    threads = min(numba.config.NUMBA_NUM_THREADS, len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", str(threads),
                           "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    returncode, stderr = proc.returncode, proc.stderr
    print(f"benchmark run: {time.perf_counter() - t0:.0f} s, exit status {returncode}")
    results = json.loads((out / "results.json").read_text())
    source = "a quick run made while this page was built (no complete full run was saved)"
benches = results["benchmarks"]
machine, gemm, bw = results["machine"], results.get("gemm_peak") or {}, results.get("bandwidth") or {}
shapes_label = "quick shapes, this build" if results.get("quick") else "full shapes, saved run"
display(Markdown(f"**Showing {source}.**"))
print(f"CPU: {machine['cpu']}, {machine.get('cpu_affinity')} usable cores; "
      f"load average at start {[round(x, 2) for x in machine.get('loadavg') or []]}")
print(f"NumPy {machine['numpy']}, Numba {machine['numba']}, torch {machine['torch']}")
print(f"float32 GEMM peak (NumPy, {gemm.get('n')}x{gemm.get('n')}): {gemm.get('gflops', float('nan')):.1f} GFLOP/s")
if bw:
    print(f"memory bandwidth (STREAM triad, best of NumPy/Numba): {bw['bandwidth_gbs']:.1f} GB/s")
print(f"{len(benches)} benchmarks, threads: {results['threads']['threads']}")

# %% [markdown]
# Before any timing counts, every variant of every benchmark must have produced the same answer as
# the NumPy reference (within the tolerance the case declares). The run's exit status says whether
# that held; the cell below stops the build if it did not.

# %%
bad = [(b["name"], b["status"], b.get("error")) for b in benches if b["status"] != "ok"]
assert returncode == 0 and not bad, (bad, stderr[-2000:])
assert not results.get("import_errors"), results["import_errors"]
have_torch = any("torch" in b["variants"] for b in benches)
print("all variants agree;", "torch measured" if have_torch else "torch not installed: no torch column")


# %% [markdown]
# ## What it measured
#
# Per benchmark: the shapes, the best time per call of each variant, the speed-ups from the best
# times (`a vs b` is t(b)/t(a), so above 1 means `a` is faster) and, for bandwidth-bound cases, the
# Numba twin's time as a multiple of the time the least memory traffic would take at the measured
# bandwidth (1.0 would be perfect streaming).

# %%
def fmt_time(s):
    if s is None:
        return "-"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


variants = ["refimpl-numpy", "refimpl-numba", "torch"]
rows = ["| benchmark | shapes | " + " | ".join(variants) + " | speed-ups | twin x bound |", "|---" * 7 + "|"]
for b in benches:
    shapes = ", ".join(f"{k}={v}" for k, v in b["params"].items() if k in
                       {"N", "V", "B", "T", "D", "E", "S", "H", "context", "tokens", "batch", "seq"})
    times = [fmt_time(b["variants"][v]["best_s"]) if v in b["variants"] else "-" for v in variants]
    extra = [k for k in b["variants"] if k not in variants]
    ratios = "; ".join(f"{k}: {r:.2f}x" for k, r in b["ratios"].items())
    bound = b["variants"].get("refimpl-numba", {}).get("bound_multiple")
    rows.append(f"| {b['name']} | {shapes or '-'} | " + " | ".join(times) + f" | {ratios}"
                + (f" (also: {', '.join(extra)})" if extra else "") + " | "
                + (f"{bound:.1f}" if bound is not None else "-") + " |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# The same speed-ups as a picture, on a log scale: bars to the right of 1 mean the first-named
# variant is faster.

# %%
pairs = ["refimpl-numba vs refimpl-numpy", "refimpl-numba vs torch", "refimpl-numpy vs torch"]
names = [b["name"] for b in benches]
fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.5))
y = np.arange(len(names))
for k, pair in enumerate(pairs):
    vals = [b["ratios"].get(pair, np.nan) for b in benches]
    if np.all(np.isnan(vals)):
        continue
    ax.barh(y + (k - 1) * 0.27, vals, height=0.27, label=pair)
ax.axvline(1.0, color="k", lw=0.8)
ax.set_xscale("log")
ax.set_yticks(y, names)
ax.invert_yaxis()
ax.set_xlabel("speed-up (best time ratio)")
ax.legend(fontsize=8, loc="lower right")
ax.set_title(f"refimpl benchmarks, {shapes_label}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the numbers
#
# Which side won in this run, counted from the table above (not from earlier runs):

# %%
pair = "refimpl-numba vs refimpl-numpy"
twin = {b["name"]: b["ratios"][pair] for b in benches if pair in b["ratios"]}
faster = sorted((n for n, r in twin.items() if r > 1), key=lambda n: -twin[n])
slower = sorted((n for n, r in twin.items() if r <= 1), key=lambda n: twin[n])
print(f"Numba twin faster than the NumPy reference in {len(faster)} of {len(twin)} benchmarks with a twin:")
print("  faster:", ", ".join(f"{n} ({twin[n]:.2f}x)" for n in faster) or "-")
print("  slower:", ", ".join(f"{n} ({twin[n]:.2f}x)" for n in slower) or "-")
assert len(twin) >= 3, "every benchmark with a Numba twin should have run"

# %% [markdown]
# * **A twin pays where NumPy makes temporaries, at sizes where that matters.** A NumPy expression
#   such as `exp(z - max) / sum` allocates a full (tokens x vocabulary) array per step, and at the
#   full shapes that memory traffic dominates; the twin streams each row once, with an `exp` written
#   so that LLVM can vectorise it (`refimpl.kernels.vecmath_nb`). At the quick shapes everything
#   fits in cache and a parallel region's start-up weighs more, so the margins shrink; the full-shape
#   run (`make bench`) is the one to judge a twin by.
# * **Where the work is a few large matrix products** (the MLA prefill, the expert GEMMs), both
#   variants call the same BLAS and a twin has little to win: the MLA prefill has no twin, and the
#   experts' twin (`moe/experts-fwd+bwd`) only fuses the SwiGLU between the GEMMs.
# * **PyTorch is the bar for the fused losses.** Its CPU kernels are vectorised C++; a ratio below 1
#   against torch is a known gap, shown here rather than hidden.
# * **Small shapes exaggerate overheads.** A call of tens of microseconds weighs Python dispatch and
#   thread start-up as much as arithmetic.
#
# The harness's full report (CPU time per call, page faults, JIT first-call costs, tracemalloc peaks
# where memory is the point) is rendered from the JSON; here are the first lines of it for this run:

# %%
from benchmarks.report import render_markdown  # noqa: E402

report = render_markdown(results).splitlines()
print("\n".join(line for line in report[:12] if not line.startswith(("#", "- **Warning**"))))
if results.get("warnings"):                       # the harness's load warning, said once in words
    load = (results.get("machine", {}).get("loadavg") or [0])[0]
    print(f"(the harness noted a busy machine for this run: load average {load:.1f}, "
          "so the multi-threaded timings are rough)")
missing = [b["name"] for b in benches if f"## {b['name']}" not in report]
assert not missing, f"the report has no section for {missing}"

# %% [markdown]
# To reproduce at the full shapes on your machine:
#
# ```bash
# make bench              # everything, full shapes -> benchmarks/results.{json,md}
# make bench ORACLE=1     # the same with the torch column
# python -m benchmarks.run --threads 1 mla   # one thread, only the MLA cases
# ```
#
# ## Exercises
#
# 1. **Which benchmark gains most from its Numba twin in this run?** Find the benchmark with the
#    largest `refimpl-numba vs refimpl-numpy` ratio and check that its best Numba time is indeed the
#    smaller one.

# %% tags=["hide-cell"]
with_twin = [b for b in benches if "refimpl-numba vs refimpl-numpy" in b["ratios"]]
best = max(with_twin, key=lambda b: b["ratios"]["refimpl-numba vs refimpl-numpy"])
r = best["ratios"]["refimpl-numba vs refimpl-numpy"]
tn, tb = best["variants"]["refimpl-numpy"]["best_s"], best["variants"]["refimpl-numba"]["best_s"]
print(best["name"], f"{r:.2f}x:", "the Numba twin is faster" if tb < tn else "no twin was faster at these shapes")
assert np.isclose(r, tn / tb)                     # the ratio is t(numpy) / t(numba), so > 1 means numba is faster

# %% [markdown]
# 2. **Ratios are consistent.** Check that every speed-up `a vs b` in the results is t(b)/t(a) from
#    the best times. For a benchmark with all three variants, the three speed-ups are then not
#    independent: show that (numba vs numpy) x (numpy vs torch) = (numba vs torch).

# %% tags=["hide-cell"]
n_ratios = 0
for b in benches:
    for pair_name, ratio in b["ratios"].items():
        a, c = pair_name.split(" vs ")
        assert np.isclose(ratio, b["variants"][c]["best_s"] / b["variants"][a]["best_s"]), (b["name"], pair_name)
        n_ratios += 1
assert n_ratios >= len(twin)                      # at least the Numba-vs-NumPy ratio of every benchmark with a twin
full = [b for b in benches if all(p in b["ratios"] for p in pairs)]
for b in full:
    rr = b["ratios"]
    assert np.isclose(rr[pairs[0]] * rr[pairs[2]], rr[pairs[1]]), b["name"]
print(f"{n_ratios} ratios equal their best-time quotients; the product holds for {len(full)} benchmarks with all "
      "three variants" + ("" if full else " (torch is not installed)"))
