"""The vectorisable float32 exp (refimpl.kernels.vecmath_nb): <= 2 ulp over the whole float32 range."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytest.importorskip("numba")
from refimpl.kernels.vecmath_nb import exp32_array, fast_exp  # noqa: E402

MAX_ULP = 2


def ordered(a):
    """float32 bit patterns as integers that are consecutive for consecutive floats (+0 == -0)."""
    i = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def reference(x):
    """exp rounded once to float32 (float64 exp has ~1e-16 relative error: far below a float32 ulp)."""
    with np.errstate(over="ignore", invalid="ignore"):   # NaN inputs: NaN out, no warning
        return np.exp(x.astype(np.float64)).astype(np.float32)


def compare_ulp(got, want, x):
    """ulp distance of finite results; NaN and inf must match exactly."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), x[np.isnan(got) != nan][:5]
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), x[inf][got[inf] != want[inf]][:5]
    ok = ~nan & ~inf
    return np.abs(ordered(got[ok]) - ordered(want[ok]))


def ulp_error(x):
    return compare_ulp(exp32_array(x, np.empty_like(x)), reference(x), x)


def test_exp32_on_a_stride_over_every_float32():
    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)   # ~1M patterns, every exponent
    err = ulp_error(bits.view(np.float32))
    assert err.max() <= MAX_ULP


def test_exp32_special_values_and_thresholds():
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 88.72283, 88.72284, 89.0, 1e30,
                  -87.33654, -87.34, -100.0, -103.27893, -103.98, -104.0, -1e30], np.float32)
    got = exp32_array(x, np.empty_like(x))
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 0.0
    assert got[3] == got[4] == got[5] == got[6] == 1.0
    assert got[8] == got[9] == got[10] == np.inf             # overflow where float32 overflows
    assert 0 < got[13] < np.finfo(np.float32).tiny           # subnormal results stay subnormal, not 0
    assert got[-3] == got[-2] == got[-1] == 0.0              # underflow to 0
    assert ulp_error(x).max() <= MAX_ULP


@given(hnp.arrays(np.float32, st.integers(1, 300),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)))
def test_exp32_hypothesis_any_float32(x):
    assert ulp_error(x).max(initial=0) <= MAX_ULP


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-104.0, 89.0, width=32)))
def test_exp32_hypothesis_useful_range(x):
    assert ulp_error(x).max() <= MAX_ULP


def test_fast_exp_is_libm_exp_in_float64():
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_exp(x[i])
        return out

    x = np.linspace(-800, 800, 1001)
    with np.errstate(over="ignore"):
        # numba calls libm's exp, NumPy its own SIMD one: both within 1 ulp of exact
        np.testing.assert_allclose(apply(x, np.empty_like(x)), np.exp(x), rtol=4e-16, atol=0)
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(apply(x32, np.empty_like(x32)), exp32_array(x32, np.empty_like(x32)))


def test_exp32_keeps_its_rounding_inside_a_fastmath_caller():
    from numba import njit

    from refimpl.kernels.vecmath_nb import exp32

    @njit(fastmath={"reassoc", "contract", "arcp", "nsz"})
    def total(x):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += exp32(x[i])
        return acc

    x = np.array([88.40392], np.float32)                 # exp(x) * 2^-128 < 1 < 2^64 * 2^64
    assert total(x) == reference(x)[0] != np.inf


@given(hnp.arrays(np.float32, st.integers(1, 300),
                  elements=st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True)))
def test_max32_equals_numpy_max(x):
    from refimpl.kernels.vecmath_nb import max32
    got, want = max32(x), x.max()
    assert got == want and np.signbit(got) == np.signbit(want) or (got == want == 0)


# ------------------------------------------------------------------ log32

def log_ulp_error(x):
    from refimpl.kernels.vecmath_nb import log32_array
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.log(x.astype(np.float64)).astype(np.float32)     # rounded once to float32
    return compare_ulp(log32_array(x, np.empty_like(x)), want, x)


def test_log32_on_a_stride_over_every_float32():
    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)   # ~1M patterns, every exponent
    assert log_ulp_error(bits.view(np.float32)).max() <= MAX_ULP


def test_log32_special_values():
    from refimpl.kernels.vecmath_nb import log32_array
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, -1.0, 1.0, np.finfo(np.float32).tiny,
                  np.finfo(np.float32).max, 0.70710677, 0.7071068, 1.4142135, 1.4142137, 2.0, 0.5], np.float32)
    got = log32_array(x, np.empty_like(x))
    assert np.isnan(got[0]) and got[1] == np.inf and np.isnan(got[2])
    assert got[3] == got[4] == -np.inf                        # log(+-0) = -inf, as np.log
    assert got[5] == np.float32(np.log(np.float64(tiny)))     # subnormal input: exact to the rounding
    assert np.isnan(got[6]) and np.isnan(got[7])              # negative: NaN
    assert got[8] == 0.0
    assert log_ulp_error(x).max() <= MAX_ULP


@given(hnp.arrays(np.float32, st.integers(1, 300),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)))
def test_log32_hypothesis_any_float32(x):
    assert log_ulp_error(x).max(initial=0) <= MAX_ULP


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(0.0, 2.0, width=32)))
def test_log32_hypothesis_near_one_and_probabilities(x):
    assert log_ulp_error(x).max(initial=0) <= MAX_ULP
