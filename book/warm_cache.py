"""Compute the recipe results the chapters load from ``notebooks/_cache``, several at a time.

The long experiments of the book (R1-Zero, R1, the chain-of-thought ablation, the aha moment, the
language reward, R1's four stages, distillation, V3.2's stability study) are recipes with a result
cache: a chapter calls ``recipe_run(cache_dir="_cache", ...)`` and loads what an earlier call with
the same arguments and the same sources computed. Executed one chapter after another, they would
use one of the machine's cores; this script runs the same calls (read from the notebooks
themselves, so the arguments cannot drift apart) in a pool of worker processes before the build,
each worker with one thread. The build then finds every result in the cache.

``make book`` runs it first. Usage: ``python book/warm_cache.py [--jobs N] [--list]``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Calls that share cached stages (the R1 base, the R1 teacher) run one after another in one worker,
# in this order, so that two workers never compute the same stage at once.
CHAINS = (("r1_zero_run", "r1_run", "distill_run"),)
# The longest single jobs (about 4-6 minutes each on one thread), started first so that the short
# ones fill the gaps at the end (longest first: with chapter order, R1's stages started last and
# the pool waited about two minutes on it alone).
LONG_FIRST = ("r1_stages_run", "cot_ablation_run", "aha_run")


def book_calls(notebooks=NOTEBOOKS):
    """The cached recipe calls of the chapters, in chapter order, without repeats.

    A call counts when its function is imported from ``refimpl.recipes`` and it passes
    ``cache_dir``. Returns a list of ``(module, function, kwargs)``; every argument must be a
    keyword with a literal value (a ``ValueError`` names the notebook otherwise).
    """
    calls = []
    for path in sorted(Path(notebooks).glob("[0-9]*.py")):
        tree = ast.parse(path.read_text())
        origin = {a.asname or a.name: node.module for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refimpl.recipes")
                  for a in node.names}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in origin
                    and any(k.arg == "cache_dir" for k in node.keywords)):
                continue
            if node.args or any(k.arg is None for k in node.keywords):
                raise ValueError(f"{path.name}:{node.lineno}: a cached recipe call takes keyword arguments only")
            try:
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError as e:
                raise ValueError(f"{path.name}:{node.lineno}: arguments must be literals ({e})") from None
            call = (origin[node.func.id], node.func.id, kwargs)
            if call not in calls:
                calls.append(call)
    return calls


def jobs_of(calls, chains=CHAINS, long_first=LONG_FIRST):
    """Group ``calls`` into jobs: each chain's calls form one job (in chain order), the rest one each;
    the jobs of ``long_first`` come first, in that order, then the rest in their original order."""
    jobs, chained = [], set()
    for chain in chains:
        job = [c for name in chain for c in calls if c[1] == name]
        chained.update(id(c) for c in job)
        if job:
            jobs.append(job)
    jobs += [[c] for c in calls if id(c) not in chained]
    rank = {name: i for i, name in enumerate(long_first)}
    return sorted(jobs, key=lambda job: rank.get(job[0][1], len(rank)))   # stable: the rest keep their order


def run_job(job):
    """Run one job's calls in this process (cwd = notebooks/, so ``cache_dir`` means the same as in
    the chapters); returns ``[(function, seconds)]``."""
    os.chdir(NOTEBOOKS)
    done = []
    for module, name, kwargs in job:
        t0 = time.perf_counter()
        getattr(importlib.import_module(module), name)(**{**kwargs, "progress": False})
        done.append((name, time.perf_counter() - t0))
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--list", action="store_true", help="print the calls and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    jobs = jobs_of(book_calls())
    if args.list:
        for job in jobs:
            print(" -> ".join(f"{name}({kwargs})" for _, name, kwargs in job))
        return 0
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"                       # one thread per worker: the workers share the cores
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
        for done in pool.imap_unordered(run_job, jobs):
            for name, seconds in done:
                print(f"warm_cache: {name} {seconds:.0f} s", flush=True)
    print(f"warm_cache: {len(jobs)} jobs in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
