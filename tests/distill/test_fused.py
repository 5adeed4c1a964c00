"""Chunked fused LM head + loss: equals the unchunked computation for any chunk size, gradients for
hidden states and head weights by finite differences, Numba == NumPy, and no (N, V) allocation."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl import core
from refimpl import distill as d
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import unchunked_jsd

GRAD_TOL = tol("gradcheck")["rtol"]
EQ64, EQ32 = tol("equiv64"), tol("equiv32")
BACKENDS = ["numpy", "numba"]


@st.composite
def head_inputs(draw, max_n=9, max_v=9, masked=True, scales=(0.5, 1.0, 2.0)):
    """hidden (lead..., D), weight (V, D), teacher hidden (lead..., Dt), teacher weight (V, Dt), labels."""
    rng = draw(rst.seeds())
    lead = draw(st.sampled_from([(draw(st.integers(1, max_n)),), (2, draw(st.integers(1, max_n // 2)))]))
    dim, v, dt = draw(st.integers(1, 5)), draw(st.integers(2, max_v)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from(scales))
    h = scale * rng.standard_normal((*lead, dim))
    w = rng.standard_normal((v, dim))
    th, tw = scale * rng.standard_normal((*lead, dt)), rng.standard_normal((v, dt))
    labels = None
    if not masked or draw(st.booleans()):
        labels = rng.integers(0, v, size=lead)
        if masked:
            labels[rng.random(lead) < 0.3] = -100
    return h, w, th, tw, labels


def assume_measurable(grads):
    """Skip inputs whose gradient is below the finite-difference noise floor: the losses are sums of
    O(1) terms that cancel, so central differences carry ~1e-10 absolute rounding noise, which is
    more than 1e-6 of a gradient smaller than ~1e-4 (e.g. all logits within 0.01 of each other)."""
    assume(max(np.abs(g).max() for g in grads) > 1e-3)


def _close(got, want, t=EQ64):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=t["rtol"], atol=t["atol"] * max(1.0, np.abs(w).max()))


@given(inputs=head_inputs(), chunk=st.integers(1, 12), beta=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), reduction=st.sampled_from(["batchmean", "sum", "mean"]),
       teacher_as_logits=st.booleans(), backend=st.sampled_from(BACKENDS),
       num_items=st.sampled_from([None, 1, 7.5]))
def test_jsd_chunked_equals_unchunked(inputs, chunk, beta, temperature, reduction, teacher_as_logits, backend,
                                      num_items):
    h, w, th, tw, labels = inputs
    kw = dict(beta=beta, temperature=temperature, reduction=reduction, num_items_in_batch=num_items)
    teacher = dict(teacher_logits=th @ tw.T) if teacher_as_logits else dict(teacher_hidden=th, teacher_weight=tw)
    got = d.fused_linear_jsd(h, w, labels, chunk_size=chunk, backend=backend, **teacher, **kw)
    _close(got, unchunked_jsd(h, w, th @ tw.T, labels, **kw))


@given(inputs=head_inputs(), chunk=st.integers(1, 5), beta=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
       reduction=st.sampled_from(["batchmean", "sum", "mean"]), backend=st.sampled_from(BACKENDS))
def test_jsd_gradcheck(inputs, chunk, beta, reduction, backend):
    """dhidden and dweight of the chunked loss by central differences."""
    h, w, th, tw, labels = inputs
    def f(h, w):
        kw = dict(teacher_hidden=th, teacher_weight=tw, beta=beta, temperature=1.3, reduction=reduction,
                  chunk_size=chunk, backend=backend)
        loss = d.fused_linear_jsd(h, w, labels, **kw)[0]
        return loss, lambda dy: d.fused_linear_jsd(h, w, labels, dloss=float(dy), **kw)[1:]
    assume_measurable(f(h, w)[1](1.0))
    assert check_grad(f, [h, w]) < GRAD_TOL


@given(inputs=head_inputs(masked=False), chunk=st.integers(1, 12), temperature=st.sampled_from([0.5, 1.0]),
       reduction=st.sampled_from(["mean", "sum"]), backend=st.sampled_from(BACKENDS), data=st.data())
def test_cross_entropy_chunked(inputs, chunk, temperature, reduction, backend, data):
    h, w, _, _, labels = inputs
    labels[np.random.default_rng(0).random(labels.shape) < data.draw(st.sampled_from([0.0, 0.4, 1.0]))] = -100
    got = d.fused_linear_cross_entropy(h, w, labels, temperature=temperature, reduction=reduction,
                                       chunk_size=chunk, backend=backend)
    z = (h @ w.T) / temperature
    loss, dz = core.cross_entropy(z, labels, reduction=reduction)
    dz = (dz / temperature).reshape(-1, w.shape[0])
    _close(got, (loss, (dz @ w).reshape(h.shape), dz.T @ h.reshape(-1, h.shape[-1])))
    def f(h, w):
        kw = dict(temperature=temperature, reduction=reduction, chunk_size=chunk, backend=backend)
        loss = d.fused_linear_cross_entropy(h, w, labels, **kw)[0]
        return loss, lambda dy: d.fused_linear_cross_entropy(h, w, labels, dloss=float(dy), **kw)[1:]
    if (labels != -100).any():
        assume_measurable(f(h, w)[1](1.0))
    assert check_grad(f, [h, w]) < GRAD_TOL


def clipped_surrogate(old, adv, mask, eps=0.2, beta=0.04, ref=None):
    """Token-level clipped surrogate + k3 KL, normalised by the full mask ('dapo'/'bnpo' style),
    written here independently of refimpl.rl (reference §1.3-§1.6)."""
    def loss_fn(logp):
        n = max(mask.sum(), 1)
        ratio = np.exp(logp - old)
        clipped = np.clip(ratio, 1 - eps, 1 + eps)
        pg = -np.minimum(ratio * adv, clipped * adv)
        active = ~(((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps)))
        x = ref - logp
        loss = np.sum(mask * (pg + beta * (np.exp(x) - x - 1))) / n
        dlogp = mask * (-adv * ratio * active + beta * (1 - np.exp(x))) / n
        return loss, dlogp, {"clip_fraction": float(np.sum(mask * ~active) / n)}
    return loss_fn


@given(inputs=head_inputs(masked=False), chunk=st.integers(1, 12), temperature=st.sampled_from([0.7, 1.0]),
       backend=st.sampled_from(BACKENDS), data=st.data())
def test_logprob_loss_chunked(inputs, chunk, temperature, backend, data):
    """GRPO-style two-pass path == unchunked: logps, callback, dZ = g (onehot - pi) / tau."""
    h, w, _, _, tokens = inputs
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    z = (h @ w.T) / temperature
    logq = core.log_softmax_forward(z)[0]
    logp = np.take_along_axis(logq, tokens[..., None], axis=-1)[..., 0]
    old = logp + 0.4 * rng.standard_normal(tokens.shape)
    fn = clipped_surrogate(old, rng.standard_normal(tokens.shape), rng.random(tokens.shape) < 0.8,
                           ref=logp + 0.3 * rng.standard_normal(tokens.shape))
    want_loss, g, want_info = fn(logp)
    onehot = np.zeros_like(logq)
    np.put_along_axis(onehot, tokens[..., None], 1.0, axis=-1)
    dz = (g[..., None] * (onehot - np.exp(logq)) / temperature).reshape(-1, w.shape[0])
    loss, dh, dw, info = d.fused_linear_logprob_loss(h, w, tokens, fn, temperature=temperature, chunk_size=chunk,
                                                     backend=backend)
    _close((loss, dh, dw), (want_loss, (dz @ w).reshape(h.shape), dz.T @ h.reshape(-1, h.shape[-1])))
    assert info == want_info
    logps = d.fused_linear_token_logps(h, w, tokens, temperature=temperature, chunk_size=chunk, backend=backend)
    np.testing.assert_allclose(logps, logp, **EQ64)


@given(inputs=head_inputs(masked=False), chunk=st.integers(1, 5), backend=st.sampled_from(BACKENDS))
def test_logprob_loss_gradcheck(inputs, chunk, backend):
    """A smooth per-token loss (weights + k3 to a reference), -100 tokens ignored."""
    h, w, _, _, tokens = inputs
    rng = np.random.default_rng(1)
    tokens[rng.random(tokens.shape) < 0.3] = -100
    wt, ref = rng.standard_normal(tokens.shape), rng.standard_normal(tokens.shape) - 2.0
    def loss_fn(logp):
        x = ref - logp
        return np.sum(wt * logp + np.exp(x) - x), wt + 1 - np.exp(x)
    def f(h, w):
        out = d.fused_linear_logprob_loss(h, w, tokens, loss_fn, temperature=0.8, chunk_size=chunk, backend=backend)
        return out[0], lambda dy: tuple(float(dy) * g for g in out[1:3])
    assert check_grad(f, [h, w]) < GRAD_TOL


def test_grpo_wrapper_matches_generic():
    """fused_linear_grpo_loss == fused_linear_logprob_loss with refimpl.rl.grpo.grpo_loss bound."""
    grpo = pytest.importorskip("refimpl.rl.grpo")
    rng = np.random.default_rng(0)
    b, t, dim, v = 4, 5, 3, 11
    h, w = rng.standard_normal((b, t, dim)), rng.standard_normal((v, dim))
    ids = rng.integers(0, v, size=(b, t))
    old, ref = -2 + 0.1 * rng.standard_normal((b, t)), -2 + 0.1 * rng.standard_normal((b, t))
    adv, mask = np.repeat(rng.standard_normal(b)[:, None], t, axis=1), (rng.random((b, t)) < 0.8).astype(float)
    got = d.fused_linear_grpo_loss(h, w, ids, old, ref, adv, mask, chunk_size=3)
    want = d.fused_linear_logprob_loss(h, w, ids, lambda lp: grpo.grpo_loss(lp, old, ref, adv, mask), chunk_size=7)
    _close(got[:3], want[:3])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_numba_equals_numpy_extremes(dtype, scale):
    """Numba twin == NumPy reference, incl. |logits| ~ 1e4 (the twin's log-space fallback branch)."""
    rng = np.random.default_rng(7)
    n, dim, v = 37, 6, 300
    h = (scale * rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(dtype)
    w, th, tw = (rng.standard_normal(shape).astype(dtype) for shape in [(v, dim), (n, 4), (v, 4)])
    th *= dtype(scale)
    labels = rng.integers(0, v, size=n)
    labels[::5] = -100
    # float32: the NumPy reference computes in float32, the twin in float64. Logits of 1e4 put an
    # error of ~1e4 * eps on every log-prob (both backends), which dW multiplies by |h| ~ 1e4.
    t = EQ64 if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    # float32 logits of 1e4 have an ulp of ~1e-3, and the reverse-KL gradient is a difference of two
    # log-ratios of size ~1e5 (ulp ~1e-2): float32 NumPy is then ~0.5% off float64, the twin ~0.03%.
    if scale > 1:
        t = dict(rtol=1e-8, atol=1e-10) if dtype == np.float64 else dict(rtol=0.0, atol=1e-2)
    for beta in (0.0, 0.5, 1.0):
        kw = dict(teacher_hidden=th, teacher_weight=tw, beta=beta, temperature=0.7, chunk_size=8)
        ref = d.fused_linear_jsd(h, w, labels, backend="numpy", **kw)
        got = d.fused_linear_jsd(h, w, labels, backend="numba", **kw)
        assert all(np.isfinite(x).all() and x.dtype == dtype for x in got)
        _close(got, ref, t)
    ce = [d.fused_linear_cross_entropy(h, w, labels, chunk_size=8, backend=b) for b in BACKENDS]
    _close(ce[1], ce[0], t)
    lp = [d.fused_linear_token_logps(h, w, labels, chunk_size=8, backend=b) for b in BACKENDS]
    _close([lp[1]], [lp[0]], t)


def test_never_allocates_full_logits():
    """tracemalloc peak of the chunked path stays far below one (N, V) float64 array; the unchunked
    loss, for contrast, needs several. Allocation sizes do not depend on machine load."""
    rng = np.random.default_rng(0)
    n, dim, v, chunk = 1024, 8, 4096, 8
    full = n * v * 8                                                    # 32 MiB
    h, w = rng.standard_normal((n, dim)), rng.standard_normal((v, dim))
    th, tw = rng.standard_normal((n, dim)), rng.standard_normal((v, dim))
    labels = rng.integers(0, v, size=n)

    def peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    chunked = peak(lambda: d.fused_linear_jsd(h, w, labels, teacher_hidden=th, teacher_weight=tw, chunk_size=chunk,
                                              backend="numpy"))
    ce = peak(lambda: d.fused_linear_cross_entropy(h, w, labels, chunk_size=chunk, backend="numpy"))
    logp = peak(lambda: d.fused_linear_logprob_loss(h, w, labels, lambda lp: (lp.sum(), np.ones_like(lp)),
                                                    chunk_size=chunk, backend="numpy"))
    unchunked = peak(lambda: unchunked_jsd(h, w, th @ tw.T, labels))
    assert max(chunked, ce, logp) < 0.25 * full, (chunked, ce, logp)
    assert unchunked > 3 * full
