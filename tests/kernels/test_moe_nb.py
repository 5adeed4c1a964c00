"""MoE twins over more tokens than one parallel task (SELECT_BLOCK) holds: equal to the NumPy reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")
from refimpl.kernels.moe_nb import SELECT_BLOCK  # noqa: E402
from refimpl.moe.dispatch import combine, combine_backward, dispatch, dispatch_backward, make_plan  # noqa: E402
from refimpl.moe.gating import select_experts  # noqa: E402
from refimpl.testing import strategies as rst  # noqa: E402
from refimpl.testing import tol  # noqa: E402


@given(rst.seeds(), st.sampled_from([None, "max", "top2_sum"]), st.booleans(),
       st.sampled_from([np.float32, np.float64]))
def test_select_experts_many_tokens(rng, mode, ties, dtype):
    n, e = 2 * SELECT_BLOCK + 5, 32
    sel = rng.standard_normal((n, e))
    sel = (np.round(sel) if ties else sel).astype(dtype)
    kw = dict(n_group=4 if mode else 1, topk_group=2 if mode else 1, group_score=mode)
    a = select_experts(sel, 6, backend="numpy", **kw)
    np.testing.assert_array_equal(select_experts(sel, 6, backend="numba", **kw), a)


@given(rst.seeds(), st.sampled_from([np.float32, np.float64]))
def test_dispatch_combine_many_tokens(rng, dtype):
    n, e, k, d = 300, 8, 3, 17
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]                 # (N, K) distinct experts
    keep = rng.random((n, k)) < 0.9                                     # some copies dropped
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.random((n, k)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    t = tol("equiv64" if dtype == np.float64 else "equiv32")
    pa, pb = make_plan(idx, e, keep, backend="numpy"), make_plan(idx, e, keep, backend="numba")
    for u, v in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(u, v)
    xs = dispatch(x, pa, backend="numpy")
    np.testing.assert_array_equal(dispatch(x, pa, backend="numba"), xs)
    ys = (xs * 1.5).astype(dtype)
    np.testing.assert_allclose(combine(ys, w, pa, backend="numba"), combine(ys, w, pa, backend="numpy"), **t)
    (dys_nb, dw_nb), (dys_np, dw_np) = (combine_backward(dy, ys, w, pa, backend=b) for b in ("numba", "numpy"))
    np.testing.assert_allclose(dys_nb, dys_np, **t)
    # dweights[n, k] = <dy[n], ys[pos[n, k]]>, a D-term dot product that can cancel to near 0; the two
    # backends sum it in different orders, so its rounding error scales with sum_d |dy| |ys|, not with
    # the result (a saved float32 example: -0.0088 off by 1.25e-6, 1.4e-4 relative)
    mag = np.einsum("nd,nkd->nk", np.abs(dy), np.abs(ys[np.where(pa.pos >= 0, pa.pos, 0)])).astype(np.float64)
    err = np.abs(dw_nb.astype(np.float64) - dw_np)                      # (N, K)
    assert (err <= t["atol"] + t["rtol"] * mag).all(), float((err / (t["atol"] + t["rtol"] * mag)).max())
    np.testing.assert_allclose(dispatch_backward(ys, pa, backend="numba"), dispatch_backward(ys, pa, backend="numpy"),
                               **t)


def test_serial_twins_match_the_parallel_kernels_bit_for_bit(rng):
    """Below PARALLEL_MIN_WORK the MoE entry points run each kernel's serial compilation: same loops, same
    order of arithmetic, so every output must equal the parallel kernel's exactly (float32, with
    dropped copies), and the copy must be a separate cached function without ``parallel``."""
    from refimpl.kernels import moe_nb
    n, e, k, d = 200, 8, 3, 33
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    keep = rng.random((n, k)) < 0.9
    plan = make_plan(idx, e, keep, backend="numpy")
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, dy, w, ys = f32(n, d), f32(n, d), rng.random((n, k)).astype(np.float32), f32(plan.token.size, d)
    sel = f32(n, 64)
    calls = [
        (moe_nb.select_experts_jit, lambda: (sel, 6, 8, 4, 2, -np.inf)),
        (moe_nb.dispatch_jit, lambda: (x, plan.token, np.empty_like(ys), False)),
        (moe_nb.combine_jit, lambda: (ys, w, plan.pos, np.empty_like(x))),
        (moe_nb.combine_backward_jit, lambda: (dy, ys, w, plan.pos, plan.token, np.empty_like(ys),
                                               np.empty_like(w), False)),
        (moe_nb.dispatch_backward_jit, lambda: (ys, plan.pos, np.empty_like(x))),
    ]
    for fn, args in calls:
        twin = moe_nb.serial_twin(fn)
        assert twin is moe_nb.serial_twin(fn) and twin is not fn
        assert twin.py_func.__name__ == fn.py_func.__name__ + "_serial"
        assert "parallel" not in twin.targetoptions
        assert twin.targetoptions.get("fastmath") == fn.targetoptions.get("fastmath")
        a, b = fn(*args()), twin(*args())
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
            np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))


@given(rst.seeds(), st.sampled_from([np.float32, np.float64]), st.integers(1, 7), st.sampled_from([1, 5, 64, 300]),
       st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.booleans())
def test_combine_twins_sum_in_slot_order_bit_for_bit(rng, dtype, k, d, keep_p, serial):
    """combine and dispatch_backward read two copies per sweep of a token's row, but the sum is still
    ((0 + w0 y0) + w1 y1) + ... over the kept slots in slot order: written out here in NumPy one slot
    at a time (a dropped slot adds nothing, not even a 0), the twins must match it to the bit."""
    from refimpl.kernels import moe_nb
    n, e = 150, 8
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    plan = make_plan(idx, e, rng.random((n, k)) < keep_p, backend="numpy")
    ys = rng.standard_normal((plan.token.size, d)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    want_y = np.zeros((n, d), dtype)
    want_dx = np.zeros((n, d), dtype)
    padded = np.concatenate([ys, np.zeros((1, d), dtype)])             # row A stands in for a dropped copy
    for s in range(k):
        kept = (plan.pos[:, s] >= 0)[:, None]
        rows = padded[np.where(plan.pos[:, s] >= 0, plan.pos[:, s], ys.shape[0])]  # (N, D)
        want_y = np.where(kept, want_y + w[:, s:s + 1] * rows, want_y)
        want_dx = np.where(kept, want_dx + rows, want_dx)
    comb, dbwd = moe_nb.combine_jit, moe_nb.dispatch_backward_jit
    if serial:
        comb, dbwd = moe_nb.serial_twin(comb), moe_nb.serial_twin(dbwd)
    got_y = comb(ys, w, plan.pos, np.full((n, d), np.nan, dtype))
    got_dx = dbwd(ys, plan.pos, np.full((n, d), np.nan, dtype))
    np.testing.assert_array_equal(got_y.view(np.uint8), want_y.view(np.uint8))
    np.testing.assert_array_equal(got_dx.view(np.uint8), want_dx.view(np.uint8))
