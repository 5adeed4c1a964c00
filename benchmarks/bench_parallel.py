"""Strong scaling of the expert-parallel MoE layer over MPI ranks: ``python -m benchmarks.bench_parallel``.

Not a harness benchmark (those time variants side by side inside one process; this one launches
``mpiexec -n k`` for k = 1, 2, 4): it registers nothing with :mod:`benchmarks.harness`, so the
runner's import of every ``bench_*`` module finds nothing to run here and needs no mpi4py.

The same global batch of tokens (float32) goes through forward + backward of
:func:`refimpl.parallel.ep_moe_forward` / ``ep_moe_backward`` on k ranks, one BLAS thread per rank.
Reported per k: the best wall time over ``--repeats`` calls (max over ranks), the speed-up over one
rank, the time inside the all-to-alls (max over ranks) and its share of the total, the time spent
waiting for the slowest rank before each all-to-all (a barrier inserted for the measurement: load
imbalance and, when oversubscribed, time-slicing), and the single-process :func:`refimpl.moe.moe_forward` /
``moe_backward`` on one thread as the baseline without MPI. Runs with more ranks than cores are
marked *oversubscribed*: their ranks share cores, so they measure contention, not scaling.

Options: ``--tokens`` global tokens (default 4096), ``--ranks 1,2,4``, ``--repeats`` (default 5),
``--quick`` (512 tokens, 2 repeats), ``--two-hop PER_NODE`` (V3's node-then-rank dispatch),
``--json PATH`` to write the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

LAYER = {"experts": 16, "k": 4, "n_group": 4, "topk_group": 2, "hidden": 256, "inter": 128}


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def single_process(tokens, repeats):
    """Best time of moe_forward + moe_backward in this process (one BLAS thread), no MPI."""
    import numpy as np

    from refimpl.moe import moe_backward, moe_forward
    from refimpl.parallel.worker import make_layer_case
    cfg, params, x, dy = make_layer_case("v3", tokens=[tokens], seed=0, dtype=np.float32, **LAYER)
    best = np.inf
    for rep in range(repeats + 1):
        t = time.perf_counter()
        y, cache, _ = moe_forward(x, params, cfg, backend="numpy")
        moe_backward(dy, cache)
        if rep:
            best = min(best, time.perf_counter() - t)
    return best


def run(tokens=4096, ranks=(1, 2, 4), repeats=5, log=print, two_hop_per_node=None):
    from refimpl.parallel import mpi_available, run_mpi
    if not mpi_available():
        raise SystemExit("bench_parallel: needs the 'mpi' extra (pip install -e '.[mpi]')")
    cores = _cores()
    rows = []
    for k in ranks:
        args = ["-m", "refimpl.parallel.worker", "bench", "--routing", "v3", "--tokens-total", tokens,
                "--repeats", repeats, "--experts", LAYER["experts"], "--k", LAYER["k"], "--n-group", LAYER["n_group"],
                "--topk-group", LAYER["topk_group"], "--hidden", LAYER["hidden"], "--inter", LAYER["inter"]]
        if two_hop_per_node and k % two_hop_per_node == 0:
            args += ["--two-hop", "--devices-per-node", two_hop_per_node]
        res = run_mpi(k, args, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"mpiexec -n {k} failed:\n{res.stdout}\n{res.stderr}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["oversubscribed"] = k > cores
        rows.append(r)
        log(f"ranks={k}: {r['best_s'] * 1e3:.1f} ms, all-to-all {r['a2a_s'] * 1e3:.1f} ms, "
            f"waiting {r['wait_s'] * 1e3:.1f} ms"
            + (" (oversubscribed)" if r["oversubscribed"] else ""))
    base = single_process(tokens, repeats)
    one = rows[0]["best_s"] if rows and rows[0]["ranks"] == 1 else None
    for r in rows:
        r["speedup_vs_1_rank"] = one / r["best_s"] if one else None
        r["a2a_share"] = r["a2a_s"] / r["best_s"]
    return {"tokens": tokens, "layer": LAYER, "cores": cores, "single_process_s": base, "runs": rows}


def table(res):
    lines = [f"MoE layer fwd+bwd, {res['tokens']} tokens, float32, E={res['layer']['experts']} "
             f"K={res['layer']['k']} D={res['layer']['hidden']} I={res['layer']['inter']}, {res['cores']} cores",
             f"single process, no MPI: {res['single_process_s'] * 1e3:.1f} ms", "",
             "| ranks | best (ms) | speed-up vs 1 rank | all-to-all (ms) | all-to-all share | waiting (ms) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sp = f"{r['speedup_vs_1_rank']:.2f}x" if r["speedup_vs_1_rank"] else "-"
        lines.append(f"| {r['ranks']} | {r['best_s'] * 1e3:.1f} | {sp} | {r['a2a_s'] * 1e3:.1f} | "
                     f"{100 * r['a2a_share']:.0f}% | {r['wait_s'] * 1e3:.1f} | "
                     f"{'oversubscribed' if r['oversubscribed'] else ''} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--two-hop", type=int, default=None, metavar="PER_NODE",
                   help="two-hop dispatch with this many ranks per simulated node (where it divides the ranks)")
    a = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")          # before numpy is imported: one thread, like each rank
    tokens, repeats = (512, 2) if a.quick else (a.tokens, a.repeats)
    res = run(tokens, tuple(int(k) for k in a.ranks.split(",")), repeats, two_hop_per_node=a.two_hop)
    print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
