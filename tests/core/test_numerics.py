"""Numerical behaviour: extreme logits, masks, ignore-index, Numba twin == NumPy reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import core
from refimpl.testing import strategies as rst
from refimpl.testing import tol


@given(data=rst.logits_and_targets(max_rows=6, max_vocab=300), reduction=st.sampled_from(["mean", "sum", "none"]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_cross_entropy_numba_equals_numpy(data, reduction, dtype):
    logits, targets = data
    logits = logits.astype(dtype)
    t = tol("equiv64" if dtype == np.float64 else "equiv32")
    dl = np.full(targets.shape if reduction == "none" else (), 0.7, dtype=dtype)
    ln, gn = core.cross_entropy(logits, targets, dl, reduction=reduction, backend="numpy")
    lb, gb = core.cross_entropy(logits, targets, dl, reduction=reduction, backend="numba")
    lf, _ = core.cross_entropy(logits, targets, reduction=reduction, backend="numba", grad=False)
    scale = np.abs(logits).max()          # a loss of a 1e4-scale logit is itself ~1e4
    np.testing.assert_allclose(lb, ln, rtol=t["rtol"], atol=t["atol"] * max(scale, 1))
    np.testing.assert_allclose(lf, ln, rtol=t["rtol"], atol=t["atol"] * max(scale, 1))
    np.testing.assert_allclose(gb, gn, **t)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_extreme_logits_stay_finite(dtype, backend):
    z = np.array([[1e4, -1e4, 0.0, 9999.0], [-1e4, -1e4, -1e4, -1e4]], dtype=dtype)
    loss, d = core.cross_entropy(z, np.array([1, 2]), np.ones(2, dtype), reduction="none", backend=backend)
    assert np.isfinite(loss).all()
    assert loss[0] == pytest.approx(2e4 + np.log1p(np.exp(-1.0)), rel=1e-6)
    assert loss[1] == pytest.approx(np.log(4), rel=1e-6)
    assert np.isfinite(d).all()
    for fwd in (core.softmax_forward, core.log_softmax_forward, core.logsumexp_forward):
        assert np.isfinite(fwd(z)[0]).all(), fwd.__name__


def test_cross_entropy_ignore_index_and_empty_mask():
    z = np.random.default_rng(0).standard_normal((4, 5))
    t = np.array([1, -100, 3, -100])
    full, _ = core.cross_entropy(z, t, reduction="none", backend="numpy", grad=False)
    assert full[1] == 0 and full[3] == 0
    mean, d = core.cross_entropy(z, t, backend="numpy")
    assert mean == pytest.approx((full[0] + full[2]) / 2)
    assert np.all(d[[1, 3]] == 0)
    np.testing.assert_allclose(d.sum(axis=-1), 0.0, atol=1e-15)
    for backend in ("numpy", "numba"):
        loss, d = core.cross_entropy(z, np.full(4, core.IGNORE_INDEX), backend=backend)
        assert loss == 0.0 and np.all(d == 0)
    alt, _ = core.cross_entropy(z, np.array([1, 0, 3, 0]), ignore_index=0, reduction="none", grad=False)
    np.testing.assert_allclose(alt[[0, 2]], full[[0, 2]])


def test_cross_entropy_leading_shape_preserved():
    z = np.random.default_rng(1).standard_normal((2, 3, 7))
    loss, d = core.cross_entropy(z, np.zeros((2, 3), dtype=np.int64), np.ones((2, 3)), reduction="none")
    assert loss.shape == (2, 3) and d.shape == (2, 3, 7)


def test_softmax_masks():
    x = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]])
    p, c = core.softmax_forward(x)
    assert p[0, 1] == 0 and p[0].sum() == pytest.approx(1) and np.all(p[1] == 0)
    assert np.isfinite(core.softmax_backward(np.ones_like(p), c)).all()
    lse, _ = core.logsumexp_forward(x)
    assert lse[1] == -np.inf and lse[0] == pytest.approx(np.log(1 + np.e))


@given(x=rst.float_arrays(rst.shapes(min_dims=1, max_dims=3, max_side=5), min_value=-50, max_value=50))
def test_softmax_invariants(x):
    p, _ = core.softmax_forward(x)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    q, _ = core.softmax_forward(x + 123.0)          # shift invariance
    np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-300)
    lp, _ = core.log_softmax_forward(x)
    np.testing.assert_allclose(np.exp(lp), p, rtol=1e-9, atol=1e-300)
    lse, _ = core.logsumexp_forward(x)
    np.testing.assert_allclose(lp, x - lse[..., None], rtol=1e-12, atol=1e-12)


def test_swiglu_mlp_is_silu_gate_times_up(rng):
    x = rng.standard_normal((3, 4))
    p = {"gate_proj": rng.standard_normal((6, 4)), "up_proj": rng.standard_normal((6, 4)),
         "down_proj": rng.standard_normal((4, 6))}
    y, _ = core.swiglu_mlp_forward(x, p)
    g = x @ p["gate_proj"].T
    np.testing.assert_allclose(y, (g / (1 + np.exp(-g)) * (x @ p["up_proj"].T)) @ p["down_proj"].T, rtol=1e-12)
