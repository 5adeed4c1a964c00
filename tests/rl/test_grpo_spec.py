"""The reference spec's invariants (§6) and concrete vectors (§6b) for the GRPO losses, and the places
where refimpl follows TRL rather than verl or Liger."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl import (
    LOSS_TYPES,
    group_advantages,
    grpo_loss,
    grpo_loss_from_logits,
    logps_entropy_forward,
    per_token_kl,
)
from refimpl.testing import strategies as rst
from refimpl.testing import tol

from .helpers import make_batch

EQ = tol("equiv64")

# ---------------------------------------------------------------- §6b concrete vectors
A2 = np.array([0.707007, -0.707007])
MASK = np.array([[1, 1], [1, 0]], dtype=bool)
LP = np.log(np.array([[0.7, 0.3], [0.2, 0.2]]))


def test_vector_advantages_two_samples():
    adv, _ = group_advantages(np.array([1.0, 0.0]), 2)
    np.testing.assert_allclose(adv, A2, atol=1e-6)


@pytest.mark.parametrize(("loss_type", "loss", "grad"), [
    ("grpo", 0.0, [[-0.176752, -0.176752], [0.353503, 0.0]]),
    ("bnpo", -0.235669, [[-0.235669, -0.235669], [0.235669, 0.0]]),
    ("dapo", -0.235669, [[-0.235669, -0.235669], [0.235669, 0.0]]),
    ("dr_grpo", -0.088376, [[-0.088376, -0.088376], [0.088376, 0.0]]),
])
def test_vector_on_policy(loss_type, loss, grad):
    adv, _ = group_advantages(np.array([1.0, 0.0]), 2)
    J, g, _ = grpo_loss(LP, None, None, adv, MASK, loss_type=loss_type, max_completion_length=4)
    np.testing.assert_allclose(J, loss, atol=1e-6)
    np.testing.assert_allclose(g, grad, atol=1e-6)


def test_vector_off_policy_clipping():
    adv, _ = group_advantages(np.array([1.0, 0.0]), 2)
    old = np.log(np.array([[0.5, 0.4], [0.3, 0.2]]))
    J, g, info = grpo_loss(LP, old, None, adv, MASK, loss_type="grpo", epsilon=0.2)
    np.testing.assert_allclose(J, -0.061863, atol=1e-6)
    np.testing.assert_allclose(g, [[0.0, -0.132564], [0.0, 0.0]], atol=1e-6)
    # token (0,0) clipped high with A>0, token (1,0) clipped low with A<0; (0,1) has rho<0.8, A>0: not clipped
    assert info["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert info["clip_ratio/low_mean"] == pytest.approx(1 / 3)
    assert info["clip_ratio/region_mean"] == pytest.approx(2 / 3)


def test_vector_k3():
    k, dk = per_token_kl(np.log(np.array([0.5])), np.log(np.array([0.25])))
    np.testing.assert_allclose(k, 0.193147, atol=1e-6)
    np.testing.assert_allclose(dk, 0.5, atol=1e-12)


# ---------------------------------------------------------------- §6 invariants
@given(rng=rst.seeds(), lt=st.sampled_from(LOSS_TYPES), level=st.sampled_from(["token", "sequence"]))
def test_identical_rewards_leave_only_the_kl_gradient(rng, lt, level):
    """§6.2: a group with equal rewards has A = 0, so only beta * k3 moves its tokens."""
    _, ids, old, ref, _, mask = make_batch(rng, groups=2, G=3, T=4)
    logps = rng.uniform(-3, -0.1, size=ids.shape)
    adv, info = group_advantages(np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.5]), 3)
    assert np.all(adv == 0.0) and info["frac_reward_zero_std"] == 1.0
    _, g, _ = grpo_loss(logps, old, ref, adv, mask, loss_type=lt, beta=0.1, importance_sampling_level=level,
                        max_completion_length=4)
    _, g_kl_only, _ = grpo_loss(logps, old, ref, np.zeros(6), mask, loss_type=lt, beta=0.1,
                                importance_sampling_level=level, max_completion_length=4)
    np.testing.assert_array_equal(g, g_kl_only)
    _, g0, _ = grpo_loss(logps, old, ref, adv, mask, loss_type=lt, beta=0.0, importance_sampling_level=level,
                         max_completion_length=4)
    assert not np.any(g0)


@given(rng=rst.seeds(), G=st.integers(2, 4), T=st.integers(1, 5))
def test_on_policy_gradient_and_values(rng, G, T):
    """§6.4: on-policy, beta = 0: dJ/dl = -A W; grpo's value is 0 for complete groups; dapo's is -sum A n / N."""
    B = 2 * G
    logps = rng.uniform(-3, -0.1, size=(B, T))
    mask = rng.random((B, T)) < 0.7
    mask[:, 0] = True   # an empty completion would contribute 0 instead of -A_i to grpo's value
    adv, _ = group_advantages(rng.standard_normal(B), G)
    n = mask.sum(1)
    J, g, _ = grpo_loss(logps, None, None, adv, mask, loss_type="grpo")
    np.testing.assert_allclose(J, 0.0, atol=1e-12)
    np.testing.assert_allclose(g, -adv[:, None] * mask / (B * np.maximum(n, 1))[:, None], **EQ)
    J, g, _ = grpo_loss(logps, None, None, adv, mask, loss_type="dapo")
    N = max(mask.sum(), 1)
    np.testing.assert_allclose(J, -np.sum(adv * n) / N, **EQ)
    np.testing.assert_allclose(g, -adv[:, None] * mask / N, **EQ)


@pytest.mark.parametrize(("A", "rho", "expect_zero"), [
    (1.0, 1.5, True),    # A>0 above 1+eps_hi: clipped
    (-1.0, 0.5, True),   # A<0 below 1-eps_lo: clipped
    (1.0, 0.5, False),   # A>0 below 1-eps_lo: the pessimistic min keeps rho*A, gradient -W A rho
    (-1.0, 1.5, False),  # A<0 above 1+eps_hi: likewise, not clipped
    (1.0, 1.1, False),
])
def test_clipping_cases(A, rho, expect_zero):
    """§6.5."""
    logps = np.array([[-1.0]])
    old = logps - np.log(rho)
    _, g, _ = grpo_loss(logps, old, None, np.array([A]), np.ones((1, 1), bool), loss_type="bnpo")
    np.testing.assert_allclose(g, 0.0 if expect_zero else -A * rho, rtol=1e-12)


@given(rng=rst.seeds(), V=st.integers(2, 12))
def test_k3_properties(rng, V):
    """§6.6: k3 >= 0, zero with zero slope at l = l_ref, convex, and E_pi[k3] = KL(pi || pi_ref) exactly."""
    lp = np.log(rng.dirichlet(np.ones(V)))
    lref = np.log(rng.dirichlet(np.ones(V)))
    k, dk = per_token_kl(lp, lref)
    assert np.all(k >= 0)
    k0, dk0 = per_token_kl(lref, lref)
    assert np.all(k0 == 0) and np.all(dk0 == 0)
    h = 1e-5
    second = (per_token_kl(lp + h, lref)[1] - per_token_kl(lp - h, lref)[1]) / (2 * h)
    np.testing.assert_allclose(second, np.exp(lref - lp), rtol=1e-6)
    p = np.exp(lp)
    np.testing.assert_allclose(np.sum(p * k), np.sum(p * (lp - lref)), **EQ)


@given(rng=rst.seeds(), lt=st.sampled_from(LOSS_TYPES), level=st.sampled_from(["token", "sequence"]),
       tau=st.sampled_from([1.0, 0.5, 3.0]), shift=st.floats(-50, 50))
def test_logit_gradient_rows_sum_to_zero_and_shift_invariance(rng, lt, level, tau, shift):
    """§6.7 and §6.9: rows of dJ/dz sum to 0; adding a constant per position changes nothing; masked
    positions have zero gradient and their logits do not affect the loss."""
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=2, T=4, V=5, level=level)
    kw = dict(loss_type=lt, importance_sampling_level=level, beta=0.1, max_completion_length=4, temperature=tau,
              entropy_coef=0.01)
    J, dz, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, **kw)
    np.testing.assert_allclose(dz.sum(-1), 0.0, atol=1e-12)
    assert not np.any(dz[~mask])
    per_pos = shift * rng.standard_normal(mask.shape)[..., None]
    J2, dz2, _ = grpo_loss_from_logits(logits + per_pos, ids, old, ref, adv, mask, **kw)
    np.testing.assert_allclose(J2, J, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dz2, dz, rtol=1e-7, atol=1e-10)
    garbage = np.where(mask[..., None], logits, 1e3 * rng.standard_normal(logits.shape))
    old_g = np.where(mask, old, 123.0)
    J3, dz3, _ = grpo_loss_from_logits(garbage, ids, old_g, ref, adv, mask, **kw)
    np.testing.assert_allclose(J3, J, **EQ)
    np.testing.assert_allclose(dz3, dz, **EQ)


@given(rng=rst.seeds(), tau=st.sampled_from([0.3, 0.7, 2.0]), lt=st.sampled_from(LOSS_TYPES))
def test_temperature_scales_the_logit_gradient(rng, tau, lt):
    """§6.8: J(z; tau) = J(z / tau; 1), and dJ/dz = (1 / tau) dJ/d(z / tau)."""
    logits, ids, old, ref, adv, mask = make_batch(rng, T=3)
    kw = dict(loss_type=lt, beta=0.05, max_completion_length=3, entropy_coef=0.02)
    J, dz, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, temperature=tau, **kw)
    J1, du, _ = grpo_loss_from_logits(logits / tau, ids, old, ref, adv, mask, temperature=1.0, **kw)
    np.testing.assert_allclose(J, J1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dz, du / tau, rtol=1e-9, atol=1e-12)


def test_length_weighting_of_dr_grpo_grpo_dapo():
    """§6.10: duplicating a sequence's tokens doubles its share under dr_grpo, leaves it under grpo, and
    gives each token weight 1/N under dapo."""
    A = np.array([1.0, -1.0])
    short = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    long = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    lp = np.full((2, 4), -1.0)
    share = {}
    for lt in ("dr_grpo", "grpo", "dapo"):
        s = [-grpo_loss(lp, None, None, A, m, loss_type=lt, max_completion_length=4)[1][0].sum()
             for m in (short, long)]
        share[lt] = s[1] / s[0]
    assert share["dr_grpo"] == pytest.approx(2.0)
    assert share["grpo"] == pytest.approx(1.0)
    assert share["dapo"] == pytest.approx((4 / 6) / (2 / 4))


@given(rng=rst.seeds(), d=st.floats(-0.15, 0.15))
def test_gspo_equal_log_ratios(rng, d):
    """§6.11: all log-ratios of a sequence equal d, unclipped, grpo aggregation: dJ/dl = -A e^d / (n B)."""
    B, T = 4, 5
    lp = rng.uniform(-3, -0.1, size=(B, T))
    mask = rng.random((B, T)) < 0.7
    mask[:, 0] = True
    adv = rng.standard_normal(B)
    _, g, _ = grpo_loss(lp, lp - d, None, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    n = mask.sum(1, keepdims=True)
    np.testing.assert_allclose(g, -adv[:, None] * np.exp(d) * mask / (n * B), rtol=1e-10, atol=1e-15)


@given(rng=rst.seeds(), lt=st.sampled_from(["dapo", "cispo"]))
def test_micro_batches_add_up_with_num_items_in_batch(rng, lt):
    """§6.17: with the global token count, summing micro-batch losses/gradients gives the full batch's;
    a per-micro-batch token mean (bnpo) does not when lengths differ."""
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=2, T=5, loss_type=lt)
    logps, _, _ = logps_entropy_forward(logits, ids)
    kw = dict(loss_type=lt, beta=0.1)
    J, g, _ = grpo_loss(logps, old, ref, adv, mask, **kw)
    N = int(mask.sum())
    parts = [grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], num_items_in_batch=N, **kw)
             for s in (slice(0, 1), slice(1, 4))]
    np.testing.assert_allclose(sum(p[0] for p in parts), J, **EQ)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), g, **EQ)


def test_bnpo_micro_batches_do_not_add_up():
    lp = np.full((2, 3), -1.0)
    mask = np.array([[1, 1, 1], [1, 0, 0]], dtype=bool)
    adv = np.array([1.0, 1.0])
    J = grpo_loss(lp, None, None, adv, mask, loss_type="bnpo")[0]
    parts = [grpo_loss(lp[s], None, None, adv[s], mask[s], loss_type="bnpo")[0] for s in (slice(0, 1), slice(1, 2))]
    assert abs(sum(parts) - J) > 0.5


# ---------------------------------------------------------------- TRL, not verl / Liger
def test_dr_grpo_divides_by_batch_times_max_length_not_padded_length():
    """TRL dr_grpo: / (B * L_max); verl seq-mean-token-sum-norm divides by T only (a factor B apart)."""
    lp = np.full((3, 2), -1.0)
    mask = np.ones((3, 2), bool)
    adv = np.array([1.0, 0.0, -2.0])
    _, g, info = grpo_loss(lp, None, None, adv, mask, loss_type="dr_grpo", max_completion_length=8)
    assert info["normalizer"] == 24
    np.testing.assert_allclose(g, -adv[:, None] * np.ones((3, 2)) / 24)


def test_cispo_caps_at_epsilon_high_itself():
    """TRL cispo: weight sg[min(rho, epsilon_high)] (recommended epsilon_high = 5); verl clips to 1 +- eps."""
    lp = np.array([[-1.0, -1.0]])
    old = lp - np.log(np.array([[3.0, 0.5]]))
    mask = np.ones((1, 2), bool)
    _, g, info = grpo_loss(lp, old, None, np.array([1.0]), mask, loss_type="cispo", epsilon_high=5.0)
    np.testing.assert_allclose(g, [[-3.0 / 2, -0.5 / 2]])
    _, g, info = grpo_loss(lp, old, None, np.array([1.0]), mask, loss_type="cispo", epsilon_high=2.0)
    np.testing.assert_allclose(g, [[-2.0 / 2, -0.5 / 2]])
    assert info["cispo_clip_ratio"] == 0.5


def test_log_ratio_is_not_clamped():
    """TRL leaves the log-ratio unclamped (verl clamps it to [-20, 20]): rho = e^25 reaches the gradient."""
    lp = np.array([[-1.0]])
    _, g, _ = grpo_loss(lp, lp - 25.0, None, np.array([-1.0]), np.ones((1, 1), bool), loss_type="bnpo")
    np.testing.assert_allclose(g, [[np.exp(25.0)]], rtol=1e-12)


def test_float32_in_float32_out(rng):
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=3, T=6, V=11, scale=3.0)
    kw = dict(loss_type="grpo", beta=0.04, entropy_coef=0.01, temperature=0.8)
    J64, dz64, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, **kw)
    f32 = lambda x: x.astype(np.float32)
    J32, dz32, _ = grpo_loss_from_logits(f32(logits), ids, f32(old), f32(ref), f32(adv), mask, **kw)
    assert J32.dtype == np.float32 and dz32.dtype == np.float32
    np.testing.assert_allclose(J32, J64, **tol("equiv32"))
    np.testing.assert_allclose(dz32, dz64, rtol=tol("equiv32")["rtol"], atol=1e-6)
