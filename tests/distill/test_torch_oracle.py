"""Differential tests against torch autograd, float64: every loss written the way TRL GKD writes its
generalized JSD (element-wise ``F.kl_div(..., log_target=True)``, log-space mixture by
``torch.logsumexp``, then TRL's masking and reductions). Skipped without torch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import distill as d
from refimpl.testing import tol

from .helpers import pair_inputs

torch = pytest.importorskip("torch")
F = torch.nn.functional
TOL = tol("torch64")
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def kl(log_target_dist, log_input_dist):
    """Element-wise KL(target || input) terms, torch's argument order (input first)."""
    return F.kl_div(log_input_dist, log_target_dist, reduction="none", log_target=True)


def mix(la, wa, lb, wb):
    """log(wa * a + wb * b) from log a, log b by logsumexp over a stacked axis (weights may be 0)."""
    wa, wb = torch.tensor(wa, dtype=torch.float64), torch.tensor(wb, dtype=torch.float64)
    return torch.logsumexp(torch.stack([la + torch.log(wa), lb + torch.log(wb)]), dim=0)


def torch_elementwise(name, s, t, labels, tau, kw):
    lq, lp = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
    if name == "forward_kl":
        return kl(lp, lq)
    if name == "reverse_kl":
        return kl(lq, lp)
    if name == "gjsd":
        b = kw["beta"]
        if b == 0:
            return kl(lp, lq)
        if b == 1:
            return kl(lq, lp)
        lm = mix(lq, 1 - b, lp, b)
        return b * kl(lp, lm) + (1 - b) * kl(lq, lm)
    if name == "skew_kl":
        return kl(lp, mix(lp, kw["alpha"], lq, 1 - kw["alpha"]))
    if name == "skew_reverse_kl":
        return kl(lq, mix(lp, 1 - kw["alpha"], lq, kw["alpha"]))
    if name == "total_variation":
        return 0.5 * (lq.exp() - lp.exp()).abs()
    if name == "hinton":
        a, c = kw["alpha"], (tau**2 if kw["scale_by_t2"] else 1.0)
        if labels is None:                                # alpha == 1: no hard term
            return a * c * kl(lp, lq)
        onehot = F.one_hot(torch.clamp(labels, min=0), s.shape[-1]).to(s.dtype)
        return -(1 - a) * onehot * F.log_softmax(s, -1) + a * c * kl(lp, lq)
    raise KeyError(name)


def trl_reduce(E, labels, reduction):
    """TRL GKDTrainer.generalized_jsd_loss's masking and reductions."""
    if labels is not None:
        mask = labels != -100
        E = E[mask]
    if reduction == "batchmean":
        return E.sum() / mask.sum() if labels is not None else E.sum() / E.size(0)
    if reduction == "sum":
        return E.sum()
    if reduction == "mean":
        return E.mean()
    return E


OPTIONS = {
    "forward_kl": st.just({}), "reverse_kl": st.just({}), "total_variation": st.just({}),
    "gjsd": st.fixed_dictionaries({"beta": st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0])}),
    "skew_kl": st.fixed_dictionaries({"alpha": st.sampled_from([0.0, 0.1, 0.6])}),
    "skew_reverse_kl": st.fixed_dictionaries({"alpha": st.sampled_from([0.0, 0.1, 0.6])}),
    "hinton": st.fixed_dictionaries({"alpha": st.sampled_from([0.0, 0.5, 1.0]), "scale_by_t2": st.booleans()}),
}
FUNCS = {"forward_kl": d.forward_kl_loss, "reverse_kl": d.reverse_kl_loss, "gjsd": d.generalized_jsd_loss,
         "skew_kl": d.skew_kl_loss, "skew_reverse_kl": d.skew_reverse_kl_loss,
         "total_variation": d.total_variation_loss, "hinton": d.hinton_kd_loss}


def compare(ours_fn, torch_E, s, labels, reduction, rng):
    """Loss and d/ds of ours vs torch for one reduction; 'none' compares the valid rows only."""
    ts = torch.tensor(s, requires_grad=True)
    tl = None if labels is None else torch.tensor(labels)
    if labels is not None and not (labels != -100).any():
        return                                       # TRL gives NaN here; refimpl's 0 is tested elsewhere
    out = trl_reduce(torch_E(ts, tl), tl, reduction)
    if reduction == "none":
        up = rng.standard_normal(tuple(out.shape))
        out.backward(torch.tensor(up))
        if labels is None:                           # TRL keeps the shape; with labels, the valid rows
            full = up
        else:
            full = np.zeros(s.shape[:-1] + (out.shape[-1],))
            full[labels != -100] = up
        loss, ds = ours_fn(dloss=full)
        np.testing.assert_allclose(loss if labels is None else loss[labels != -100], out.detach().numpy(), **TOL)
    else:
        out.backward()
        loss, ds = ours_fn()
        np.testing.assert_allclose(loss, out.item(), **TOL)
    np.testing.assert_allclose(ds, ts.grad.numpy(), **TOL)


