"""Finite-difference checks (float64) of every loss_type x importance_sampling_level x KL estimator, to the logits."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl import LOSS_TYPES, grpo_loss, grpo_loss_from_logits, logps_entropy_forward
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import make_batch

GRAD_TOL = tol("gradcheck")["rtol"]
COMBOS = list(itertools.product(LOSS_TYPES, ("token", "sequence"), ("k1", "k2", "k3")))


@pytest.mark.parametrize(("loss_type", "level", "kl"), COMBOS)
@given(rng=rst.seeds(), T=st.integers(1, 4), V=st.integers(2, 6), G=st.sampled_from([2, 3]),
       temperature=st.sampled_from([1.0, 0.7]), token_adv=st.booleans(),
       epsilon_high=st.sampled_from([None, 0.28]), delta=st.sampled_from([None, 1.6]))
def test_loss_from_logits_matches_finite_differences(loss_type, level, kl, rng, T, V, G, temperature, token_adv,
                                                     epsilon_high, delta):
    if loss_type == "cispo":
        epsilon_high = None if epsilon_high is None else 0.5   # cap below every ratio: sg[min] is constant
    logits, ids, old, ref, adv, mask = make_batch(
        rng, G=G, T=T, V=V, level=level, loss_type=loss_type, epsilon_high=epsilon_high, delta=delta,
        temperature=temperature, token_advantages=token_adv)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, kl_estimator=kl, beta=0.3,
              epsilon_high=epsilon_high, delta=delta, max_completion_length=T + 2, temperature=temperature,
              entropy_coef=0.05)

    def f(z):
        loss, dz, _ = grpo_loss_from_logits(z, ids, old, ref, adv, mask, **kw)
        return loss, lambda dy: (float(dy) * dz,)

    # 16 random entries per example (hypothesis varies which), so 36 combos fit the time budget
    assert check_grad(f, [logits], max_entries=16, seed=int(rng.integers(2**31))) < GRAD_TOL


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@given(rng=rst.seeds(), level=st.sampled_from(["token", "sequence"]))
def test_loss_in_logps_matches_finite_differences(loss_type, rng, level):
    """The same at the log-prob level, on-policy included (old = a frozen copy of logps: rho = 1)."""
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=3, T=4, level=level, loss_type=loss_type)
    logps, _, _ = logps_entropy_forward(logits, ids)
    on_policy = logps.copy()
    for old_ in (old, on_policy):
        if loss_type == "cispo" and old_ is on_policy:
            continue      # rho = 1 > eps_high = 0.2: still constant, but covered above
        def f(lp, old_=old_):
            loss, dlp, _ = grpo_loss(lp, old_, ref, adv, mask, loss_type=loss_type, beta=0.1,
                                     importance_sampling_level=level, max_completion_length=4)
            return loss, lambda dy: (float(dy) * dlp,)
        assert check_grad(f, [logps]) < GRAD_TOL


def test_on_policy_none_equals_frozen_copy(rng):
    """old_logps=None is rho = exp(l - sg(l)): the same value and gradient as a frozen copy of logps."""
    logits, ids, _, ref, adv, mask = make_batch(rng, groups=3, T=4)
    logps, _, _ = logps_entropy_forward(logits, ids)
    for lt in LOSS_TYPES:
        a = grpo_loss(logps, None, ref, adv, mask, loss_type=lt, beta=0.2, max_completion_length=4)
        b = grpo_loss(logps, logps.copy(), ref, adv, mask, loss_type=lt, beta=0.2, max_completion_length=4)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
