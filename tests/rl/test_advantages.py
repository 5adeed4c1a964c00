"""Group-relative and process-supervision advantages: §6.1-6.2, §6b, edge cases and TRL's choices."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl import group_advantages, process_advantages
from refimpl.testing import strategies as rst
from refimpl.testing import tol

EQ = tol("equiv64")


def test_vector_trl_and_verl_epsilon():
    """§6b: [1, 0, 0, 1] -> +-0.865875 (TRL, eps 1e-4), +-0.866024 (verl, eps 1e-6), not +-0.9998 (ddof=0)."""
    r = np.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(group_advantages(r, 4)[0], [0.865875, -0.865875, -0.865875, 0.865875], atol=1e-6)
    np.testing.assert_allclose(group_advantages(r, 4, std_eps=1e-6)[0], 0.866024 * np.array([1, -1, -1, 1]),
                               atol=1e-6)


@given(rng=rst.seeds(), P=st.integers(1, 4), G=st.integers(2, 6), dtype=st.sampled_from([np.float32, np.float64]))
def test_group_sums_and_std(rng, P, G, dtype):
    """§6.1: per group, advantages sum to 0 and their ddof=1 std is sigma / (sigma + 1e-4)."""
    r = rng.integers(0, 4, size=P * G).astype(dtype)
    adv, info = group_advantages(r, G)
    assert adv.dtype == dtype
    a, rr = adv.astype(np.float64).reshape(P, G), r.astype(np.float64).reshape(P, G)
    sig = rr.std(axis=1, ddof=1)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(a.sum(1), 0.0, atol=atol)
    np.testing.assert_allclose(a.std(axis=1, ddof=1), sig / (sig + 1e-4), atol=atol)
    flat = sig == 0
    assert np.all(a[flat] == 0.0)               # §6.2: exact zeros, never NaN
    assert info["frac_reward_zero_std"] == pytest.approx(flat.mean())
    none, _ = group_advantages(r, G, scale_rewards="none")
    np.testing.assert_allclose(none.reshape(P, G), rr - rr.mean(1, keepdims=True), atol=atol)
    np.testing.assert_array_equal(group_advantages(r, G, scale_rewards=False)[0], none)
    np.testing.assert_array_equal(group_advantages(r, G, scale_rewards=True)[0], adv)


def test_batch_scaling_uses_batch_std_and_group_mean():
    r = np.array([1.0, 0.0, 5.0, 3.0])
    adv, _ = group_advantages(r, 2, scale_rewards="batch")
    np.testing.assert_allclose(adv, (r - np.array([0.5, 0.5, 4.0, 4.0])) / (r.std(ddof=1) + 1e-4), **EQ)


def test_all_equal_rewards_are_exact_zero_even_with_float_residue():
    """Mean of equal non-representable values is not always bit-equal to them; refimpl still returns 0."""
    r = np.full(7, 0.1)
    adv, info = group_advantages(r, 7)
    assert np.all(adv == 0.0) and info["frac_reward_zero_std"] == 1.0


def test_zero_epsilon_flat_groups_stay_zero():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("group", "batch"):
            adv, _ = group_advantages(np.array([2.0, 2.0, 1.0, 1.0]), 2, std_eps=0.0, scale_rewards=mode)
            assert np.all(adv == 0.0)
        adv, _ = group_advantages(np.array([2.0, 0.0, 1.0, 1.0]), 2, std_eps=0.0)
        np.testing.assert_allclose(adv, [1 / np.sqrt(2), -1 / np.sqrt(2), 0.0, 0.0], **EQ)


def test_singleton_groups_are_zero_as_trl():
    """TRL: A = 0 for G = 1 (verl would give r / (1 + 1e-6))."""
    r = np.array([3.0, -1.0, 0.5])
    for mode in ("group", "batch", "none"):
        assert np.all(group_advantages(r, 1, scale_rewards=mode)[0] == 0.0)


def test_nan_rewards_raise_by_default_and_are_omitted_on_request():
    r = np.array([1.0, np.nan, 0.0, 1.0, np.nan, np.nan])
    with pytest.raises(ValueError, match="rewards.*NaN"):
        group_advantages(r, 3)
    adv, _ = group_advantages(r, 3, nan_policy="omit")
    # group 1: [1, nan, 0] -> mean 0.5, std of [1, 0]; group 2: one valid value -> 0
    s = np.std([1.0, 0.0], ddof=1)
    np.testing.assert_allclose(adv, [0.5 / (s + 1e-4), 0.0, -0.5 / (s + 1e-4), 0.0, 0.0, 0.0], **EQ)
    assert not np.isnan(adv).any()


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(rewards=np.ones(5), num_generations=2), ValueError, "rewards: .*divisible"),
    (dict(rewards=np.ones(4), num_generations=0), ValueError, "num_generations"),
    (dict(rewards=np.ones(4), num_generations=True), TypeError, "num_generations"),
    (dict(rewards=np.ones(4), num_generations=2.0), TypeError, "num_generations"),
    (dict(rewards=np.ones((2, 2)), num_generations=2), ValueError, "rewards: expected shape"),
    (dict(rewards=[1.0, 0.0], num_generations=2), TypeError, "rewards"),
    (dict(rewards=np.array([1, 0]), num_generations=2), TypeError, "rewards"),
    (dict(rewards=np.array([1.0, np.inf]), num_generations=2), ValueError, "rewards"),
    (dict(rewards=np.ones(4), num_generations=2, scale_rewards="grp"), ValueError, "scale_rewards"),
    (dict(rewards=np.ones(4), num_generations=2, nan_policy="drop"), ValueError, "nan_policy"),
    (dict(rewards=np.ones(4), num_generations=2, std_eps=-1.0), ValueError, "std_eps"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_advantages(**kwargs)


def test_process_supervision_by_hand():
    """DeepSeekMath §4.1.3: normalise step rewards over the group, then sum those at or after each token."""
    rew = np.zeros((2, 4))
    steps = np.zeros((2, 4), bool)
    rew[0, 1], rew[0, 3], rew[1, 2] = 1.0, 0.0, 0.5
    steps[0, 1] = steps[0, 3] = steps[1, 2] = True
    adv, info = process_advantages(rew, steps, 2)
    v = np.array([1.0, 0.0, 0.5])
    nv = (v - v.mean()) / (v.std(ddof=1) + 1e-4)
    expect = np.array([[nv[0] + nv[1], nv[0] + nv[1], nv[1], nv[1]], [nv[2], nv[2], nv[2], 0.0]])
    np.testing.assert_allclose(adv, expect, **EQ)
    assert info["num_steps"] == 3


@given(rng=rst.seeds(), G=st.integers(1, 4), T=st.integers(1, 6))
def test_process_supervision_properties(rng, G, T):
    B = 2 * G
    steps = rng.random((B, T)) < 0.4
    rew = rng.integers(0, 3, size=(B, T)).astype(np.float64)
    adv, _ = process_advantages(rew, steps, G)
    assert np.isfinite(adv).all()
    # the first token's advantage sums every normalised step reward; those sum to 0 over the group
    np.testing.assert_allclose(adv[:, 0].reshape(2, G).sum(1), 0.0, atol=1e-9)
    # after a completion's last step the advantage is 0
    for i in range(B):
        last = np.nonzero(steps[i])[0]
        after = slice(last[-1] + 1 if last.size else 0, T)
        assert np.all(adv[i, after] == 0.0)
    # outcome supervision is the special case "one step, at the last token"
    if T >= 1 and G >= 2:
        r = rng.standard_normal(B)
        one = np.zeros((B, T), bool)
        one[:, -1] = True
        adv_p, _ = process_advantages(np.where(one, r[:, None], 0.0), one, G)
        np.testing.assert_allclose(adv_p, np.repeat(group_advantages(r, G)[0][:, None], T, 1), **EQ)


def test_process_bad_input():
    with pytest.raises(TypeError, match="step_mask"):
        process_advantages(np.zeros((2, 3)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="step_mask"):
        process_advantages(np.zeros((2, 3)), np.zeros((2, 2), bool), 2)
    with pytest.raises(ValueError, match="step_rewards"):
        process_advantages(np.zeros((3, 3)), np.zeros((3, 3), bool), 2)
