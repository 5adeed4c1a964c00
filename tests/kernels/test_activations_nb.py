"""The fused SwiGLU twin (refimpl.kernels.activations_nb) against the NumPy reference, and the MoE
experts routed through it (float32 with backend="numba"; float64 and the default stay on NumPy)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")
from refimpl.core.activations import swiglu_backward, swiglu_forward  # noqa: E402
from refimpl.kernels import activations_nb  # noqa: E402
from refimpl.moe.dispatch import experts_backward, experts_forward, make_plan  # noqa: E402
from refimpl.testing import check_grad, tol  # noqa: E402
from refimpl.testing import strategies as rst  # noqa: E402


@given(rst.seeds(), st.sampled_from([np.float32, np.float64]), st.integers(1, 40), st.integers(1, 70),
       st.sampled_from([1.0, 8.0, 60.0]))
def test_swiglu_twin_matches_reference(rng, dtype, rows, width, scale):
    """Values and both gradients, over gates from mild to saturating (|g| up to ~200)."""
    g = (scale * rng.standard_normal((rows, width))).astype(dtype)      # (R, I)
    u = rng.standard_normal((rows, width)).astype(dtype)                # (R, I)
    dy = rng.standard_normal((rows, width)).astype(dtype)               # (R, I)
    t = tol("equiv64" if dtype == np.float64 else "equiv32")
    h, cache = swiglu_forward(g, u)
    hn = activations_nb.swiglu(g, u)
    assert hn.dtype == dtype
    np.testing.assert_allclose(hn, h, rtol=t["rtol"], atol=t["atol"] * scale)
    for a, b in zip(activations_nb.swiglu_grad(dy, g, u), swiglu_backward(dy, cache), strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=t["rtol"], atol=t["atol"] * scale)


@given(rst.seeds())
def test_swiglu_twin_gradient_by_finite_differences(rng):
    g = 3.0 * rng.standard_normal((3, 7))
    u = rng.standard_normal((3, 7))

    def f(g, u):
        return activations_nb.swiglu(g, u), lambda dy: activations_nb.swiglu_grad(dy, g, u)
    assert check_grad(f, [g, u]) < tol("gradcheck")["rtol"]


def _experts(rng, dtype, n=50, d=12, i=10, e=4, k=2):
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    plan = make_plan(idx, e, backend="numpy")
    xs = rng.standard_normal((plan.token.size, d)).astype(dtype)        # (A, D)
    w = {name: (0.3 * rng.standard_normal(shape)).astype(dtype)
         for name, shape in (("gate_proj", (e, i, d)), ("up_proj", (e, i, d)), ("down_proj", (e, d, i)))}
    dys = rng.standard_normal(xs.shape).astype(dtype)                   # (A, D)
    return xs, w, plan.offsets, dys


@given(rst.seeds())
def test_experts_float32_through_the_twin(rng):
    xs, w, offsets, dys = _experts(rng, np.float32)
    ys, cache = experts_forward(xs, w, offsets, backend="numba")
    assert cache.act.sig is None                                        # the twin ran
    ref, rcache = experts_forward(xs, w, offsets, backend="numpy")
    assert rcache.act.sig is not None
    t = tol("equiv32")
    np.testing.assert_allclose(ys, ref, rtol=t["rtol"], atol=t["atol"])
    (dx, dw), (rdx, rdw) = experts_backward(dys, cache), experts_backward(dys, rcache)
    np.testing.assert_allclose(dx, rdx, rtol=t["rtol"], atol=t["atol"])
    for name in w:
        np.testing.assert_allclose(dw[name], rdw[name], rtol=t["rtol"], atol=t["atol"])


def test_experts_float64_stays_on_numpy():
    xs, w, offsets, dys = _experts(np.random.default_rng(0), np.float64)
    ys, cache = experts_forward(xs, w, offsets, backend="numba")
    assert cache.act.sig is not None
    np.testing.assert_array_equal(ys, experts_forward(xs, w, offsets, backend="numpy")[0])