@pytest.mark.parametrize("name", sorted(FUNCS))
@given(data=st.data(), inputs=pair_inputs(masked=True), reduction=st.sampled_from(REDUCTIONS),
       tau=st.sampled_from([0.5, 1.0, 2.0]))
def test_against_torch(name, data, inputs, reduction, tau):
    s, t, labels = inputs
    kw = data.draw(OPTIONS[name])
    if name == "hinton" and labels is None:
        kw["alpha"] = 1.0
    tt = torch.tensor(t)
    def ours(dloss=None):
        return FUNCS[name](s, t, labels, temperature=tau, reduction=reduction, dloss=dloss, **kw)
    compare(ours, lambda ts, tl: torch_elementwise(name, ts, tt, tl, tau, kw), s, labels, reduction,
            np.random.default_rng(0))


@given(inputs=pair_inputs(masked=True), reduction=st.sampled_from(REDUCTIONS), tau=st.sampled_from([0.5, 1.0]))
def test_sequence_kd_against_torch(inputs, reduction, tau):
    s, _, labels = inputs
    labels = np.zeros(s.shape[:-1], np.int64) if labels is None else labels
    def E(ts, tl):
        onehot = F.one_hot(torch.clamp(tl, min=0), s.shape[-1]).to(ts.dtype)
        return -onehot * F.log_softmax(ts / tau, -1)
    def ours(dloss=None):
        return d.sequence_kd_loss(s, labels, temperature=tau, reduction=reduction, dloss=dloss)
    compare(ours, E, s, labels, reduction, np.random.default_rng(1))


@given(data=st.data(), inputs=pair_inputs(masked=True), add_tail=st.booleans(),
       reduction=st.sampled_from(REDUCTIONS), tau=st.sampled_from([0.5, 1.0, 2.0]))
def test_topk_against_torch(data, inputs, add_tail, reduction, tau):
    """Top-k FKL as TRL's server distillation computes it: gather the student's log-probs at the
    teacher's ids; renormalise both, or append log(1 - sum) tail entries."""
    s, t, labels = inputs
    v = s.shape[-1]
    k = data.draw(st.integers(1, v - 1 if add_tail else v))
    lt, ids = d.teacher_topk(t, k, temperature=tau)
    tlt, tids = torch.tensor(lt), torch.tensor(ids)
    def E(ts, tl):
        lq = F.log_softmax(ts / tau, -1).gather(-1, tids)
        if not add_tail:
            return kl(F.log_softmax(tlt, -1), F.log_softmax(lq, -1))
        tail = lambda x: torch.log(-torch.expm1(torch.logsumexp(x, -1, keepdim=True)))  # log(1 - sum e^x)
        return kl(torch.cat([tlt, tail(tlt)], -1), torch.cat([lq, tail(lq)], -1))
    def ours(dloss=None):
        return d.topk_kl_loss(s, lt, ids, labels, add_tail=add_tail, temperature=tau, reduction=reduction,
                              dloss=dloss)
    compare(ours, E, s, labels, reduction, np.random.default_rng(2))


@given(data=st.data(), chunk=st.integers(1, 7), beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_fused_jsd_against_torch(data, chunk, beta):
    """Chunked fused linear + JSD vs torch autograd through F.linear and the TRL-style loss."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    n, dim, v = data.draw(st.integers(1, 9)), 4, data.draw(st.integers(2, 9))
    h, w, th, tw = (rng.standard_normal(sh) for sh in [(n, dim), (v, dim), (n, 3), (v, 3)])
    labels = rng.integers(0, v, size=n)
    labels[rng.random(n) < 0.3] = -100
    labels[0] = 1
    loss, dh, dw = d.fused_linear_jsd(h, w, labels, teacher_hidden=th, teacher_weight=tw, beta=beta,
                                      temperature=1.5, chunk_size=chunk)
    tht, twt = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    E = torch_elementwise("gjsd", F.linear(tht, twt), torch.tensor(th @ tw.T), None, 1.5, {"beta": beta})
    out = trl_reduce(E, torch.tensor(labels), "batchmean")
    out.backward()
    np.testing.assert_allclose(loss, out.item(), **TOL)
    np.testing.assert_allclose(dh, tht.grad.numpy(), **TOL)
    np.testing.assert_allclose(dw, twt.grad.numpy(), **TOL)
