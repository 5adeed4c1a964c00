"""DeepSeek-V3.2's stable-RL options (refimpl.rl.stable): unbiased KL, OPSM, Keep Sampling Mask; FD checks."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.model.generate import sample_next, top_p_mask
from refimpl.rl import grpo_loss, grpo_loss_from_logits, logps_entropy_backward, logps_entropy_forward
from refimpl.rl.stable import (
    masked_logps_entropy_backward,
    masked_logps_entropy_forward,
    off_policy_sequence_mask,
    unbiased_kl,
    v32_grpo_loss,
    v32_grpo_loss_from_logits,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import make_batch

GRAD = tol("gradcheck")["rtol"]


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------- unbiased KL (eq. 7)

def test_unbiased_kl_reference_vector():
    """π_θ=0.5, π_old=0.4, π_ref=0.25: ρ=1.25, k3=0.193147, D=0.241434, ∂D/∂ℓ=1.25 ln 2 (reference §4.2)."""
    D, dD = unbiased_kl(np.log([0.5]), np.log([0.4]), np.log([0.25]))
    np.testing.assert_allclose(D, [1.25 * (0.5 - np.log(0.5) - 1)], rtol=1e-14)
    np.testing.assert_allclose(D, [0.241434], atol=1e-6)
    np.testing.assert_allclose(dD, [1.25 * np.log(2)], rtol=1e-14)
    # on-policy: the gradient is l - l_ref (k2's), the value plain k3
    D1, dD1 = unbiased_kl(np.log([0.5]), None, np.log([0.25]))
    np.testing.assert_allclose(dD1, [np.log(2)], rtol=1e-14)
    np.testing.assert_allclose(D1, [0.5 - np.log(0.5) - 1], rtol=1e-14)


@given(rst.seeds(), st.integers(2, 9), st.floats(0.3, 3.0))
def test_unbiased_kl_expectation_equals_true_kl_by_enumeration(rng, V, scale):
    """Σ_o π_old(o) D(o) = KL(π_θ‖π_ref) and Σ_o π_old(o) ∂D/∂ℓ(o) ∇_z ℓ(o) = ∇_z KL, exactly;
    plain k3's expected gradient is not ∇KL (it is ∇KL(π_ref‖π_θ))."""
    z, z_old, z_ref = (scale * rng.standard_normal(V) for _ in range(3))
    lp, lo, lr = _log_softmax(z), _log_softmax(z_old), _log_softmax(z_ref)
    p, p_old, p_ref = np.exp(lp), np.exp(lo), np.exp(lr)
    D, dD = unbiased_kl(lp, lo, lr)                                   # one entry per vocabulary token o
    kl = float(np.sum(p * (lp - lr)))
    np.testing.assert_allclose(np.sum(p_old * D), kl, rtol=1e-12, atol=1e-14)
    # d l(o) / dz = onehot(o) - p   ->   E_old[dD dl/dz] = sum_o p_old(o) dD(o) (e_o - p)
    jac = np.eye(V) - p[None, :]                                      # (o, V)
    expected = (p_old * dD) @ jac                                     # (V,)
    true_grad = p * (lp - lr - kl)                                    # d KL(p || p_ref) / dz
    np.testing.assert_allclose(expected, true_grad, rtol=1e-10, atol=1e-13)
    k3_grad = 1.0 - np.exp(lr - lp)                                   # plain k3 on-policy
    rev = p_ref - p                                                   # minus the gradient of KL(p_ref || p)
    np.testing.assert_allclose((p * k3_grad) @ jac, -rev, rtol=1e-10, atol=1e-13)
    assume(np.abs(true_grad + rev).max() > 1e-6)
    assert np.abs((p * k3_grad) @ jac - true_grad).max() > 1e-9


@given(rst.seeds())
def test_unbiased_kl_gradient_matches_fd(rng):
    lp, lo, lr = (rng.normal(-1.5, 0.7, size=(3, 4)) for _ in range(3))

    def f(lp):
        D, dD = unbiased_kl(lp, lo, lr)
        return D, lambda g: (g * dD,)
    assert check_grad(f, [lp]) < GRAD


def test_unbiased_kl_properties():
    lp = np.log(np.array([0.1, 0.3, 0.6]))
    D, dD = unbiased_kl(lp, lp - 0.2, lp)                               # pi = pi_ref: D = 0, dD = 0
    assert np.all(D == 0) and np.all(dD == 0)
    D, _ = unbiased_kl(lp, lp + 0.3, lp + np.array([0.5, -0.4, 1.0]))
    assert np.all(D >= 0)
    with pytest.raises(ValueError, match="ref_logps"):
        unbiased_kl(lp, None, None)
    with pytest.raises(ValueError, match="old_logps"):
        unbiased_kl(lp, lp[:2], lp)


