"""The GRPO log-prob/entropy twin (refimpl.kernels.logprobs_nb) against the NumPy reference.

Rows longer than one block (BLOCK = 1024) exercise the running maximum's rescaling; ties at the
maximum, near-certain sampled tokens and extreme logits are drawn on purpose.

float32 twin results are compared with the reference run in float64 on the same (float32) logits:
at a temperature != 1 the float32 reference rounds z / tau before subtracting the maximum (an error
of ~ulp(|z| / tau), 1e-3 at |z| ~ 1e4, in every log-prob), while the twin forms (z - max) / tau
from the raw logits, so the float32 reference is not the more accurate side of that comparison.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")
from refimpl.core.cross_entropy import NONFINITE_LOGITS  # noqa: E402
from refimpl.kernels.cross_entropy_nb import BLOCK  # noqa: E402
from refimpl.rl import grpo_loss_from_logits, logps_entropy_backward, logps_entropy_forward  # noqa: E402
from refimpl.testing import check_grad, tol  # noqa: E402
from refimpl.testing import strategies as rst  # noqa: E402

from ..rl.helpers import make_batch  # noqa: E402

GRAD_TOL = tol("gradcheck")["rtol"]


@st.composite
def rows(draw, dtype):
    """(logits (*lead, V), ids (*lead,), tau): V up to 3 blocks, a max moving across blocks, ties, certain tokens."""
    rng = draw(rst.seeds())
    lead = draw(rst.shapes(min_dims=1, max_dims=2, max_side=4))
    v = draw(st.sampled_from([1, 2, 7, BLOCK - 1, BLOCK + 1, 2 * BLOCK + 37, 3 * BLOCK]))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    z = scale * rng.standard_normal((*lead, v))                           # (*lead, V)
    z += draw(st.sampled_from([0.0, 1.0, -1.0])) * np.linspace(0, 50, v)   # the max moves across blocks
    ids = rng.integers(0, v, size=lead)                                   # (*lead,)
    if draw(st.booleans()):                                               # exact ties at the row maximum
        z[..., rng.integers(0, v, size=min(v, 3))] = z.max() + 1.0
    if draw(st.booleans()):                                               # near-certain sampled tokens
        flat, o = z.reshape(-1, v), ids.reshape(-1)
        flat[np.arange(o.size), o] = flat.max(axis=-1) + 40.0 * max(scale, 1.0)
    tau = draw(st.sampled_from([1.0, 0.7, 1.6]))
    return z.astype(dtype), ids, tau


def close(a, b, dtype, **kw):
    np.testing.assert_allclose(a, b, **{**tol("equiv64" if dtype == np.float64 else "equiv32"), **kw})


@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_values_and_gradients_match_numpy(data, dtype):
    z, ids, tau = data.draw(rows(dtype))
    rng = data.draw(rst.seeds())
    lp, ent, cache = logps_entropy_forward(z, ids, temperature=tau, backend="numba")
    lp_r, ent_r, cache_r = logps_entropy_forward(z.astype(np.float64), ids, temperature=tau)  # reference
    assert lp.dtype == ent.dtype == dtype and cache.backend == "numba"
    close(lp, lp_r, dtype)
    close(ent, ent_r, dtype)
    g, h = rng.standard_normal(ids.shape), rng.standard_normal(ids.shape)
    for dl, dh in ((g, h), (g, None), (None, h)):
        dz = logps_entropy_backward(dl, dh, cache)
        dz_r = logps_entropy_backward(dl, dh, cache_r)
        assert dz.dtype == dtype and dz.shape == z.shape
        close(dz, dz_r, dtype)
    if dtype == np.float32 and tau == 1.0:            # no rounding of z / tau: the float32 reference too
        lp32, ent32, c32 = logps_entropy_forward(z, ids)
        close(lp, lp32, dtype)
        close(ent, ent32, dtype)
        close(logps_entropy_backward(g, h, cache), logps_entropy_backward(g, h, c32), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_near_certain_token_keeps_its_digits(dtype, tau):
    """log pi_o = -log1p(rest) ~ -rest ~ -1e-10: relative accuracy, not absolute (log(1 + 1e-10) is 0 in float32)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 2 * BLOCK + 5))                           # (3, V)
    o = np.array([5, BLOCK + 3, 2 * BLOCK + 1])                           # in the first, second and last block
    z[np.arange(3), o] = 30.0 * tau
    z = z.astype(dtype)
    lp, _, cache = logps_entropy_forward(z, o, temperature=tau, backend="numba")
    lp_r, _, cache_r = logps_entropy_forward(z.astype(np.float64), o, temperature=tau)
    assert np.all(lp < 0) and np.all(lp > -1e-8)
    np.testing.assert_allclose(lp, lp_r, rtol=tol("equiv32")["rtol"], atol=0)
    g = np.ones(3)
    dz, dz_r = logps_entropy_backward(g, None, cache), logps_entropy_backward(g, None, cache_r)
    # the sampled entry g (1 - pi_o) = -g expm1(log pi_o): relative accuracy too
    np.testing.assert_allclose(dz[np.arange(3), o], dz_r[np.arange(3), o], rtol=tol("equiv32")["rtol"], atol=0)


