"""Numba twins of the SwiGLU activation (:func:`refimpl.core.swiglu_forward` / ``swiglu_backward``).

The NumPy reference computes ``sigmoid(g) = (1 + tanh(g / 2)) / 2`` and then ``silu(g) * u`` as
whole-array operations, one temporary per step (about seven passes over the (A, I) arrays forward
and nine backward). The twins make one pass per direction, element by element:

* :func:`swiglu_rows` -- ``h = g * s * u`` with ``s = 1 / (1 + exp(-g))``;
* :func:`swiglu_grad_rows` -- ``dup = dy * g * s`` and ``dgate = dy * u * s * (1 + g (1 - s))``,
  recomputing ``s`` from ``g`` (an exponential per element is cheaper than writing the (A, I)
  sigmoid in the forward and reading it back: the twin's cache holds no ``sig``).

Float32 uses :func:`refimpl.kernels.vecmath_nb.exp32` (vectorised, <= 2 ulp), float64 libm's
``exp``. ``1 / (1 + exp(-g))`` is the logistic function without overflow trouble: for ``g`` below
about -88 (float32) ``exp(-g)`` is inf and ``s`` is 0, as the reference's tanh form gives. The
results differ from the reference by float rounding only (a few ulp; the tanh form also loses
the tiny sigmoid of very negative ``g`` to cancellation, where this form keeps it). Rows run in
parallel; the callers allocate the outputs with NumPy (see :mod:`refimpl.kernels.moe_nb`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .moe_nb import run_sized
from .vecmath_nb import fast_exp


@njit(cache=True, parallel=True)
def swiglu_rows(gate, up, h, one):
    """h = silu(gate) * up over (R, I) rows; h preallocated; ``one`` is 1 in the arrays' dtype."""
    n, m = gate.shape
    for i in prange(n):
        for j in range(m):
            g = gate[i, j]
            s = one / (one + fast_exp(-g))
            h[i, j] = g * s * up[i, j]
    return h


@njit(cache=True, parallel=True)
def swiglu_grad_rows(dy, gate, up, dgate, dup, one):
    """dgate, dup of h = silu(gate) * up at upstream dy (R, I); outputs preallocated; ``one`` as above."""
    n, m = gate.shape
    for i in prange(n):
        for j in range(m):
            g = gate[i, j]
            s = one / (one + fast_exp(-g))
            d = dy[i, j]
            dup[i, j] = d * g * s
            dgate[i, j] = d * up[i, j] * s * (one + g * (one - s))
    return dgate, dup


def swiglu(gate, up):
    """Twin of the SwiGLU forward on 2-D float arrays: h (R, I) (one thread below
    :data:`refimpl.kernels.moe_nb.PARALLEL_MIN_WORK` elements, as the MoE kernels around it)."""
    return run_sized(swiglu_rows, gate.size, gate, up, np.empty_like(gate), gate.dtype.type(1.0), serial=False)


def swiglu_grad(dy, gate, up):
    """Twin of the SwiGLU backward on 2-D float arrays: dgate, dup (R, I) (threads as :func:`swiglu`)."""
    return run_sized(swiglu_grad_rows, gate.size, dy, gate, up, np.empty_like(gate), np.empty_like(gate),
                     gate.dtype.type(1.0), serial=False)