# ---------------------------------------------------------------- OPSM (eq. 8-9)

def test_opsm_reference_vector():
    """Â=[0.5,-0.5,-0.5,0.5], mean log(π_old/π_θ)=[0.2,0.05,0.3,0.4], δ=0.1 -> M=[1,1,0,1] (reference §4.3)."""
    A = np.array([0.5, -0.5, -0.5, 0.5])
    div = np.array([0.2, 0.05, 0.3, 0.4])
    lp = np.full((4, 3), -1.0)
    keep, d = off_policy_sequence_mask(A, lp, lp + div[:, None], np.ones((4, 3), bool), 0.1)
    np.testing.assert_array_equal(keep[:, 0], [True, True, False, True])
    np.testing.assert_allclose(d, div, rtol=1e-14)


@given(rst.seeds(), st.integers(1, 6), st.integers(1, 5), st.floats(0.0, 0.5), st.booleans())
def test_opsm_masks_exactly_the_sequences_the_formula_names(rng, B, T, delta, token_adv):
    lp = rng.normal(-1.0, 0.5, size=(B, T))
    samp = lp + rng.normal(0.1, 0.4, size=(B, T))
    mask = rng.random((B, T)) < 0.7
    A = rng.standard_normal((B, T) if token_adv else B)
    keep, div = off_policy_sequence_mask(A, lp, samp, mask, delta)
    for i in range(B):
        n = mask[i].sum()
        d = sum(samp[i, t] - lp[i, t] for t in range(T) if mask[i, t]) / max(n, 1)
        assert div[i] == pytest.approx(d, rel=1e-12, abs=1e-14)
        for t in range(T if token_adv else 1):
            a = A[i, t] if token_adv else A[i]
            assert keep[i, t] == (not (a < 0 and d > delta))


@given(rst.seeds(), st.sampled_from(["grpo", "dapo", "dr_grpo", "cispo", "sapo"]))
def test_opsm_zeroes_the_surrogate_gradient_of_masked_sequences_only(rng, loss_type):
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=3, T=4, loss_type=loss_type, spread=0.8)
    lp = logps_entropy_forward(logits, ids)[0]
    kw = dict(loss_type=loss_type, max_completion_length=4, epsilon_high=5.0 if loss_type == "cispo" else None)
    keep, div = off_policy_sequence_mask(adv, lp, old, mask, 0.05)
    _, d0, _ = v32_grpo_loss(lp, old, ref, adv, mask, off_policy_mask_threshold=0.05, **kw)
    masked = ~keep[:, 0]
    assert np.all(d0[masked] == 0)
    _, dplain, _ = grpo_loss(lp, old, ref, np.where(keep[:, 0], adv, 0.0), mask, **kw)
    np.testing.assert_array_equal(d0, dplain)
    # delta -> infinity recovers plain GRPO; with beta > 0 masked sequences keep their KL gradient
    _, dinf, _ = v32_grpo_loss(lp, old, ref, adv, mask, off_policy_mask_threshold=1e300, **kw)
    np.testing.assert_array_equal(dinf, grpo_loss(lp, old, ref, adv, mask, **kw)[1])
    _, dk, _ = v32_grpo_loss(lp, old, ref, adv, mask, off_policy_mask_threshold=0.05, beta=0.3,
                             use_bias_correction_kl=True, **kw)
    _, kl_only, _ = v32_grpo_loss(lp, old, ref, np.zeros_like(adv), mask, beta=0.3, use_bias_correction_kl=True, **kw)
    np.testing.assert_allclose(dk[masked], kl_only[masked], rtol=1e-14, atol=0)


# ---------------------------------------------------------------- the combined loss

@given(rst.seeds(), st.sampled_from(["grpo", "dapo", "dr_grpo", "bnpo"]), st.sampled_from(["token", "sequence"]),
       st.booleans())
def test_v32_loss_gradient_matches_fd(rng, loss_type, level, keep_mask):
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=2, T=3, V=6, loss_type=loss_type, level=level)
    lp0 = logps_entropy_forward(logits, ids)[0]
    samp = old + rng.normal(0, 0.3, size=old.shape)
    _, div = off_policy_sequence_mask(adv, lp0, samp, mask, 0.0)
    d = np.sort(div)                                   # delta in the widest gap: no mask flips under FD
    j = int(np.argmax(np.diff(d))) if len(d) > 1 else 0
    delta = float((d[j] + d[j + 1]) / 2) if len(d) > 1 else float(d[0] + 0.1)
    assume(np.min(np.abs(div - delta)) > 1e-3)
    vocab = None
    if keep_mask:
        vocab = rng.random(logits.shape) < 0.6
        np.put_along_axis(vocab, ids[..., None], True, axis=-1)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=3, beta=0.2,
              use_bias_correction_kl=True, off_policy_mask_threshold=delta, sampling_logps=samp,
              sampling_mask=vocab, temperature=0.8, entropy_coef=0.05)

    def f(z):
        loss, dz, _ = v32_grpo_loss_from_logits(z, ids, old, ref, adv, mask, **kw)
        return loss, lambda g: (g * dz,)
    assert check_grad(f, [logits]) < GRAD


