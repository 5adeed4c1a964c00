"""The one table of numerical tolerances used by refimpl's tests (and offered to users' tests).

Each entry is ``name: (rtol, atol, reason)``. Loosen an entry only with a written reason.
"""

from __future__ import annotations

TOLERANCES = {
    # Central differences in float64 with eps=1e-6 have truncation error ~eps^2*f''' and rounding
    # error ~1e-16/eps = 1e-10 relative; 1e-6 leaves room for curvature without hiding a wrong term.
    "gradcheck": (1e-6, 0.0, "float64 central differences, eps=1e-6"),
    # Two float64 computations of the same function in different orders (absorbed vs naive MLA,
    # sparse vs dense MoE, chunked vs whole losses, Numba vs NumPy).
    "equiv64": (1e-10, 1e-12, "float64 reassociation only"),
    # The same in float32: a few ulps of accumulated rounding across reductions of length ~1e4.
    "equiv32": (2e-5, 1e-6, "float32 reassociation over long reductions"),
    # refimpl float64 vs torch autograd float64 for the same primitive.
    "torch64": (1e-10, 1e-12, "float64 on both sides, different summation order"),
    # refimpl float64 vs transformers float64 models: transformers computes RMSNorm, the router
    # and the RoPE tables in float32 even in float64 models (reference §10: ~5e-7..1e-6 in logits).
    "transformers64": (1e-5, 2e-6, "transformers runs RMSNorm/router/RoPE tables in float32"),
}


def tol(name: str) -> dict:
    """``{"rtol": ..., "atol": ...}`` for :func:`numpy.testing.assert_allclose`."""
    if name not in TOLERANCES:
        raise ValueError(f"name: expected one of {sorted(TOLERANCES)}, got {name!r}")
    rtol, atol, _ = TOLERANCES[name]
    return {"rtol": rtol, "atol": atol}
