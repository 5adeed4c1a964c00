"""Differential tests of every primitive against torch autograd (float64). Skipped without torch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import core
from refimpl.testing import strategies as rst
from refimpl.testing import tol

torch = pytest.importorskip("torch")
TOL = tol("torch64")


def T(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b, **TOL)


@given(rng=rst.seeds(), n=st.integers(1, 5), din=st.integers(1, 6), dout=st.integers(1, 6))
def test_linear(rng, n, din, dout):
    x, w, b = rng.standard_normal((n, din)), rng.standard_normal((dout, din)), rng.standard_normal(dout)
    dy = rng.standard_normal((n, dout))
    y, c = core.linear_forward(x, w, b)
    dx, dw, db = core.linear_backward(dy, c)
    tx, tw, tb = T(x), T(w), T(b)
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(dy))
    close(y, ty), close(dx, tx.grad), close(dw, tw.grad), close(db, tb.grad)


@given(rng=rst.seeds(), n=st.integers(1, 6), v=st.integers(1, 5), d=st.integers(1, 4))
def test_embedding(rng, n, v, d):
    ids, w = rng.integers(0, v, size=n), rng.standard_normal((v, d))
    dy = rng.standard_normal((n, d))
    y, c = core.embedding_forward(ids, w)
    tw = T(w)
    ty = torch.nn.functional.embedding(torch.tensor(ids), tw)
    ty.backward(torch.tensor(dy))
    close(y, ty), close(core.embedding_backward(dy, c), tw.grad)


@given(rng=rst.seeds(), n=st.integers(1, 5), d=st.integers(1, 8))
def test_rmsnorm(rng, n, d):
    x, w, dy = rng.standard_normal((n, d)), rng.standard_normal(d), rng.standard_normal((n, d))
    y, c = core.rmsnorm_forward(x, w, 1e-6)
    dx, dw = core.rmsnorm_backward(dy, c)
    tx, tw = T(x), T(w)
    ty = torch.nn.functional.rms_norm(tx, (d,), tw, eps=1e-6)
    ty.backward(torch.tensor(dy))
    close(y, ty), close(dx, tx.grad), close(dw, tw.grad)


@given(rng=rst.seeds(), n=st.integers(1, 5), d=st.integers(1, 6))
def test_silu_swiglu(rng, n, d):
    g, u, dy = 4 * rng.standard_normal((n, d)), rng.standard_normal((n, d)), rng.standard_normal((n, d))
    y, c = core.silu_forward(g)
    tg = T(g)
    ty = torch.nn.functional.silu(tg)
    ty.backward(torch.tensor(dy))
    close(y, ty), close(core.silu_backward(dy, c), tg.grad)
    y, c = core.swiglu_forward(g, u)
    dg, du = core.swiglu_backward(dy, c)
    tg, tu = T(g), T(u)
    ty = torch.nn.functional.silu(tg) * tu
    ty.backward(torch.tensor(dy))
    close(y, ty), close(dg, tg.grad), close(du, tu.grad)


@given(rng=rst.seeds(), n=st.integers(1, 4), v=st.integers(1, 7), scale=st.sampled_from([1.0, 1e4]))
def test_softmax_family(rng, n, v, scale):
    x, dy = scale * rng.standard_normal((n, v)), rng.standard_normal((n, v))
    for fwd, bwd, tf in [(core.softmax_forward, core.softmax_backward, lambda t: torch.softmax(t, -1)),
                         (core.log_softmax_forward, core.log_softmax_backward, lambda t: torch.log_softmax(t, -1))]:
        y, c = fwd(x)
        tx = T(x)
        ty = tf(tx)
        ty.backward(torch.tensor(dy))
        close(y, ty), close(bwd(dy, c), tx.grad)
    y, c = core.logsumexp_forward(x)
    tx = T(x)
    ty = torch.logsumexp(tx, -1)
    ty.backward(torch.tensor(dy[:, 0]))
    close(y, ty), close(core.logsumexp_backward(dy[:, 0], c), tx.grad)


@given(data=rst.logits_and_targets(), reduction=st.sampled_from(["mean", "sum", "none"]),
       backend=st.sampled_from(["numpy", "numba"]))
def test_cross_entropy(data, reduction, backend):
    logits, targets = data
    if reduction == "mean" and (targets == -100).all():
        targets = targets.copy()
        targets[0] = 0            # torch returns NaN for an all-ignored mean; refimpl returns 0 (tested apart)
    dl = np.random.default_rng(0).standard_normal(targets.shape if reduction == "none" else ())
    loss, dlogits = core.cross_entropy(logits, targets, dl, reduction=reduction, backend=backend)
    tz = T(logits)
    tl = torch.nn.functional.cross_entropy(tz, torch.tensor(targets), reduction=reduction, ignore_index=-100)
    tl.backward(torch.tensor(dl))
    np.testing.assert_allclose(loss, tl.detach().numpy(), rtol=1e-12, atol=1e-9)
    close(dlogits, tz.grad)


@given(rng=rst.seeds(), t=st.integers(1, 6), h=st.integers(1, 3), half=st.integers(1, 4))
def test_rope_matches_complex_multiplication(rng, t, h, half):
    """refimpl's adjacent-pair RoPE == torch complex multiply (DeepSeek's apply_rotary_emb form)."""
    x, dy = rng.standard_normal((t, h, 2 * half)), rng.standard_normal((t, h, 2 * half))
    inv_freq = core.rope_inv_freq(2 * half)
    pos = np.arange(t)[:, None] + 3
    y, c = core.rope_forward(x, pos, inv_freq)
    tx = T(x)
    ang = torch.tensor(pos[..., None] * inv_freq)                               # (t, 1, half)
    freqs = torch.polar(torch.ones_like(ang), ang)
    ty = torch.view_as_real(torch.view_as_complex(tx.reshape(t, h, half, 2)) * freqs).reshape(t, h, 2 * half)
    ty.backward(torch.tensor(dy))
    close(y, ty), close(core.rope_backward(dy, c), tx.grad)