@given(rst.seeds(), st.sampled_from(["grpo", "dapo", "sapo"]), st.booleans())
def test_v32_loss_with_options_off_is_grpo_loss_from_logits(rng, loss_type, on_policy):
    logits, ids, old, ref, adv, mask = make_batch(rng, loss_type=loss_type)
    old = None if on_policy else old
    kw = dict(loss_type=loss_type, beta=0.1, temperature=0.7, entropy_coef=0.01)
    a = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, **kw)
    b = v32_grpo_loss_from_logits(logits, ids, old, ref, adv, mask, **kw)
    assert float(a[0]) == float(b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------- Keep Sampling Mask

@given(rst.logits_and_targets(max_rows=6, max_vocab=9), st.sampled_from([1.0, 0.6]), rst.seeds())
def test_masked_logps_definition_and_gradient(case, tau, rng):
    z, ids = case
    ids = np.where(ids < 0, 0, ids)
    keep = rng.random(z.shape) < 0.5
    np.put_along_axis(keep, ids[..., None], True, axis=-1)
    lp, ent, _ = masked_logps_entropy_forward(z, ids, keep, temperature=tau)
    u = np.where(keep, z / tau, -np.inf)
    ref = np.take_along_axis(u, ids[..., None], -1)[..., 0] - np.log(np.exp(u - u.max(-1, keepdims=True)).sum(-1)) \
        - u.max(-1)
    np.testing.assert_allclose(lp, ref, rtol=1e-12, atol=1e-12)
    # the full vocabulary as the mask is the unmasked computation
    full = masked_logps_entropy_forward(z, ids, np.ones_like(keep), temperature=tau)
    np.testing.assert_array_equal(full[0], logps_entropy_forward(z, ids, temperature=tau)[0])

    def f(z):
        lp, ent, c = masked_logps_entropy_forward(z, ids, keep, temperature=tau)
        return (lp, ent), lambda g: (masked_logps_entropy_backward(g[0], g[1], c),)
    assert check_grad(f, [z]) < GRAD
    g = rng.standard_normal(ids.shape)
    dz = masked_logps_entropy_backward(g, None, masked_logps_entropy_forward(z, ids, keep, temperature=tau)[2])
    assert np.all(dz[~keep] == 0)
    np.testing.assert_allclose(dz.sum(-1), 0.0, atol=1e-12)
    shifted = masked_logps_entropy_forward(z + 3.7, ids, keep, temperature=tau)[0]
    np.testing.assert_allclose(shifted, lp, rtol=1e-12, atol=1e-12)
    # unmasked backward with the full mask: identical
    c = logps_entropy_forward(z, ids, temperature=tau)[2]
    cm = masked_logps_entropy_forward(z, ids, np.ones_like(keep), temperature=tau)[2]
    np.testing.assert_array_equal(masked_logps_entropy_backward(g, None, cm), logps_entropy_backward(g, None, c))


def test_masked_logps_rejects_a_sampled_token_outside_the_mask():
    z = np.zeros((2, 4))
    keep = np.array([[True, False, False, False]] * 2)
    with pytest.raises(ValueError, match="sampling_mask"):
        masked_logps_entropy_forward(z, np.array([0, 2]), keep)
    with pytest.raises(ValueError, match="sampling_mask"):
        masked_logps_entropy_forward(z, np.array([0, 0]), keep.astype(int))


@given(rst.seeds(), st.sampled_from([0.3, 0.7, 0.95, 1.0]), st.sampled_from([0.5, 1.0, 2.0]))
def test_top_p_mask_is_the_set_sample_next_draws_from(rng, top_p, tau):
    z = 2.0 * rng.standard_normal((3, 7))
    keep = top_p_mask(z, temperature=tau, top_p=top_p)
    p = np.exp(_log_softmax(z / tau))
    for row in range(3):
        kept = p[row][keep[row]]
        assert kept.sum() >= top_p - 1e-12                             # enough mass
        assert kept.sum() - kept.min() < top_p                         # and minimal
        assert kept.min() >= p[row][~keep[row]].max(initial=0.0)       # the most likely tokens
    draws = np.stack([sample_next(z, temperature=tau, top_p=top_p, rng=rng) for _ in range(200)])  # (200, 3)
    assert all(keep[r, draws[:, r]].all() for r in range(3))
