"""``out=`` on dispatch / combine and their backwards: the same values written into the caller's
buffers, through both backends, and a ValueError naming ``out`` for a buffer that does not fit."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.backend import numba_available
from refimpl.moe.dispatch import combine, combine_backward, dispatch, dispatch_backward, make_plan
from refimpl.testing import strategies as rst

BACKENDS = ["numpy"] + (["numba"] if numba_available() else [])


def _problem(rng, dtype, n=40, e=6, k=3, d=5):
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]                 # (N, K) distinct experts
    keep = rng.random((n, k)) < 0.8                                     # some copies dropped
    plan = make_plan(idx, e, keep, backend="numpy")
    x = rng.standard_normal((n, d)).astype(dtype)
    ys = rng.standard_normal((plan.token.size, d)).astype(dtype)
    w = rng.random((n, k)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    return plan, x, ys, w, dy


def _garbage(shape, dtype):
    """A reused buffer holds the previous step's values: start from non-zero junk (NaN included)."""
    a = np.full(shape, 7.0, dtype=dtype)
    a.flat[::3] = np.nan
    return a


@pytest.mark.parametrize("backend", BACKENDS)
@given(rst.seeds(), st.sampled_from([np.float32, np.float64]))
def test_out_equals_fresh_result(backend, rng, dtype):
    plan, x, ys, w, dy = _problem(rng, dtype)
    n, d = x.shape
    a = ys.shape[0]

    out = _garbage((a, d), dtype)
    r = dispatch(x, plan, backend=backend, out=out)
    assert r is out
    np.testing.assert_array_equal(out, dispatch(x, plan, backend=backend))

    out = _garbage((n, d), dtype)
    assert combine(ys, w, plan, backend=backend, out=out) is out
    np.testing.assert_array_equal(out, combine(ys, w, plan, backend=backend))

    out = _garbage((n, d), dtype)
    assert dispatch_backward(ys, plan, backend=backend, out=out) is out
    np.testing.assert_array_equal(out, dispatch_backward(ys, plan, backend=backend))

    bufs = (_garbage((a, d), dtype), _garbage(w.shape, dtype))
    dys, dw = combine_backward(dy, ys, w, plan, backend=backend, out=bufs)
    assert dys is bufs[0] and dw is bufs[1]
    for u, v in zip((dys, dw), combine_backward(dy, ys, w, plan, backend=backend), strict=True):
        np.testing.assert_array_equal(u, v)
    assert np.all(dw[plan.pos < 0] == 0.0)                              # dropped copies: zero, not junk


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_raises_naming_out(backend):
    plan, x, ys, w, dy = _problem(np.random.default_rng(0), np.float32)
    n, d = x.shape
    a = ys.shape[0]
    bad = {
        "shape": np.empty((a + 1, d), np.float32),
        "dtype": np.empty((a, d), np.float64),
        "layout": np.empty((d, a), np.float32).T,
        "type": [[0.0] * d] * a,
    }
    for out in bad.values():
        with pytest.raises(ValueError, match=r"^out"):
            dispatch(x, plan, backend=backend, out=out)
        with pytest.raises(ValueError, match=r"^out\[0\]"):
            combine_backward(dy, ys, w, plan, backend=backend, out=(out, np.empty(w.shape, np.float32)))
    ro = np.empty((n, d), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: expected a writeable"):
        combine(ys, w, plan, backend=backend, out=ro)
    assert a > n
    buf = np.empty((a, d), np.float32)
    buf[:n] = x
    with pytest.raises(ValueError, match=r"^out: must not overlap"):   # x is a part of out
        dispatch(buf[:n], plan, backend=backend, out=buf)
    with pytest.raises(ValueError, match=r"^out: must not overlap"):
        combine(ys, w, plan, backend=backend, out=ys[:n])
    with pytest.raises(ValueError, match=r"^out: must not overlap"):
        dispatch_backward(ys, plan, backend=backend, out=ys[:n])
    big = np.empty((n + a, d), np.float32)                              # dys and dw inside ys's buffer
    with pytest.raises(ValueError, match=r"^out\[0\] \(dys\): must not overlap"):
        combine_backward(dy, big[:a], w, plan, backend=backend, out=(big[n:], np.empty(w.shape, np.float32)))
    with pytest.raises(ValueError, match=r"^out\[1\] \(dweights\): must not overlap"):
        dys = np.empty((a, d), np.float32)
        combine_backward(dy, ys, w, plan, backend=backend, out=(dys, dys.reshape(-1)[:w.size].reshape(w.shape)))
    with pytest.raises(ValueError, match=r"^out: expected a pair"):
        combine_backward(dy, ys, w, plan, backend=backend, out=np.empty((a, d), np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_out_of_bounds_raises_naming_the_field(backend):
    """A hand-made plan is checked for bounds before any kernel indexes with it (the Numba twins do
    not bounds-check; NumPy would wrap a negative index): a ValueError naming plan.pos / plan.token."""
    from refimpl.moe.dispatch import DispatchPlan
    plan, x, ys, w, dy = _problem(np.random.default_rng(1), np.float32)
    n, a = x.shape[0], ys.shape[0]
    calls = {
        "dispatch": lambda p: dispatch(x, p, backend=backend),
        "combine": lambda p: combine(ys, w, p, backend=backend),
        "combine_backward": lambda p: combine_backward(dy, ys, w, p, backend=backend),
        "dispatch_backward": lambda p: dispatch_backward(ys, p, backend=backend),
    }
    for value, where in ((a, 0), (-2, 1)):                               # first row past the end; below -1
        pos = plan.pos.copy()
        pos.flat[where] = value
        for call in calls.values():
            with pytest.raises(ValueError, match=r"^plan\.pos: expected values (>= -1|< \d+), got"):
                call(plan._replace(pos=pos))
    for value in (n, -1):
        token = plan.token.copy()
        token[3] = value
        for call in calls.values():
            with pytest.raises(ValueError, match=r"^plan\.token: expected values (>= 0|< \d+), got"):
                call(plan._replace(token=token))
    with pytest.raises(TypeError, match=r"^plan\.pos: expected an integer array"):
        dispatch(x, plan._replace(pos=plan.pos.astype(float)), backend=backend)
    with pytest.raises(ValueError, match=r"^plan: expected pos \(N, K\) and token \(A,\)"):
        dispatch(x, plan._replace(token=plan.token[:, None]), backend=backend)
    with pytest.raises(ValueError, match=r"^plan: expected a DispatchPlan"):
        combine(ys, w, (plan.pos, plan.token), backend=backend)
    assert isinstance(plan, DispatchPlan)                              # and a valid plan still runs
    for call in calls.values():
        call(plan)
