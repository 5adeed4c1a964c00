"""Choosing between the NumPy reference and its Numba twins.

Every function with a Numba twin takes ``backend=`` with one of:

* ``"numpy"`` — the readable reference the book shows;
* ``"numba"`` — the JIT twin in :mod:`refimpl.kernels` (raises if numba is not installed);
* ``"auto"`` — numba when it imports, else numpy.

``None`` means "use the default": the ``REFIMPL_BACKEND`` environment variable if set, else
the site's default, which is ``"auto"`` except at the three sites listed under "Sites whose default
is the reference" below. ``"auto"`` also falls back to numpy when the caller says the problem is small
(``work`` below :data:`AUTO_MIN_WORK` elements): a kernel call's fixed cost (argument unboxing,
thread wake-up) can exceed NumPy's whole computation on a tiny input.

How the threshold was chosen: the crossover was measured with the twins of the two hot loops that
see the smallest inputs, the cross-entropy forward (rows of up to 1024 logits) and MoE plan +
dispatch + combine + their backwards (D = 64, E = 16, K = 4), at 2 threads on the shared 2-core
development machine (load ~7, best of 40 calls each, speed-up of the twin over NumPy):

=============  ==============  ====================
work           cross-entropy   MoE dispatch/combine
=============  ==============  ====================
2^10 elements  1.28x           0.97x
2^12           1.04x           2.11x
2^14           1.19x           2.34x
2^16           1.63x           3.82x
2^20           2.51x           > 5x
=============  ==============  ====================

The MoE twins lose below ~2^11 elements and the cross-entropy's margin is thin at 2^12 (an earlier
run, before the MoE kernels went serial below :data:`refimpl.kernels.moe_nb.PARALLEL_MIN_WORK`,
lost at 2^12). Every twin wins clearly from 2^14; the threshold stays at 2^16, where the margins are
1.6x and more, for two reasons: the gain between 2^14 and 2^16 is a fraction of a millisecond per
call, and the book's tiny training runs have most of their calls in that range, where switching
the backend changes float32 rounding and, through hundreds of steps, the runs' trajectories (a
recipe's result is deterministic for a given threshold, and the chapters assert what it shows).

Sites whose default is the reference
------------------------------------
Three functions resolve ``None`` to ``"numpy"`` when ``REFIMPL_BACKEND`` is unset (they pass
``default="numpy"`` to :func:`resolve_backend`): :func:`refimpl.moe.dispatch.experts_forward` (the
SwiGLU twin between the expert GEMMs), :func:`refimpl.rl.logps_entropy_forward` and
:func:`refimpl.rl.grpo_loss_from_logits` (the log-prob/entropy twin). Their twins came after the
book's training runs were fixed; they agree with the reference within float32 rounding, but a
different rounding at every step changes a run of hundreds of steps as a different seed would, and
the chapters state what their runs show. The training loops that reach these sites (the MoE layer,
the GRPO trainer, the rollout's log-probs) pass their own ``backend`` through unresolved, so their
default (``None``) keeps the reference there, while an explicit choice reaches the twins like any
other: a ``backend=`` argument, :class:`refimpl.rl.GRPOConfig`'s ``backend``, or ``REFIMPL_BACKEND``.

Nothing is imported or compiled until a twin is first called: ``import refimpl`` never touches
numba, and each kernel compiles on first use with ``cache=True`` so later processes load
the machine code from ``__pycache__``. Kernels run with ``fastmath`` off unless their docstring says
otherwise.

Threading policy
----------------
Every twin may run in parallel (``prange`` over rows or tokens) on numba's ``omp`` threading layer,
and the OpenMP runtime is told to put idle workers to sleep at once: importing this module sets
``OMP_WAIT_POLICY=passive`` unless the variable is already set (yours wins). The reason is the
GEMMs around the twins: OpenBLAS has its own pthread pool, and with GNU OpenMP's default policy
numba's workers spin for a while after each parallel region, on the very cores the next BLAS
call needs. Measured on the 2-core development machine (shared, load ~10; user CPU time of a loop
of one parallel log-sum-exp twin call then two 384^3 GEMMs, median of 5, three runs each):

============================  ===========  ===========
policy                        1 thread     2 threads
============================  ===========  ===========
omp, default (active) wait    62 ms        560-630 ms
omp, ``passive``              59 ms        310-380 ms
``workqueue`` layer           67 ms        300-355 ms
============================  ===========  ===========

``workqueue`` is as good but not safe to enter from two Python threads at once, so ``omp`` with
the passive policy it is. threadpoolctl (limiting BLAS inside numba regions) does not address this:
BLAS never runs inside a numba region, the contention is *between* them; it is not a dependency.
The setting has to reach the OpenMP runtime when it is loaded: libgomp reads ``OMP_WAIT_POLICY``
once, in its constructor. torch's CPU wheel and numba's ``omp`` layer load the same
``libgomp.so.1`` (one copy mapped in a process importing both, measured), so after ``import torch``
the policy is fixed, whatever refimpl sets later. Hence: import refimpl before torch, or export
``OMP_WAIT_POLICY=passive``; the benchmark package sets it before any import
(``benchmarks/__init__.py``). Nothing can change it in-process afterwards (there is no OpenMP call
for it, and threadpoolctl sets thread counts only), so refimpl does the one useful thing: at import
it notes whether an OpenMP runtime was already loaded with no policy set, and the first Numba
kernel then warns (:data:`OMP_LATE`). Thread counts themselves are left to ``NUMBA_NUM_THREADS`` /
``numba.set_num_threads`` and the BLAS variables.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache

BACKENDS = ("auto", "numpy", "numba")
#: OpenMP wait policy set at import unless the environment already has one (see "Threading policy").
OMP_WAIT_POLICY = "passive"


def openmp_loaded() -> bool:
    """True if an OpenMP runtime (libgomp, libiomp, libomp) is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            return any("omp" in line.rsplit("/", 1)[-1] for line in f if "/" in line)
    except OSError:
        return False


