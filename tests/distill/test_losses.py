"""Distillation losses: finite-difference gradients, the spec's invariants and concrete vectors."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl import core
from refimpl import distill as d
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import PAIR_LOSSES, loss_f, pair_inputs

GRAD_TOL = tol("gradcheck")["rtol"]
EQ64 = tol("equiv64")
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
LN2 = np.log(2.0)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@given(data=st.data(), inputs=pair_inputs(), reduction=st.sampled_from(REDUCTIONS),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_gradcheck(name, data, inputs, reduction, temperature):
    """Every loss and reduction: analytic dstudent = central differences (random upstream for 'none')."""
    fn, options = PAIR_LOSSES[name]
    s, t, labels = inputs
    kw = options(data.draw)
    if name == "hinton" and labels is None:
        kw["alpha"] = 1.0                       # the hard term needs labels
    if name == "total_variation":               # |q - p| has kinks: keep the FD steps away from them
        q, p = (core.softmax_forward(x / temperature)[0] for x in (s, t))
        assume(np.abs(q - p).min() > 1e-5)
    f = loss_f(fn, t, labels, temperature=temperature, reduction=reduction, **kw)
    assert check_grad(f, [s]) < GRAD_TOL


@given(inputs=pair_inputs(), reduction=st.sampled_from(REDUCTIONS), temperature=st.sampled_from([0.7, 1.0]))
def test_gradcheck_sequence_kd(inputs, reduction, temperature):
    s, _, labels = inputs
    labels = np.zeros(s.shape[:-1], dtype=np.int64) if labels is None else labels
    # A label the student already predicts with probability 1 - 1e-6 has loss and gradient ~1e-6,
    # computed as logsumexp(z) - z_label ~ 10 - 10: the rounding noise of that cancellation, divided
    # by the finite-difference step, exceeds 1e-6 of the gradient (seen: 2.7e-6 at q = 1 - 1.4e-6),
    # while the analytic gradient is exact. Keep every valid row away from saturation.
    q = core.softmax_forward(s / temperature)[0]
    valid = labels != -100
    picked = np.take_along_axis(q, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    assume(np.all(picked[valid] < 1 - 1e-4))
    def f(x):
        loss, _ = d.sequence_kd_loss(x, labels, temperature=temperature, reduction=reduction)
        return loss, lambda dy: (d.sequence_kd_loss(x, labels, temperature=temperature, reduction=reduction,
                                                    dloss=dy)[1],)
    assert check_grad(f, [s]) < GRAD_TOL


DIVERGENCES = ["forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_reverse_kl", "total_variation"]


@pytest.mark.parametrize("name", DIVERGENCES)
@given(data=st.data(), inputs=pair_inputs(scales=(1.0, 30.0, 1e4)), temperature=st.sampled_from([0.3, 1.0, 4.0]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_nonnegative_and_zero_at_teacher(name, data, inputs, temperature, dtype):
    """D >= 0 per position (also at |logits| ~ 1e4, float32), and D = 0 with zero gradient at q = p."""
    fn, options = PAIR_LOSSES[name]
    s, t, labels = (x.astype(dtype) if x is not None and x.dtype.kind == "f" else x for x in inputs)
    kw = options(data.draw)
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        per_elem, ds = fn(s, t, labels, temperature=temperature, reduction="none", **kw)
        at_teacher, ds0 = fn(t, t, labels, temperature=temperature, reduction="sum", **kw)
    assert per_elem.dtype == ds.dtype == dtype and np.isfinite(ds).all()
    slack = 1e-5 if dtype == np.float32 else 1e-12
    assert (per_elem.sum(axis=-1) >= -slack * np.maximum(1.0, np.abs(per_elem).sum(axis=-1))).all()
    assert abs(float(at_teacher)) <= slack and np.abs(ds0).max() <= slack


@given(inputs=pair_inputs(scales=(1.0, 5.0, 1e4)), temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_jsd_symmetric_and_bounded(inputs, temperature):
    s, t, labels = inputs
    a, _ = d.generalized_jsd_loss(s, t, labels, beta=0.5, temperature=temperature, reduction="none")
    b, _ = d.generalized_jsd_loss(t, s, labels, beta=0.5, temperature=temperature, reduction="none")
    np.testing.assert_allclose(a.sum(-1), b.sum(-1), rtol=1e-10, atol=1e-12)
    assert (a.sum(-1) <= LN2 + 1e-12).all()


@given(inputs=pair_inputs(), temperature=st.sampled_from([0.5, 1.0, 2.0]), reduction=st.sampled_from(REDUCTIONS))
def test_jsd_beta_endpoints(inputs, temperature, reduction):
    """beta=0 is forward KL(p||q), beta=1 reverse KL(q||p) (TRL's special cases); near the ends the
    interior formula tends to beta*KL(p||q) and (1-beta)*KL(q||p), so the endpoints are a jump."""
    s, t, labels = inputs
    kw = dict(temperature=temperature, reduction=reduction)
    for beta, ref in [(0.0, d.forward_kl_loss), (1.0, d.reverse_kl_loss)]:
        got, dgot = d.generalized_jsd_loss(s, t, labels, beta=beta, **kw)
        want, dwant = ref(s, t, labels, **kw)
        np.testing.assert_allclose(got, want, **EQ64)
        np.testing.assert_allclose(dgot, dwant, **EQ64)


@given(inputs=pair_inputs(scales=(0.5, 1.0)), temperature=st.sampled_from([1.0, 2.0]))
def test_jsd_limits_at_the_ends(inputs, temperature):
    """GJSD_eps / eps -> KL(p||q) and GJSD_(1-eps) / eps -> KL(q||p). The O(eps) remainder is
    eps times a chi-square divergence, so the logits are kept mild (no probability below ~1e-4)."""
    s, t, labels = inputs
    eps = 1e-8
    fkl = d.forward_kl_loss(s, t, labels, temperature=temperature, reduction="sum")[0]
    rkl = d.reverse_kl_loss(s, t, labels, temperature=temperature, reduction="sum")[0]
    lo = d.generalized_jsd_loss(s, t, labels, beta=eps, temperature=temperature, reduction="sum")[0]
    hi = d.generalized_jsd_loss(s, t, labels, beta=1 - eps, temperature=temperature, reduction="sum")[0]
    # atol: GJSD at beta = eps or 1 - eps is O(eps KL), summed from terms of order 1 whose float64
    # rounding (~1e-16) becomes ~1e-8 after the division by eps; with near-equal distributions the KL
    # itself is that small (a found case: KL 5.5e-9, GJSD / eps -2.7e-10)
    np.testing.assert_allclose(lo / eps, fkl, rtol=1e-3, atol=5e-8)
    np.testing.assert_allclose(hi / eps, rkl, rtol=1e-3, atol=5e-8)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@given(data=st.data(), inputs=pair_inputs(), reduction=st.sampled_from(["batchmean", "sum", "mean"]))
def test_masked_positions(name, data, inputs, reduction):
    """Masked positions get zero gradient and the loss does not depend on their logits; adding a
    constant to a position's student logits changes nothing and every gradient row sums to 0."""
    fn, options = PAIR_LOSSES[name]
    s, t, labels = inputs
    rng = np.random.default_rng(0)
    labels = rng.integers(0, s.shape[-1], size=s.shape[:-1]) if labels is None else labels
    mask = labels == -100
    kw = dict(options(data.draw), reduction=reduction)
    loss, ds = fn(s, t, labels, **kw)
    assert (ds[mask] == 0).all()
    np.testing.assert_allclose(ds.sum(-1), 0.0, atol=1e-12)
    s2 = s.copy()
    s2[mask] = 100.0 * rng.standard_normal(s2[mask].shape)
    s2 += 7.0 * rng.standard_normal(s.shape[:-1])[..., None]          # per-position shift
    loss2, ds2 = fn(s2, t, labels, **kw)
    np.testing.assert_allclose(loss2, loss, **EQ64)
    np.testing.assert_allclose(ds2[~mask], ds[~mask], rtol=1e-9, atol=1e-12)


@given(inputs=pair_inputs(masked=False), temperature=st.sampled_from([0.25, 2.0, 5.0]))
def test_temperature_scaling(inputs, temperature):
    """loss(s, t; tau) = loss(s/tau, t/tau; 1) and the gradient w.r.t. raw logits is 1/tau times it."""
    s, t, labels = inputs
    for fn in (d.forward_kl_loss, d.reverse_kl_loss, d.generalized_jsd_loss, d.total_variation_loss):
        a, da = fn(s, t, labels, temperature=temperature)
        b, db = fn(s / temperature, t / temperature, labels)
        np.testing.assert_allclose(a, b, **EQ64)
        np.testing.assert_allclose(da, db / temperature, rtol=1e-9, atol=1e-12)


@given(inputs=pair_inputs(masked=False), temperature=st.sampled_from([1.0, 2.0, 4.0]))
def test_forward_kl_and_hinton_gradients(inputs, temperature):
    """FKL gradient (q - p)/tau; Hinton's T^2-scaled soft gradient tau (q - p); hinton pieces."""
    s, t, _ = inputs
    q = core.softmax_forward(s / temperature)[0]
    p = core.softmax_forward(t / temperature)[0]
    _, dfkl = d.forward_kl_loss(s, t, temperature=temperature, reduction="sum")
    np.testing.assert_allclose(dfkl, (q - p) / temperature, rtol=1e-9, atol=1e-12)
    _, dsoft = d.hinton_kd_loss(s, t, alpha=1.0, temperature=temperature, reduction="sum")
    np.testing.assert_allclose(dsoft, temperature * (q - p), rtol=1e-9, atol=1e-12)
    labels = np.argmax(t, axis=-1)
    a = 0.3
    hin, dhin = d.hinton_kd_loss(s, t, labels, alpha=a, temperature=temperature, reduction="batchmean")
    ce, dce = d.sequence_kd_loss(s, labels, reduction="batchmean")
    kl, dkl = d.forward_kl_loss(s, t, labels, temperature=temperature, reduction="batchmean")
    np.testing.assert_allclose(hin, (1 - a) * ce + a * temperature**2 * kl, **EQ64)
    np.testing.assert_allclose(dhin, (1 - a) * dce + a * temperature**2 * dkl, **EQ64)
    hin1, _ = d.hinton_kd_loss(s, t, labels, alpha=a, temperature=temperature, scale_by_t2=False)
    np.testing.assert_allclose(hin1, (1 - a) * ce + a * kl, **EQ64)


@given(data=rst.logits_and_targets(scale=3.0), reduction=st.sampled_from(["batchmean", "sum"]))
def test_sequence_kd_is_cross_entropy(data, reduction):
    logits, targets = data
    core_red = "mean" if reduction == "batchmean" else "sum"
    want, dwant = core.cross_entropy(logits, targets, reduction=core_red, backend="numpy")
    got, dgot = d.sequence_kd_loss(logits, targets, reduction=reduction)
    np.testing.assert_allclose(got, want, **EQ64)
    np.testing.assert_allclose(dgot, dwant, **EQ64)


def test_concrete_vectors():
    """Reference §6b: two-token vocabulary, p = [0.5, 0.5], q = [0.9, 0.1], tau = 1."""
    s = np.log(np.array([[0.9, 0.1]]))
    t = np.zeros((1, 2))
    for beta, value in [(0.0, 0.510826), (0.5, 0.101749), (1.0, 0.368064)]:
        loss, _ = d.generalized_jsd_loss(s, t, beta=beta)
        assert abs(float(loss) - value) < 1e-6
    _, ds = d.generalized_jsd_loss(s, t, beta=0.5)
    np.testing.assert_allclose(ds, [[0.060747, -0.060747]], atol=1e-6)
    _, ds = d.forward_kl_loss(s, t)
    np.testing.assert_allclose(ds, [[0.4, -0.4]], atol=1e-12)
    tv, _ = d.total_variation_loss(s, t)
    assert abs(float(tv) - 0.4) < 1e-12


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_all_masked_is_zero(name, reduction):
    """Every position masked: loss 0.0 and zero gradient (TRL would give 0/0 = NaN)."""
    fn, _ = PAIR_LOSSES[name]
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    with np.errstate(all="raise"):
        loss, ds = fn(s, t, np.full((2, 3), -100), reduction=reduction)
    assert float(loss) == 0.0 and not ds.any()


def test_reduction_denominators():
    """batchmean: / valid positions (labels) or / first axis (no labels); mean: / elements."""
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    labels = np.array([[1, -100, 2], [-100, -100, 4]])
    per_elem, _ = d.forward_kl_loss(s, t, labels, reduction="none")
    total = per_elem.sum()
    assert per_elem.shape == (2, 3, 5) and not per_elem[labels == -100].any()
    cases = [("sum", labels, total), ("batchmean", labels, total / 3), ("mean", labels, total / 15),
             ("batchmean", None, d.forward_kl_loss(s, t, reduction="sum")[0] / 2),
             ("mean", None, d.forward_kl_loss(s, t, reduction="sum")[0] / 30)]
    for reduction, lab, want in cases:
        np.testing.assert_allclose(d.forward_kl_loss(s, t, lab, reduction=reduction)[0], want, **EQ64)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_float32_matches_float64(name):
    fn, _ = PAIR_LOSSES[name]
    rng = np.random.default_rng(5)
    s, t = 3 * rng.standard_normal((4, 6, 50)), 3 * rng.standard_normal((4, 6, 50))
    labels = rng.integers(0, 50, size=(4, 6))
    labels[0, :3] = -100
    l64, d64 = fn(s, t, labels, temperature=1.5)
    l32, d32 = fn(s.astype(np.float32), t.astype(np.float32), labels, temperature=1.5)
    assert l32.dtype == d32.dtype == np.float32
    # float32 logs/exps of ~300 terms per position: a few ulps of the largest entries
    np.testing.assert_allclose(l32, l64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d32, d64, rtol=0, atol=1e-6 * max(1.0, np.abs(d64).max()))


@given(inputs=pair_inputs(), beta=st.sampled_from([0.0, 0.5, 1.0]), reduction=st.sampled_from(REDUCTIONS))
def test_num_items_in_batch_gradient_accumulation(inputs, beta, reduction):
    """TRL's num_items_in_batch: sum / num_items whatever the reduction; with the global valid count,
    the micro-batches' losses and gradients add up to the full batch's batchmean (reference §6.17)."""
    s, t, labels = inputs
    labels = np.zeros(s.shape[:-1], np.int64) if labels is None else labels
    n_valid = int((labels != -100).sum())
    assume(n_valid > 0)
    full, dfull = d.generalized_jsd_loss(s, t, labels, beta=beta, reduction="batchmean")
    total, dparts = 0.0, []
    for part in np.array_split(np.arange(s.shape[0]), 2):
        loss, ds = d.generalized_jsd_loss(s[part], t[part], labels[part], beta=beta, reduction=reduction,
                                          num_items_in_batch=n_valid)
        total += float(loss)
        dparts.append(ds)
    np.testing.assert_allclose(total, full, **EQ64)
    np.testing.assert_allclose(np.concatenate(dparts), dfull, **EQ64)
