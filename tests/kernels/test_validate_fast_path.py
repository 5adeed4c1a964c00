"""check_float's one-pass finiteness test (a finite sum means every element is finite) keeps its errors.

It sits in front of every twin (the cross-entropy forward on 8192 x 32768 logits spent as long in the
two validation scans as in the kernel), so it is tested here with the kernels' benchmarks in mind.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refimpl._validate import check_float


@given(hnp.arrays(st.sampled_from([np.float32, np.float64]), st.integers(1, 50),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_rejects_exactly_the_non_finite_arrays(x):
    if np.isfinite(x).all():
        assert check_float("x", x) is x
    else:
        with pytest.raises(ValueError, match="x: contains NaN or inf"):
            check_float("x", x)


def test_finite_values_whose_sum_overflows_are_accepted():
    big = np.full(8, np.finfo(np.float32).max, np.float32)             # sum is inf, every value finite
    assert check_float("x", big) is big
    with pytest.raises(ValueError, match="NaN or inf"):
        check_float("x", np.array([np.inf, -np.inf, 1.0]))             # the sum is NaN: still rejected
    assert check_float("x", np.array([-np.inf, 1.0]), allow_inf=True) is not None   # -inf as a mask
    with pytest.raises(ValueError, match=r"\+inf"):
        check_float("x", np.array([np.inf, 1.0]), allow_inf=True)
