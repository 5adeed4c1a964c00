"""Launch ``mpiexec -n k python -m ...`` from Python (tests, the chapter, the benchmark), with a timeout.

The ``mpich`` wheel puts ``mpiexec`` next to the Python interpreter of the environment (``.venv/bin``);
:func:`find_mpiexec` looks there first, then on ``PATH``. MPICH ranks *busy-poll* while they wait in
a collective, so ranks oversubscribed on fewer cores compete with the rank doing work. MPICH already
calls ``sched_yield`` every 1000 polls; :data:`MPI_ENV` makes that every 10
(``MPIR_CVAR_POLLS_BEFORE_YIELD``) and pins every math library to one thread per rank. Measured on a
2-core machine with 4 and 8 ranks, the yield setting made no difference beyond noise; what keeps
oversubscribed runs fast is small per-rank work and one thread per rank.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

MPI_ENV = {
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "10",
}


def find_mpiexec():
    """Path of ``mpiexec`` (beside ``sys.executable`` first, then ``PATH``), or None."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec")


def mpi_available():
    """True when both ``mpi4py`` imports and an ``mpiexec`` is found."""
    try:
        spec = importlib.util.find_spec("mpi4py")
    except (ImportError, ValueError):      # ValueError: a blocked module (sys.modules["mpi4py"] = None)
        spec = None
    return spec is not None and find_mpiexec() is not None


def run_mpi(n, args, *, timeout=120, env=None, cwd=None):
    """Run ``mpiexec -n n <python> *args`` and return the CompletedProcess (text stdout/stderr).

    On timeout the whole process group that was started (mpiexec, its proxies and the ranks) is
    killed and ``subprocess.TimeoutExpired`` is raised, so a hung collective never outlives the call.
    """
    exe = find_mpiexec()
    if exe is None:
        raise RuntimeError("mpiexec: not found; pip install 'refimpl[mpi]' (mpi4py + mpich)")
    full_env = {**os.environ, **MPI_ENV, **(env or {})}
    cmd = [exe, "-n", str(int(n)), sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
