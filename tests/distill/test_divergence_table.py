"""The divergence table (refimpl.distill.divergences): every entry's gradient by finite differences and
against torch autograd, the fused LM head against the unfused loss for every entry, and a new entry
picked up by divergence_loss, fused_linear_divergence, gkd_loss and GKDConfig."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import distill as d
from refimpl.distill import DIVERGENCES, Divergence, register_divergence
from refimpl.distill.divergences import forward_kl_terms
from refimpl.distill.pipelines import GKDConfig, encode_pairs, gkd_loss
from refimpl.model import model_forward, shift_labels
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .test_fused import head_inputs
from .test_pipelines import models  # noqa: F401 - a fixture

GRAD_TOL = tol("gradcheck")["rtol"]
EQ64 = tol("equiv64")
#: non-default options per entry, so that options are exercised too
OPTS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.3}}


def _logits(rng, shape=(2, 3, 6)):
    s, t = rng.standard_normal(shape), rng.standard_normal(shape)
    labels = rng.integers(0, shape[-1], shape[:-1])
    labels[0, 0] = -100
    return s, t, labels


@pytest.mark.parametrize("name", list(DIVERGENCES))
@given(rng=rst.seeds(), temperature=st.sampled_from([0.7, 1.0]),
       reduction=st.sampled_from(["batchmean", "sum", "mean"]))
def test_every_entry_has_a_correct_gradient(name, rng, temperature, reduction):
    s, t, labels = _logits(rng)
    kw = dict(divergence=name, temperature=temperature, reduction=reduction, **OPTS.get(name, {}))

    def f(x):
        loss, _ = d.divergence_loss(x, t, labels, **kw)
        return loss, lambda dl: (d.divergence_loss(x, t, labels, dloss=float(dl), **kw)[1],)
    assert check_grad(f, [s]) < GRAD_TOL


def _torch_divergence(name, lq, lp, opts):
    """The per-position divergence written with torch ops (autograd gives the oracle gradient)."""
    import torch
    q, p = lq.exp(), lp.exp()
    if name == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if name == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    if name == "generalized_jsd":
        b = opts["beta"]
        lm = torch.logsumexp(torch.stack([lq + np.log1p(-b), lp + np.log(b)]), 0)
        return (b * p * (lp - lm) + (1 - b) * q * (lq - lm)).sum(-1)
    if name == "skew_kl":
        a = opts["alpha"]
        return (p * (lp - torch.log(a * p + (1 - a) * q))).sum(-1)
    if name == "skew_reverse_kl":
        a = opts["alpha"]
        return (q * (lq - torch.log((1 - a) * p + a * q))).sum(-1)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(name)


@pytest.mark.parametrize("name", [n for n in DIVERGENCES if n in OPTS or n in
                                  ("forward_kl", "reverse_kl", "total_variation")])
@given(rng=rst.seeds(), temperature=st.sampled_from([0.5, 1.0]))
def test_every_entry_matches_torch(name, rng, temperature):
    torch = pytest.importorskip("torch")
    s, t, labels = _logits(rng)
    opts = OPTS.get(name, {})
    ts = torch.tensor(s, requires_grad=True)
    lq = torch.log_softmax(ts / temperature, -1)
    lp = torch.log_softmax(torch.tensor(t) / temperature, -1)
    valid = torch.tensor(labels != -100)
    want = (_torch_divergence(name, lq, lp, opts) * valid).sum() / valid.sum()   # batchmean over valid positions
    want.backward()
    got, ds = d.divergence_loss(s, t, labels, divergence=name, temperature=temperature, **opts)
    np.testing.assert_allclose(got, want.item(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ds, ts.grad.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@given(inputs=head_inputs(), chunk=st.integers(1, 7), reduction=st.sampled_from(["batchmean", "sum", "mean"]),
       backend=st.sampled_from(["numpy", "numba"]))
def test_fused_head_equals_unfused_for_every_entry(name, inputs, chunk, reduction, backend):
    h, w, th, tw, labels = inputs
    opts = OPTS.get(name, {})
    z, zt = h @ w.T, th @ tw.T                                          # (..., V) each
    want, dz = d.divergence_loss(z, zt, labels, divergence=name, reduction=reduction, **opts)
    got, dh, dw = d.fused_linear_divergence(h, w, labels, divergence=name, teacher_hidden=th, teacher_weight=tw,
                                            reduction=reduction, chunk_size=chunk, backend=backend, **opts)
    dz2 = dz.reshape(-1, w.shape[0])
    np.testing.assert_allclose(got, want, **EQ64)
    np.testing.assert_allclose(dh, (dz2 @ w).reshape(h.shape), **EQ64)
    np.testing.assert_allclose(dw, dz2.T @ h.reshape(-1, h.shape[-1]), **EQ64)


def test_named_losses_are_their_entries():
    rng = np.random.default_rng(0)
    s, t, labels = _logits(rng)
    for fn, name, kw in ((d.forward_kl_loss, "forward_kl", {}), (d.skew_kl_loss, "skew_kl", {"alpha": 0.2}),
                         (d.generalized_jsd_loss, "generalized_jsd", {"beta": 0.3})):
        a, b = fn(s, t, labels, **kw), d.divergence_loss(s, t, labels, divergence=name, **kw)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="divergence_options"):
        d.divergence_loss(s, t, labels, divergence="forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="divergence"):
        d.divergence_loss(s, t, labels, divergence="nope")


def _double_kl_terms(lq, q, lp, p, weight):
    E, U = forward_kl_terms(lq, q, lp, p)
    return weight * E, weight * U


@pytest.fixture
def dummy_divergence():
    entry = register_divergence(Divergence("weighted_kl", _double_kl_terms, {"weight": 0.5}))
    yield entry
    DIVERGENCES.pop(entry.name)


def test_a_registered_entry_is_picked_up_everywhere(dummy_divergence, models):  # noqa: F811
    """One register_divergence call: the loss, the fused head, GKDConfig and gkd_loss take the new name and
    its option, with the values the entry defines."""
    rng = np.random.default_rng(1)
    s, t, labels = _logits(rng)
    fkl, dfkl = d.forward_kl_loss(s, t, labels)
    got, dgot = d.divergence_loss(s, t, labels, divergence="weighted_kl", weight=0.25)
    np.testing.assert_allclose(got, 0.25 * fkl, rtol=1e-14)
    np.testing.assert_allclose(dgot, 0.25 * dfkl, rtol=1e-12, atol=1e-300)
    h, w = rng.standard_normal((5, 3)), rng.standard_normal((6, 3))
    zt = rng.standard_normal((5, 6))
    fused = d.fused_linear_divergence(h, w, divergence="weighted_kl", teacher_logits=zt, chunk_size=2)[0]
    np.testing.assert_allclose(fused, 0.5 * d.forward_kl_loss(h @ w.T, zt)[0], rtol=1e-13)
    assert GKDConfig(divergence="weighted_kl", divergence_options={"weight": 0.25}).divergence == "weighted_kl"
    with pytest.raises(ValueError, match="divergence_options"):
        GKDConfig(divergence="weighted_kl", divergence_options={"beta": 0.25})
    sp, sc, tp, tc = models
    ids, lab = encode_pairs([("1+2=", "3</answer>"), ("4+5=", "9")])
    loss, grads, _ = gkd_loss(sp, sc, tp, tc, ids, lab, divergence="weighted_kl", divergence_options={"weight": 0.25})
    sl, tl = model_forward(ids, sp, sc)[0], model_forward(ids, tp, tc)[0]
    np.testing.assert_allclose(loss, 0.25 * d.forward_kl_loss(sl, tl, shift_labels(lab))[0], rtol=1e-12)
    jsd = gkd_loss(sp, sc, tp, tc, ids, lab, beta=0.3)[0]          # default entry: GKD's beta still applies
    np.testing.assert_allclose(jsd, d.generalized_jsd_loss(sl, tl, shift_labels(lab), beta=0.3)[0], rtol=1e-12)