#: True when an OpenMP runtime was loaded (e.g. by ``import torch``) before this module could set
#: the wait policy and the environment had none: numba's workers may then spin (see the policy).
OMP_LATE = "OMP_WAIT_POLICY" not in os.environ and openmp_loaded()
os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
#: Below this many elements of work, ``"auto"`` picks numpy (the crossover table in the module docstring).
AUTO_MIN_WORK = 1 << 16


@cache
def numba_available() -> bool:
    """True if numba imports (checked once, on first call)."""
    try:
        importlib.import_module("numba")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None = None, work: int | None = None, *, default: str = "auto") -> str:
    """Map ``backend`` (or the ``REFIMPL_BACKEND`` default) to ``"numpy"`` or ``"numba"``.

    ``work``: the number of elements the call will touch, if the caller knows it; with ``"auto"``
    a small ``work`` selects numpy. ``default``: what ``None`` means when ``REFIMPL_BACKEND`` is unset
    (``"numpy"`` at the sites listed in the module docstring).
    """
    if default not in BACKENDS:
        raise ValueError(f"default: expected one of {BACKENDS}, got {default!r}")
    source = "backend"
    if backend is None:
        source = "REFIMPL_BACKEND" if "REFIMPL_BACKEND" in os.environ else "default"
        backend = os.environ.get("REFIMPL_BACKEND", default)
    if backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if work is not None and work < AUTO_MIN_WORK:
            return "numpy"
        return "numba" if numba_available() else "numpy"
    if backend == "numba" and not numba_available():
        raise ValueError(f"{source}: 'numba' requested but numba is not installed")
    return backend


def kernel(module: str):
    """Import ``refimpl.kernels.<module>`` on demand (this is when numba is first imported)."""
    if OMP_LATE:
        _warn_omp_late()
    return importlib.import_module(f"refimpl.kernels.{module}")


@cache
def _warn_omp_late() -> None:
    warnings.warn("an OpenMP runtime (e.g. torch's libgomp) was loaded before refimpl could set "
                  "OMP_WAIT_POLICY=passive: numba's parallel workers may spin against BLAS. Import refimpl "
                  "before torch, or export OMP_WAIT_POLICY=passive.", RuntimeWarning, stacklevel=3)
