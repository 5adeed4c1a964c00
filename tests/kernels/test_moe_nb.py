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
