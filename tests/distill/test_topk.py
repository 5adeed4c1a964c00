"""Top-k logit distillation: gradients, K = V equals full KL, support of the gradient, extremes."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refimpl import distill as d
from refimpl.testing import check_grad, tol

from .helpers import pair_inputs

GRAD_TOL = tol("gradcheck")["rtol"]
EQ64 = tol("equiv64")
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@given(data=st.data(), inputs=pair_inputs(), add_tail=st.booleans(), reduction=st.sampled_from(REDUCTIONS),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_gradcheck(data, inputs, add_tail, reduction, temperature):
    s, t, labels = inputs
    k = data.draw(st.integers(1, s.shape[-1]))
    lp, ids = d.teacher_topk(t, k, temperature=temperature)
    kw = dict(add_tail=add_tail, temperature=temperature, reduction=reduction)
    def f(x):
        loss, _ = d.topk_kl_loss(x, lp, ids, labels, **kw)
        return loss, lambda dy: (d.topk_kl_loss(x, lp, ids, labels, dloss=dy, **kw)[1],)
    assert check_grad(f, [s]) < GRAD_TOL


@given(inputs=pair_inputs(scales=(1.0, 30.0, 1e4)), add_tail=st.booleans(), temperature=st.sampled_from([0.5, 2.0]),
       reduction=st.sampled_from(["batchmean", "sum"]))
def test_k_equals_v_is_forward_kl(inputs, add_tail, temperature, reduction):
    s, t, labels = inputs
    lp, ids = d.teacher_topk(t, s.shape[-1], temperature=temperature)
    kw = dict(temperature=temperature, reduction=reduction)
    got, dgot = d.topk_kl_loss(s, lp, ids, labels, add_tail=add_tail, **kw)
    want, dwant = d.forward_kl_loss(s, t, labels, **kw)
    scale = max(1.0, abs(float(want)))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(dgot, dwant, rtol=1e-9, atol=1e-12)


@given(data=st.data(), inputs=pair_inputs(masked=False, scales=(1.0, 30.0, 1e4)))
def test_support_nonnegative_and_zero_at_teacher(data, inputs):
    """Renormalised: gradient 0 outside the K ids. Both: loss >= 0, = 0 with zero grad at q = p."""
    s, t, labels = inputs
    k = data.draw(st.integers(1, s.shape[-1]))
    lp, ids = d.teacher_topk(t, k)
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        loss, ds = d.topk_kl_loss(s, lp, ids, labels, reduction="none")
        tail, dtail = d.topk_kl_loss(s, lp, ids, labels, add_tail=True, reduction="none")
        zero, dzero = d.topk_kl_loss(t, lp, ids, labels, reduction="sum")
        zero_t, dzero_t = d.topk_kl_loss(t, lp, ids, labels, add_tail=True, reduction="sum")
    outside = np.ones(s.shape, dtype=bool)
    np.put_along_axis(outside, ids, False, axis=-1)
    assert (ds[outside] == 0).all() and np.isfinite(dtail).all()
    assert loss.shape == s.shape[:-1] + (k,) and tail.shape == s.shape[:-1] + (k + 1,)
    assert (loss.sum(-1) >= -1e-12).all() and (tail.sum(-1) >= -1e-9 * np.maximum(1, np.abs(tail).sum(-1))).all()
    assert abs(float(zero)) < 1e-12 and abs(float(zero_t)) < 1e-12
    assert np.abs(dzero).max() < 1e-12 and np.abs(dzero_t).max() < 1e-12


def test_tail_bucket_by_hand():
    """V = 4, K = 2: the tail entry is the remaining mass on both sides."""
    q = np.array([0.4, 0.3, 0.2, 0.1])
    p = np.array([0.1, 0.5, 0.3, 0.1])
    s, t = np.log(q)[None], np.log(p)[None]
    lp, ids = d.teacher_topk(t, 2)
    assert ids.tolist() == [[1, 2]]
    loss, ds = d.topk_kl_loss(s, lp, ids, add_tail=True)
    pk, qk = np.array([0.5, 0.3, 0.2]), np.array([0.3, 0.2, 0.5])
    assert abs(float(loss) - np.sum(pk * np.log(pk / qk))) < 1e-12
    # gradient (q - p~) with the teacher's tail mass 0.2 spread like the student's tail (0.4, 0.1)
    np.testing.assert_allclose(ds[0], q - np.array([0.2 * 0.8, 0.5, 0.3, 0.2 * 0.2]), atol=1e-12)
    loss_r, ds_r = d.topk_kl_loss(s, lp, ids)
    ph, qh = np.array([0.625, 0.375]), np.array([0.6, 0.4])
    assert abs(float(loss_r) - np.sum(ph * np.log(ph / qh))) < 1e-12
    np.testing.assert_allclose(ds_r[0], [0.0, qh[0] - ph[0], qh[1] - ph[1], 0.0], atol=1e-12)


def test_teacher_topk_order_and_ties():
    t = np.array([[0.0, 2.0, 2.0, -1.0, 5.0]])
    lp, ids = d.teacher_topk(t, 3, temperature=2.0)
    assert ids.tolist() == [[4, 1, 2]]
    full = t / 2.0 - np.log(np.exp(t / 2.0).sum())
    np.testing.assert_allclose(lp, full[:, [4, 1, 2]], **EQ64)
