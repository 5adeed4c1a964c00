"""The float32 generalized-JSD rows (refimpl.kernels.distill_nb.gjsd_rows32) against the NumPy reference.

The logits are fed through an identity LM head (``h @ I.T`` is exact), so the public
``fused_linear_jsd`` runs the row kernels on exactly the drawn logits: rows over several blocks with
a moving maximum, ties, masked rows, temperatures and every beta branch (forward KL, reverse KL, JSD).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")
from refimpl import distill  # noqa: E402
from refimpl.kernels.cross_entropy_nb import BLOCK  # noqa: E402
from refimpl.testing import strategies as rst  # noqa: E402


@st.composite
def logit_pairs(draw):
    rng = draw(rst.seeds())
    n = draw(st.integers(1, 4))
    v = draw(st.sampled_from([3, 100, BLOCK + 1, 2 * BLOCK + 37]))
    scale = draw(st.sampled_from([1.0, 5.0, 30.0]))
    zs = scale * rng.standard_normal((n, v))                              # (N, V) student
    zt = scale * rng.standard_normal((n, v)) + draw(st.sampled_from([0.0, 1.0])) * np.linspace(0, 40, v)
    if draw(st.booleans()):                                              # exact ties at the max
        zs[:, rng.integers(0, v, size=min(v, 3))] = zs.max() + 1.0
    labels = rng.integers(0, v, size=n)
    labels[rng.random(n) < 0.3] = -100
    return zs.astype(np.float32), zt.astype(np.float32), labels


@given(data=logit_pairs(), beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]), temperature=st.sampled_from([0.7, 1.0, 2.0]))
def test_gjsd_rows32_matches_numpy(data, beta, temperature):
    zs, zt, labels = data
    eye = np.eye(zs.shape[1], dtype=np.float32)                          # (V, V): logits = h exactly
    kw = dict(teacher_hidden=zt, teacher_weight=eye, beta=beta, temperature=temperature, chunk_size=3)
    want = distill.fused_linear_jsd(zs, eye, labels, backend="numpy", **kw)
    got = distill.fused_linear_jsd(zs, eye, labels, backend="numba", **kw)
    for g in got:
        assert g.dtype == np.float32 and np.isfinite(g).all()
    # The loss and dh = dZ I (exact) check the kernel itself, against the float64 computation: both
    # backends compute per element in float32 (the twin with <= 2 ulp exp32/log32, NumPy with its own
    # SIMD exp/log), and over 300 draws both were off float64 by up to ~3e-5 of the largest entry
    # (reverse KL at tau = 0.7 with logits ~ 40/0.7: NumPy 1.6e-5, the twin 2.7e-5). equiv32 (2e-5)
    # is below that error of float32 itself, so the bound here is 1e-4 of the scale, both sides.
    eye64 = np.eye(zs.shape[1])
    ref = distill.fused_linear_jsd(zs.astype(np.float64), eye64, labels, backend="numpy",
                                   **{**kw, "teacher_hidden": zt.astype(np.float64), "teacher_weight": eye64})
    for out in (got, want):
        for g, r in zip(out[:2], ref[:2], strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(r).max()))
    # dW = dZ^T h is a GEMM after the kernel: it carries dZ's float32 rounding times |h|, so its bound
    # is the dh bound above times sum_n |h[n, j]| (both sides off the float64 dZ by that bound, hence 2x)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=dw_atol(zs, ref[1]))
    dh = got[1]
    assert not dh[labels == -100].any()                                  # masked rows: no gradient


def dw_atol(h, dz_ref):
    """Absolute bound for dW = dZ^T h when each side's dZ is within 1e-4 * max(1, |dZ|) (+ 1e-4
    relative) of the float64 dZ: the error of dW[i, j] = sum_n dZ[n, i] h[n, j] is at most that dZ
    bound times sum_n |h[n, j]|, and the two sides' errors add.

    A bound relative to dW's own largest entry (1e-3 of it, as before) fails when the gradient is
    small but a few logits are large: a saved float32 reverse-KL case (one row, logits up to 105,
    tau = 0.7, |dZ| <= 6.4e-3) had dZ off the float64 value by 4e-5, inside the dh bound, which h
    turned into 4e-3 on a dW whose largest entry was ~1.
    """
    dz_bound = 1e-4 * max(1.0, float(np.abs(dz_ref).max())) + 1e-4 * float(np.abs(dz_ref).max())
    return 2 * dz_bound * float(np.abs(h.astype(np.float64)).sum(axis=0).max())


OPTIONS = {"forward_kl": {}, "reverse_kl": {}, "total_variation": {},
           "skew_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}


@given(data=logit_pairs(), name=st.sampled_from(sorted(OPTIONS)), dtype=st.sampled_from([np.float32, np.float64]),
       temperature=st.sampled_from([0.7, 1.0, 2.0]), alpha=st.sampled_from([None, 0.0, 0.5, 1.0]))
def test_every_divergence_row_twin_matches_numpy(data, name, dtype, temperature, alpha):
    """The row twins of the table's other entries (modes of divergence_rows) against the NumPy rows:
    loss, dh (= dZ, the head is the identity) and dW, masked rows included, float32 and float64."""
    zs, zt, labels = (a.astype(dtype) if a.dtype.kind == "f" else a for a in data)
    opts = dict(OPTIONS[name])
    if opts and alpha is not None:                                       # the ends: plain KL / zero
        opts["alpha"] = alpha
    eye = np.eye(zs.shape[1], dtype=dtype)                               # (V, V): logits = h exactly
    kw = dict(divergence=name, teacher_hidden=zt, teacher_weight=eye, temperature=temperature, chunk_size=3, **opts)
    want = distill.fused_linear_divergence(zs, eye, labels, backend="numpy", **kw)
    got = distill.fused_linear_divergence(zs, eye, labels, backend="numba", **kw)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == dtype and np.isfinite(g).all()
        # float64: rounding of a different evaluation order only; float32: both sides compute per
        # element in float32 (see test_gjsd_rows32_matches_numpy: 1e-4 of the scale for the loss and
        # dh = dZ; dW = dZ^T h carries dZ's rounding times the logits, see dw_atol)
        if dtype == np.float32 and k == 2:
            atol = dw_atol(zs, want[1])
        else:
            atol = (1e-9 if dtype == np.float64 else 1e-4) * max(1.0, np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=1e-9 if dtype == np.float64 else 1e-4, atol=atol)
    assert not got[1][labels == -100].any()                              # masked rows: no gradient
