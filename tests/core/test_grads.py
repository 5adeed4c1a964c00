"""Hypothesis gradient checks (float64 central differences, random upstream) for every primitive."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refimpl import core
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

GRAD_TOL = tol("gradcheck")["rtol"]


def _pair(fwd, bwd, wrap=lambda g: g if isinstance(g, tuple) else (g,), **kw):
    def f(*xs):
        y, c = fwd(*xs, **kw)
        return y, lambda dy: wrap(bwd(dy, c))
    return f


@given(rng=rst.seeds(), lead=rst.shapes(min_dims=1, max_dims=2, max_side=4),
       din=st.integers(1, 5), dout=st.integers(1, 5), bias=st.booleans())
def test_linear(rng, lead, din, dout, bias):
    x = rng.standard_normal((*lead, din))
    w = rng.standard_normal((dout, din))
    if bias:
        f = _pair(core.linear_forward, core.linear_backward)
        err = check_grad(f, [x, w, rng.standard_normal(dout)])
    else:
        f = _pair(core.linear_forward, core.linear_backward, wrap=lambda g: g[:2])
        err = check_grad(f, [x, w])
    assert err < GRAD_TOL


@given(rng=rst.seeds(), lead=rst.shapes(min_dims=1, max_dims=2, max_side=4), v=st.integers(1, 6),
       d=st.integers(1, 4))
def test_embedding(rng, lead, v, d):
    ids = rng.integers(0, v, size=lead)      # repeated ids exercise the scatter-add
    def f(w):
        y, c = core.embedding_forward(ids, w)
        return y, lambda dy: (core.embedding_backward(dy, c),)
    assert check_grad(f, [rng.standard_normal((v, d))]) < GRAD_TOL


@given(rng=rst.seeds(), lead=rst.shapes(min_dims=1, max_dims=2, max_side=4), d=st.integers(2, 8),
       scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_rmsnorm(rng, lead, d, scale):
    # d >= 2: with d = 1 and |x| >> sqrt(eps) the gradient in x is ~eps/|x|^3, below the
    # finite-difference noise floor, so a relative error would measure noise.
    f = _pair(core.rmsnorm_forward, core.rmsnorm_backward)
    err = check_grad(f, [scale * rng.standard_normal((*lead, d)), rng.standard_normal(d)], eps=1e-6 * scale)
    assert err < GRAD_TOL


@given(x=rst.float_arrays(rst.shapes(max_side=5), min_value=-8, max_value=8))
def test_silu(x):
    assert check_grad(_pair(core.silu_forward, core.silu_backward), [x]) < GRAD_TOL


@given(rng=rst.seeds(), shape=rst.shapes(max_side=5))
def test_swiglu(rng, shape):
    f = _pair(core.swiglu_forward, core.swiglu_backward)
    assert check_grad(f, [3 * rng.standard_normal(shape), rng.standard_normal(shape)]) < GRAD_TOL


@given(rng=rst.seeds(), t=st.integers(1, 4), d=st.integers(1, 5), i=st.integers(1, 6))
def test_swiglu_mlp(rng, t, d, i):
    params = {"gate_proj": rng.standard_normal((i, d)), "up_proj": rng.standard_normal((i, d)),
              "down_proj": rng.standard_normal((d, i))}
    def f(x, p):
        y, c = core.swiglu_mlp_forward(x, p)
        def vjp(dy):
            dx, dp = core.swiglu_mlp_backward(dy, c)
            return dx, dp
        return y, vjp
    assert check_grad(f, [rng.standard_normal((t, d)), params]) < GRAD_TOL


@given(rng=rst.seeds(), shape=rst.shapes(max_side=5), data=st.data())
def test_softmax_family(rng, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = 4 * rng.standard_normal(shape)
    for fwd, bwd in [(core.softmax_forward, core.softmax_backward),
                     (core.log_softmax_forward, core.log_softmax_backward),
                     (core.logsumexp_forward, core.logsumexp_backward)]:
        assert check_grad(_pair(fwd, bwd, axis=axis), [x]) < GRAD_TOL, fwd.__name__


@given(data=rst.logits_and_targets(scale=3.0), reduction=st.sampled_from(["mean", "sum", "none"]),
       backend=st.sampled_from(["numpy", "numba"]))
def test_cross_entropy(data, reduction, backend):
    logits, targets = data
    def f(z):
        loss, _ = core.cross_entropy(z, targets, reduction=reduction, backend=backend, grad=False)
        return loss, lambda dl: (core.cross_entropy(z, targets, dl, reduction=reduction, backend=backend)[1],)
    assert check_grad(f, [logits]) < GRAD_TOL


@given(rng=rst.seeds(), t=st.integers(1, 5), h=st.integers(1, 3), half=st.integers(1, 4),
       yarn=st.booleans())
def test_rope(rng, t, h, half, yarn):
    scaling = ({"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0}
               if yarn else None)
    inv_freq = core.rope_inv_freq(2 * half, 10000.0, scaling)
    amp = core.rope_attention_factor(scaling)
    pos = rng.integers(0, 50, size=(t, 1))
    f = _pair(core.rope_forward, core.rope_backward, positions=pos, inv_freq=inv_freq, attention_factor=amp)
    def g(x):
        return f(x)
    assert check_grad(g, [rng.standard_normal((2, t, h, 2 * half))]) < GRAD_TOL


def test_gradients_keep_float32(rng):
    """Backward passes return the input's dtype (float32 in, float32 out)."""
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal(4).astype(np.float32)
    y, c = core.rmsnorm_forward(x, w)
    dx, dw = core.rmsnorm_backward(np.ones_like(y), c)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    y, c = core.linear_forward(x, rng.standard_normal((2, 4)).astype(np.float32))
    assert all(g.dtype == np.float32 for g in core.linear_backward(np.ones_like(y), c)[:2])
    for backend in ("numpy", "numba"):
        loss, dx = core.cross_entropy(x, np.array([0, 1, 3]), backend=backend)
        assert loss.dtype == np.float32 and dx.dtype == np.float32
    p, c = core.log_softmax_forward(x)
    assert p.dtype == core.log_softmax_backward(p, c).dtype == np.float32
    r, c = core.rope_forward(x, np.arange(3)[:, None], core.rope_inv_freq(4))
    assert r.dtype == core.rope_backward(r, c).dtype == np.float32
