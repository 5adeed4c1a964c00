"""Issue 15 item 3: the GRPO loss never returns a silent NaN/inf when an exponential overflows.

The ratio exp(logps - old_logps) and k3's exp(ref_logps - logps) leave float64's range above
exp(709.78); TRL (unclamped, refimpl's semantics) then gives NaN or inf. refimpl gives the exact
value when it is finite and otherwise a ValueError naming the argument.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl import grpo_loss, grpo_loss_from_logits
from refimpl.rl.grpo import LOSS_TYPES

ONES = np.ones((1, 2))


def test_issue_reproductions():
    # A = 0: 0 * inf was NaN; the term is exactly 0
    loss, d, _ = grpo_loss(np.zeros((1, 2)), np.full((1, 2), -800.0), None, np.zeros(1), ONES)
    assert loss == 0.0 and np.all(d == 0.0)
    # A < 0: the loss is e^800 |A|, not representable: an error naming old_logps
    with pytest.raises(ValueError, match="^old_logps: the importance ratio"):
        grpo_loss(np.zeros((1, 2)), np.full((1, 2), -800.0), None, -np.ones(1), ONES)
    # k3 with ref - logp = 800
    with pytest.raises(ValueError, match="^ref_logps: the KL estimator"):
        grpo_loss(np.zeros((1, 2)), None, np.full((1, 2), 800.0), np.ones(1), ONES, beta=0.1)
    # the same through the logits: policies that disagree with |z| ~ 1e4
    z = np.zeros((1, 2, 3))
    z[0, :, 0] = 1e4
    old = np.full((1, 2), -2e4)
    with pytest.raises(ValueError, match="^old_logps"):
        grpo_loss_from_logits(z, np.zeros((1, 2), np.int64), old, None, -np.ones(1), ONES)
    loss, dz, _ = grpo_loss_from_logits(z, np.zeros((1, 2), np.int64), old, None, np.zeros(1), ONES)
    assert np.isfinite(loss) and np.isfinite(dz).all()


@given(lp=st.lists(st.floats(-3e3, 0.0), min_size=2, max_size=2),
       old=st.lists(st.floats(-3e3, 0.0), min_size=2, max_size=2),
       ref=st.lists(st.floats(-3e3, 0.0), min_size=2, max_size=2),
       a=st.sampled_from([-1.0, 0.0, 0.5]), loss_type=st.sampled_from(LOSS_TYPES),
       level=st.sampled_from(["token", "sequence"]), beta=st.sampled_from([0.0, 0.04]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_finite_or_named_error(lp, old, ref, a, loss_type, level, beta, dtype):
    lp, old, ref = (np.array([v], dtype=dtype) for v in (lp, old, ref))
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, max_completion_length=2)
    try:
        loss, d, _ = grpo_loss(lp, old, ref, np.full(1, a, dtype=dtype), ONES, **kw)
    except ValueError as e:
        assert str(e).startswith(("old_logps:", "ref_logps:"))
        big = np.log(np.finfo(dtype).max)
        # only raised when an exponent really is out of range
        assert (lp - old).max() > big - 60 or (beta and (ref - lp).max() > big - 60)
        return
    assert np.isfinite(loss) and np.isfinite(d).all() and d.dtype == dtype
