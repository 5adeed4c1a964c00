"""FP8 emulation checked against the format definitions (OCP FP8 spec), DeepSeek-V3 §3.3, and torch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.quant import fp8
from refimpl.testing import strategies as rst

FORMATS = ["e4m3", "e5m2"]
BACKENDS = ["numpy", "numba"]


def _decode_all(fmt):
    """Decode every bit pattern from the definition: (value, is_nan, is_inf) for all 256 codes."""
    f = fp8.FP8_FORMATS[fmt]
    out = []
    for code in range(256):
        sign = -1.0 if code >> 7 else 1.0
        e = (code >> f.mantissa_bits) & (2 ** f.exponent_bits - 1)
        m = code & (2 ** f.mantissa_bits - 1)
        top = e == 2 ** f.exponent_bits - 1
        if f.has_inf and top:
            out.append((sign * np.inf, m != 0, m == 0))
        elif not f.has_inf and top and m == 2 ** f.mantissa_bits - 1:
            out.append((np.nan, True, False))
        elif e == 0:
            out.append((sign * m * 2.0 ** (1 - f.bias - f.mantissa_bits), False, False))
        else:
            out.append((sign * (1 + m / 2 ** f.mantissa_bits) * 2.0 ** (e - f.bias), False, False))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_constants_match_definition(fmt):
    f = fp8.FP8_FORMATS[fmt]
    finite = np.array([v for v, nan, inf in _decode_all(fmt) if not nan and not inf])
    assert finite.max() == f.max and np.min(finite[finite > 0]) == f.min_subnormal
    np.testing.assert_array_equal(fp8.fp8_values(fmt), np.unique(np.abs(finite)))
    assert (f.max, f.min_normal) == ({"e4m3": (448.0, 2.0**-6), "e5m2": (57344.0, 2.0**-14)}[fmt])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_value_round_trips_and_midpoints_tie_to_even(fmt, dtype, backend):
    vals = fp8.fp8_values(fmt)                                   # ascending, non-negative
    grid = np.concatenate([-vals[::-1], vals]).astype(dtype)
    np.testing.assert_array_equal(fp8.round_to_fp8(grid, fmt, backend=backend), grid)
    lo, hi = vals[:-1], vals[1:]
    mid = (lo + hi) / 2                                          # exact in float64
    # the even neighbour is the one whose last mantissa bit is 0: its index in the grid is even
    even = np.where(np.arange(len(lo)) % 2 == 0, lo, hi)
    np.testing.assert_array_equal(fp8.round_to_fp8(mid, fmt, backend=backend), even)
    np.testing.assert_array_equal(fp8.round_to_fp8(-mid, fmt, backend=backend), -even)
    # just off the midpoint, round to the nearer neighbour
    np.testing.assert_array_equal(fp8.round_to_fp8(np.nextafter(mid, 0), fmt, backend=backend), lo)
    np.testing.assert_array_equal(fp8.round_to_fp8(np.nextafter(mid, np.inf), fmt, backend=backend), hi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturation_overflow_nan_inf(backend):
    x = np.array([460.0, 464.0, 465.0, 1e6, -1e6, np.inf, np.nan])
    np.testing.assert_array_equal(fp8.round_to_fp8(x, "e4m3", backend=backend)[:6],
                                  [448, 448, 448, 448, -448, 448])
    e4 = fp8.round_to_fp8(x, "e4m3", saturate=False, backend=backend)
    np.testing.assert_array_equal(e4[:2], [448, 448])           # 464 is a tie and rounds to even 448
    assert np.isnan(e4[2:]).all()                                # E4M3 has no inf: overflow is NaN
    # 61440 is the midpoint between the max 57344 (odd mantissa) and 2^16: ties-to-even goes up, to inf
    e5 = fp8.round_to_fp8(np.array([61439.0, 61440.0, -1e9, np.nan]), "e5m2", saturate=False, backend=backend)
    assert e5[0] == 57344 and e5[1] == np.inf and e5[2] == -np.inf and np.isnan(e5[3])


@given(x=rst.float_arrays(rst.shapes(max_side=8), min_value=-500, max_value=500),
       fmt=st.sampled_from(FORMATS))
def test_numba_equals_numpy(x, fmt):
    np.testing.assert_array_equal(fp8.round_to_fp8(x, fmt, backend="numba"), fp8.round_to_fp8(x, fmt, backend="numpy"))


@given(rng=rst.seeds(), fmt=st.sampled_from(FORMATS))
def test_matches_torch_casts(rng, fmt):
    torch = pytest.importorskip("torch")
    f = fp8.FP8_FORMATS[fmt]
    x = (rng.standard_normal(2000) * np.exp(rng.uniform(-12, 6, 2000))).astype(np.float32)
    x = np.clip(x, -f.max, f.max)
    tdtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    ref = torch.from_numpy(x).to(tdtype).to(torch.float32).numpy()
    np.testing.assert_array_equal(fp8.round_to_fp8(x, fmt), ref)


@given(rng=rst.seeds(), rows=st.integers(1, 4), tiles=st.integers(1, 3), scale_fmt=st.sampled_from([None, "ue8m0"]),
       outlier=st.booleans())
def test_activation_tile_error_bounds(rng, rows, tiles, scale_fmt, outlier):
    """Reference §9 item 19: no saturation; relative error <= 2^-4 in the normal range; absolute
    error <= s*2^-10 below it; ue8m0 scales are powers of two >= the plain scale."""
    x = rng.standard_normal((rows, tiles * 128)) * np.exp(rng.uniform(-3, 3, (rows, tiles * 128)))
    if outlier:
        x[0, 5] = 1e4
    q, s = fp8.quantize_activation(x, 128, "e4m3", scale_fmt)
    assert np.abs(q).max() <= 448
    s_full = np.repeat(s.astype(np.float64), 128, axis=-1)
    x_hat = q * s_full
    scaled = np.abs(x) / s_full
    normal = scaled >= 2.0 ** -6
    err = np.abs(x - x_hat)
    assert np.all(err[normal] <= 2.0 ** -4 * np.abs(x[normal]) * (1 + 1e-6))
    assert np.all(err[~normal] <= s_full[~normal] * 2.0 ** -10 * (1 + 1e-6))
    np.testing.assert_allclose(fp8.dequantize_activation(q, s), x_hat, rtol=1e-6)
    plain = np.maximum(np.abs(x.reshape(rows, tiles, 128)).max(-1), 1e-4) / 448
    if scale_fmt == "ue8m0":
        assert np.all(np.log2(s) == np.round(np.log2(s))) and np.all(s >= plain * (1 - 1e-6))
    else:
        np.testing.assert_allclose(s, plain, rtol=1e-6)


def test_block_scaling_isolates_an_outlier(rng):
    """The point of fine-grained scaling: one outlier coarsens its own tile only."""
    x = rng.standard_normal((4, 512))
    x[0, 0] = 1e4
    q, s = fp8.quantize_activation(x, 128)
    blockwise = (np.abs(fp8.dequantize_activation(q, s) - x) / np.abs(x))[1:].mean()
    qt, st_ = fp8.quantize_activation(x.reshape(1, -1), 2048)     # one scale for the whole tensor
    per_tensor = (np.abs(fp8.dequantize_activation(qt, st_, 2048).reshape(x.shape) - x) / np.abs(x))[1:].mean()
    # the outlier pushes the other rows' small values into E4M3's subnormal range under one scale
    assert blockwise < 0.03 and per_tensor > 2 * blockwise


@given(rng=rst.seeds(), n=st.integers(1, 300), k=st.integers(1, 300))
def test_weight_blocks_with_partial_edges(rng, n, k):
    w = rng.standard_normal((n, k))
    q, s = fp8.quantize_weight(w, 128)
    assert s.shape == (-(-n // 128), -(-k // 128))
    w_hat = fp8.dequantize_weight(q, s)
    s_full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    assert np.all(np.abs(w_hat - w) <= 2.0 ** -4 * np.abs(w) + s_full * 2.0**-10)


@given(rng=rst.seeds(), m=st.integers(1, 6), n=st.integers(1, 140), kb=st.integers(1, 3))
def test_gemm_equals_float64_product_of_dequantised_operands(rng, m, n, kb):
    k = 128 * kb
    x, w = rng.standard_normal((m, k)), rng.standard_normal((n, k)) * 0.05
    xq, xs = fp8.quantize_activation(x)
    wq, ws = fp8.quantize_weight(w)
    y = fp8.fp8_gemm(xq, xs, wq, ws)
    exact = fp8.dequantize_activation(xq, xs).astype(np.float64) @ fp8.dequantize_weight(wq, ws).astype(np.float64).T
    # float32 accumulation: each of kb block sums has error <= ~k*eps32*sum|products|
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(fp8.dequantize_activation(xq, xs)) @
                                                 np.abs(fp8.dequantize_weight(wq, ws)).T)
    assert y.dtype == np.float32 and np.all(np.abs(y - exact) <= bound + 1e-30)


def test_linear_forward_and_straight_through_backward(rng):
    from refimpl.core import linear_backward, linear_forward
    x, w = rng.standard_normal((3, 5, 256)), rng.standard_normal((128, 256)) * 0.1
    y, c = fp8.fp8_linear_forward(x, w)
    y_ref, _ = linear_forward(x, w)
    assert y.shape == (3, 5, 128) and np.abs(y - y_ref).max() < 0.05 * np.abs(y_ref).max()
    dy = rng.standard_normal(y.shape)
    dx, dw = fp8.fp8_linear_backward(dy, c)
    xq, xs = fp8.quantize_activation(x.reshape(-1, 256))
    wq, ws = fp8.quantize_weight(w)
    _, ci = linear_forward(fp8.dequantize_activation(xq, xs).astype(np.float64),
                           fp8.dequantize_weight(wq, ws).astype(np.float64))
    dx_ref, dw_ref, _ = linear_backward(dy.reshape(-1, 128), ci)
    np.testing.assert_allclose(dx.reshape(-1, 256), dx_ref, rtol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12)
    _, cq = fp8.fp8_linear_forward(x, w, quantize_grad=True)
    dxq, _ = fp8.fp8_linear_backward(dy, cq)
    assert 0 < np.abs(dxq - dx).max() < 0.1 * np.abs(dx).max()


@pytest.mark.parametrize("call, exc, arg", [
    (lambda: fp8.quantize_activation(np.ones((2, 100))), ValueError, "x"),
    (lambda: fp8.quantize_activation(np.array([[np.nan] * 128])), ValueError, "x"),
    (lambda: fp8.quantize_activation(np.ones((2, 128)), scale_fmt="e8"), ValueError, "scale_fmt"),
    (lambda: fp8.quantize_weight(np.ones(128)), ValueError, "w"),
    (lambda: fp8.quantize_weight(np.full((2, 2), np.inf)), ValueError, "w"),
    (lambda: fp8.round_to_fp8(np.ones(2), "e3m4"), ValueError, "fmt"),
    (lambda: fp8.round_to_fp8([1.0], "e4m3"), TypeError, "x"),
    (lambda: fp8.quantize_activation(np.ones((2, 128)), block=0), ValueError, "block"),
])
def test_bad_input(call, exc, arg):
    with pytest.raises(exc, match=f"^{arg}"):
        call()