@given(rng=rst.seeds(), dtype=st.sampled_from([np.float32, np.float64]), scale=st.sampled_from([1e4, -1e4]))
def test_extreme_logits_stay_finite(rng, dtype, scale):
    z = (scale + 30.0 * rng.standard_normal((2, 3, 300))).astype(dtype)  # |z| ~ 1e4
    ids = rng.integers(0, 300, size=(2, 3))
    lp, ent, cache = logps_entropy_forward(z, ids, temperature=0.7, backend="numba")
    dz = logps_entropy_backward(rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), cache)
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(ent)) and np.all(np.isfinite(dz))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, BLOCK + 2, 2 * BLOCK + 6])
def test_nonfinite_logits_raise_the_same_error(dtype, bad, where):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 2 * BLOCK + 7)).astype(dtype)
    z[1, 2, where] = bad
    ids = np.zeros((2, 3), dtype=np.int64)
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match=NONFINITE_LOGITS):
            logps_entropy_forward(z, ids, backend=backend)
        with pytest.raises(ValueError, match=NONFINITE_LOGITS):
            grpo_loss_from_logits(z, ids, None, None, np.ones(2), np.ones((2, 3), bool), backend=backend)


def test_finite_logits_whose_sums_overflow_do_not_raise():
    """Finite rows beyond ~1e38 overflow (z - max) like the reference; only non-finite *inputs* raise."""
    z = np.array([[3e38, -3e38, 0.0]], dtype=np.float32)
    for backend in ("numpy", "numba"):
        with np.errstate(over="ignore", invalid="ignore"):
            lp, ent, _ = logps_entropy_forward(z, np.array([0]), backend=backend)
        assert lp[0] == 0.0


def test_explicit_numba_matches_the_reference_in_the_loss():
    rng = np.random.default_rng(2)
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=2, T=5, V=300)
    logits, old, ref, adv = (x.astype(np.float32) for x in (logits, old, ref, adv))
    la, da, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, entropy_coef=0.01, backend="numpy")
    ln, dn, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, entropy_coef=0.01, backend="numba")
    close(ln, la, np.float32)
    close(dn, da, np.float32, atol=1e-6 * np.abs(da).max())


def test_backward_follows_the_forward():
    z = np.random.default_rng(3).standard_normal((4, 9))
    ids = np.arange(4)
    _, _, cache = logps_entropy_forward(z, ids, backend="numba")
    np.testing.assert_array_equal(logps_entropy_backward(np.ones(4), None, cache, backend="numba"),
                                  logps_entropy_backward(np.ones(4), None, cache))
    with pytest.raises(ValueError, match="backend"):
        logps_entropy_backward(np.ones(4), None, cache, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        logps_entropy_forward(z, ids, backend="cuda")
    with pytest.raises(ValueError, match="chunk_rows"):
        logps_entropy_forward(z, ids, backend="numba", chunk_rows=0)


@given(rng=rst.seeds(), T=st.integers(1, 4), V=st.sampled_from([2, 6, BLOCK + 3]),
       temperature=st.sampled_from([1.0, 0.7]), loss_type=st.sampled_from(["grpo", "dapo", "dr_grpo"]))
def test_grpo_loss_from_logits_numba_matches_finite_differences(rng, T, V, temperature, loss_type):
    logits, ids, old, ref, adv, mask = make_batch(rng, G=2, T=T, V=V, loss_type=loss_type, temperature=temperature)
    kw = dict(loss_type=loss_type, beta=0.3, kl_estimator="k3", max_completion_length=T + 2,
              temperature=temperature, entropy_coef=0.05, backend="numba")

    def f(z):
        loss, dz, _ = grpo_loss_from_logits(z, ids, old, ref, adv, mask, **kw)
        return loss, lambda dy: (float(dy) * dz,)

    # check_grad draws a random upstream gradient (a scalar here) from its seed
    assert check_grad(f, [logits], max_entries=24, seed=int(rng.integers(2**31))) < GRAD_TOL
