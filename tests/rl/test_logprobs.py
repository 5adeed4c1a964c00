"""Per-token log-probs and entropies from logits: gradients, stability, chunking, validation."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl import (
    entropy_backward,
    entropy_forward,
    logps_entropy_backward,
    logps_entropy_forward,
    selective_log_softmax_backward,
    selective_log_softmax_forward,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

GRAD_TOL = tol("gradcheck")["rtol"]


@given(rng=rst.seeds(), lead=rst.shapes(min_dims=1, max_dims=2, max_side=4), V=st.integers(1, 7),
       tau=st.sampled_from([1.0, 0.5, 1.7]), scale=st.sampled_from([1.0, 5.0]))
def test_gradients(rng, lead, V, tau, scale):
    z = scale * rng.standard_normal((*lead, V))
    ids = rng.integers(0, V, size=lead)

    def f_logp(x):
        y, c = selective_log_softmax_forward(x, ids, temperature=tau)
        return y, lambda dy: (selective_log_softmax_backward(dy, c),)

    def f_ent(x):
        y, c = entropy_forward(x, temperature=tau)
        return y, lambda dy: (entropy_backward(dy, c),)

    def f_both(x):
        lp, h, c = logps_entropy_forward(x, ids, temperature=tau, chunk_rows=2)
        return (lp, h), lambda d: (logps_entropy_backward(d[0], d[1], c, chunk_rows=3),)

    assert check_grad(f_logp, [z], eps=1e-6 * scale) < GRAD_TOL   # log1p keeps confident tokens exact
    # The entropy of a saturated row (|z / tau| ~ 10) and its gradient fall to ~1e-8, below the
    # finite-difference noise floor, so a relative error would measure noise: unit-scale logits only.
    z = z / scale
    for f in (f_ent, f_both):
        assert check_grad(f, [z]) < GRAD_TOL


@given(rng=rst.seeds(), n=st.integers(1, 9), V=st.integers(2, 9), chunk=st.integers(1, 4))
def test_chunking_changes_nothing(rng, n, V, chunk):
    z = rng.standard_normal((n, V))
    ids = rng.integers(0, V, size=n)
    g, h = rng.standard_normal(n), rng.standard_normal(n)
    a = logps_entropy_forward(z, ids, chunk_rows=chunk)
    b = logps_entropy_forward(z, ids)
    np.testing.assert_allclose(a[0], b[0], **tol("equiv64"))
    np.testing.assert_allclose(a[1], b[1], **tol("equiv64"))
    np.testing.assert_allclose(logps_entropy_backward(g, h, a[2], chunk_rows=chunk),
                               logps_entropy_backward(g, h, b[2]), **tol("equiv64"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite(dtype, rng):
    z = (1e4 * rng.standard_normal((4, 6, 9))).astype(dtype)
    ids = rng.integers(0, 9, size=(4, 6))
    lp, h, c = logps_entropy_forward(z, ids, temperature=0.7)
    dz = logps_entropy_backward(np.ones((4, 6)), np.ones((4, 6)), c)
    assert lp.dtype == h.dtype == dz.dtype == dtype
    assert np.isfinite(lp).all() and np.isfinite(h).all() and np.isfinite(dz).all()
    assert np.all(lp <= 0) and np.all(h >= -1e-6)
    # argmax token: log-prob ~ 0 and gradient row ~ 0 in float32 too (no cancellation of 1e4-sized values)
    top = z.argmax(-1)
    lp_top, _ = selective_log_softmax_forward(z, top, temperature=0.7)
    np.testing.assert_allclose(lp_top, 0.0, atol=1e-6)


def test_entropy_of_uniform_and_one_hot():
    h, _ = entropy_forward(np.zeros((2, 5)))
    np.testing.assert_allclose(h, np.log(5), rtol=1e-14)
    h, _ = entropy_forward(np.array([[0.0, -1e4, -1e4]]))
    np.testing.assert_allclose(h, 0.0, atol=1e-12)


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), [
    ((np.zeros((2, 3)), np.array([0, 3])), {}, ValueError, "ids: expected values < 3"),
    ((np.zeros((2, 3)), np.array([0, 1, 2])), {}, ValueError, "ids: expected shape"),
    ((np.zeros((2, 3)), np.array([0.0, 1.0])), {}, TypeError, "ids"),
    ((np.zeros((2, 3), np.float16), np.array([0, 1])), {}, TypeError, "logits"),
    ((np.array([[0.0, -np.inf]]), np.array([0])), {}, ValueError, "logits"),
    ((np.zeros((2, 3)), np.array([0, 1])), {"temperature": 0.0}, ValueError, "temperature"),
    ((np.zeros((2, 3)), np.array([0, 1])), {"temperature": "1"}, TypeError, "temperature"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        selective_log_softmax_forward(*args, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confident_token_keeps_its_digits(dtype):
    """log p = -log1p(e^-25) ~ -1.4e-11 survives in float32 (log(1 + 1.4e-11) rounds to 0 there)."""
    lp, _ = selective_log_softmax_forward(np.array([[0.0, -25.0]], dtype=dtype), np.array([0]))
    np.testing.assert_allclose(lp, [-np.exp(-25.0)], rtol=1e-6)
