"""The cross-entropy row kernels (refimpl.kernels.cross_entropy_nb) against the NumPy reference.

Rows longer than one block (BLOCK = 1024) exercise the online log-sum-exp's rescaling; ties and
ignore_index rows are drawn on purpose.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")
from refimpl import core  # noqa: E402
from refimpl.kernels.cross_entropy_nb import BLOCK  # noqa: E402
from refimpl.testing import check_grad, tol  # noqa: E402
from refimpl.testing import strategies as rst  # noqa: E402


@st.composite
def long_rows(draw, dtype):
    """Logits (N, V) with V up to 3 blocks, a rising or falling max across blocks, ties, ignored rows."""
    rng = draw(rst.seeds())
    n = draw(st.integers(1, 5))
    v = draw(st.sampled_from([2, 7, BLOCK - 1, BLOCK + 1, 2 * BLOCK + 37, 3 * BLOCK]))
    scale = draw(st.sampled_from([1.0, 30.0, 1e3]))
    z = scale * rng.standard_normal((n, v))                               # (N, V)
    z += draw(st.sampled_from([0.0, 1.0, -1.0])) * np.linspace(0, 50, v)   # max moves across blocks
    if draw(st.booleans()):                                              # exact ties at the max
        z[:, rng.integers(0, v, size=min(v, 3))] = z.max() + 1.0
    t = rng.integers(0, v, size=n)
    t[rng.random(n) < 0.3] = -100
    return z.astype(dtype), t


def close(a, b, dtype, scale=1.0):
    t = tol("equiv64" if dtype == np.float64 else "equiv32")
    np.testing.assert_allclose(a, b, rtol=t["rtol"], atol=t["atol"] * max(scale, 1.0))


@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_forward_backward_and_fused_match_numpy(data, dtype, reduction):
    z, t = data.draw(long_rows(dtype))
    dl = (np.linspace(0.5, 1.5, t.size).astype(dtype) if reduction == "none" else dtype(0.7))
    ln, gn = core.cross_entropy(z, t, dl, reduction=reduction, backend="numpy")
    lb, _ = core.cross_entropy(z, t, reduction=reduction, backend="numba", grad=False)   # forward-only kernel
    close(lb, ln, dtype, np.abs(z).max())
    lf, gf = core.cross_entropy(z, t, dl, reduction=reduction, backend="numba")       # one-sweep kernel
    close(lf, ln, dtype, np.abs(z).max())
    close(gf, gn, dtype)
    assert gf.dtype == dtype and np.all(gf[t == -100] == 0)
    ln2, _ = core.cross_entropy(z, t, reduction=reduction, backend="numpy", grad=False)
    assert np.array_equal(ln2, ln)


@given(data=rst.logits_and_targets(max_rows=4, max_vocab=12))
def test_fused_numba_gradient_by_finite_differences(data):
    z, t = data
    z = z / np.abs(z).max() * 3                                           # FD needs moderate logits

    def f(z):
        loss, _ = core.cross_entropy(z, t, reduction="none", backend="numba", grad=False)
        return loss, lambda dy: (core.cross_entropy(z, t, dy, reduction="none", backend="numba")[1],)
    assert check_grad(f, [z]) < tol("gradcheck")["rtol"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_rows_and_all_ignored(dtype):
    big = np.finfo(dtype).max / 4
    z = np.zeros((3, 2 * BLOCK + 5), dtype)                               # (3, V)
    z[0, :BLOCK] = -big                                                   # exp underflows in block 0,
    z[0, BLOCK + 3] = big                                                 # then the max jumps by ~big
    t = np.array([BLOCK + 3, -100, 2])
    ln, _ = core.cross_entropy(z, t, reduction="none", backend="numpy", grad=False)
    lb, dz = core.cross_entropy(z, t, np.ones(3, dtype), reduction="none", backend="numba")
    assert lb[0] == 0 and lb[1] == 0 and lb[2] == pytest.approx(np.log(z.shape[1]), rel=1e-6)
    close(lb, ln, dtype)
    assert np.isfinite(dz).all() and not dz[:2].any()
    loss, dz = core.cross_entropy(z, np.full(3, -100), 1.0, backend="numba")
    assert loss == 0 and not dz.any()


@given(rng=rst.seeds(), dtype=st.sampled_from([np.float32, np.float64]),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]), v=st.sampled_from([5, BLOCK + 3, 3 * BLOCK]),
       ignored=st.booleans(), grad=st.booleans())
def test_nonfinite_logits_raise_the_same_error_through_both_backends(rng, dtype, bad, v, ignored, grad):
    """The numba path tests finiteness inside its row pass; NaN, inf or -inf anywhere in any row
    (an ignored row too, in any block) raises the NumPy path's ValueError naming ``logits``."""
    n = 4
    z = rng.standard_normal((n, v)).astype(dtype)                         # (N, V)
    t = rng.integers(0, v, size=n)
    row, col = rng.integers(0, n), rng.integers(0, v)
    z[row, col] = bad
    if ignored:
        t[row] = -100
    messages = []
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match=r"^logits: contains NaN or inf") as e:
            core.cross_entropy(z, t, backend=backend, grad=grad)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    z[row, col] = 0.0                                                    # the same rows, finite: no error
    close(core.cross_entropy(z, t, backend="numba", grad=grad)[0], core.cross_entropy(z, t, backend="numpy")[0],
          dtype)
