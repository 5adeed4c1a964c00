"""Issue 15 items 5, 6, 7: sampling checks its logits; extreme-but-valid inputs give finite,
correct results (or an error naming the argument), never a silent NaN/inf/0."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import ModelConfig
from refimpl.core.rmsnorm import rmsnorm_forward
from refimpl.core.softmax import log_softmax_backward, log_softmax_forward
from refimpl.model import generate, init_params, sample_next
from refimpl.moe import balance_backward, bias_update, expert_balance_forward, seq_balance_forward
from refimpl.quant import fp8_linear_forward, quantize_activation, quantize_weight
from refimpl.rl import group_advantages, process_advantages

RNG = np.random.default_rng(0)


# ---- item 5: sampling ---------------------------------------------------------------------------

@pytest.mark.parametrize("logits, match", [
    (np.array([[np.nan, 1.0, 2.0]]), "logits: contains NaN"), (np.array([1.0, 2.0]), "logits: expected 2"),
    (np.array([[np.inf, 1.0]]), "logits: contains NaN or \\+inf"), (np.full((1, 2), -np.inf), "logits: a row"),
    ([[1.0, 2.0]], "logits: expected a numpy"), (np.zeros((1, 0)), "logits: expected at least one"),
])
def test_sample_next_rejects_bad_logits(logits, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sample_next(logits)
    with pytest.raises((ValueError, TypeError), match=match):
        sample_next(logits, temperature=1.0, rng=RNG)


@given(z=st.lists(st.integers(-10**4, 10**4), min_size=2, max_size=6, unique=True),
       tau=st.sampled_from([1e-310, 1e-300, 1e-30, 1e-8]))
def test_tiny_temperature_tends_to_the_argmax(z, tau):
    logits = np.array([z], dtype=np.float64)   # gaps >= 1 >> tau: the draw must be the argmax
    assert sample_next(logits, temperature=tau, rng=np.random.default_rng(0))[0] == np.argmax(logits)


def test_generate_refuses_an_infinite_head():
    cfg = ModelConfig.preset("tiny")
    p = init_params(cfg, np.random.default_rng(0))
    p["lm_head"] = np.full_like(p["lm_head"], np.inf)
    with pytest.raises(ValueError, match="^params: lm_head: contains NaN or inf"):
        generate(p, cfg, np.array([[1, 2]]), 2)


# ---- item 6: numerics -----------------------------------------------------------------------------

def test_log_softmax_of_a_fully_masked_row_is_minus_inf():
    x = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    logp, cache = log_softmax_forward(x)
    assert np.array_equal(logp, [[-np.inf, -np.inf], [0.0, -np.inf]])
    assert np.isfinite(log_softmax_backward(np.ones_like(x), cache)).all()


@given(mag=st.floats(1e-30, 1e300), dtype=st.sampled_from([np.float32, np.float64]), d=st.integers(1, 5))
def test_rmsnorm_is_scale_invariant_at_any_magnitude(mag, dtype, d):
    mag = min(mag, float(np.finfo(dtype).max) / 4)
    x = (np.linspace(-1.0, 1.0, d) + 0.5).astype(dtype) * dtype(mag)
    if not np.any(x):
        return
    y, _ = rmsnorm_forward(x, np.ones(d, dtype), eps=1e-6)
    assert np.isfinite(y).all()
    rms = np.sqrt(np.mean(np.square(x.astype(np.float64) / np.abs(x).max())))
    expected = x.astype(np.float64) / np.abs(x).max() / rms
    if mag > 1e3:   # eps is negligible: |y| has unit root-mean-square, not 0
        np.testing.assert_allclose(y, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_seq_balance_with_underflowed_scores_is_finite():
    loss, cache = seq_balance_forward(np.zeros((1, 2, 4)), np.zeros((1, 2, 1), int), 0.1)
    assert loss == 0.0 and np.all(balance_backward(1.0, cache) == 0.0)
    s = np.array([[[0.0, 0.0, 0.0, 0.0], [0.2, 0.3, 0.1, 0.4]]])
    loss, cache = seq_balance_forward(s, np.array([[[0], [3]]]), 0.1)
    assert np.isfinite(loss) and np.isfinite(balance_backward(1.0, cache)).all()


@pytest.mark.parametrize("call, name", [
    (lambda: bias_update(np.zeros(3), np.array([1.0, np.nan, 2.0]), 1e-3), "load"),
    (lambda: bias_update(np.zeros(3), np.ones(3), np.inf), "gamma"),
    (lambda: expert_balance_forward(np.full((1, 2, 4), 0.25), np.zeros((1, 2, 1), int), np.nan), "alpha"),
    (lambda: seq_balance_forward(np.full((1, 2, 4), 0.25), np.zeros((1, 2, 1), int), -1.0), "alpha"),
    (lambda: process_advantages(np.ones((2, 2)), np.ones((2, 2), bool), 2, std_eps=np.nan), "std_eps"),
    (lambda: process_advantages(np.ones((2, 2)), np.ones((2, 2), bool), 2, std_eps=-1.0), "std_eps"),
])
def test_non_finite_options_are_named(call, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        call()


@given(big=st.floats(1e150, 1e308), g=st.integers(2, 4))
def test_group_advantages_of_huge_rewards(big, g):
    r = np.array([big, -big] + [0.0] * (g - 2))
    adv, info = group_advantages(r.astype(np.float64), g)
    # scale-invariant: the advantages of (big, -big, 0...) are those of (1, -1, 0...)
    ref, _ = group_advantages(np.array([1.0, -1.0] + [0.0] * (g - 2)), g, std_eps=0.0)
    np.testing.assert_allclose(adv, ref, rtol=1e-9)
    assert np.isfinite(info["reward_std"])
    with pytest.raises(ValueError, match="^rewards: advantages"):
        group_advantages(np.array([1.7e308, -1.7e308, -1.7e308]), 3, scale_rewards="none")


# ---- item 7: quantisation -------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0, 0.0, -1e-4, np.nan, "1e-4", 1e-45])
def test_quantisation_eps_is_checked(eps):
    with pytest.raises((ValueError, TypeError), match="^eps"):
        quantize_activation(np.zeros((1, 4)), 4, eps=eps)
    with pytest.raises((ValueError, TypeError), match="^eps"):
        quantize_weight(np.zeros((4, 4)), 4, eps=eps)


def test_quantisation_out_of_float32_scale_names_the_input():
    with pytest.raises(ValueError, match="^x: a block's max"):
        fp8_linear_forward(np.full((1, 4), 1e42), np.ones((2, 4)), block=4)
    with pytest.raises(ValueError, match="^w: a block's max"):
        fp8_linear_forward(np.ones((1, 4)), np.full((2, 4), 1e42), block=4)
    q, s = quantize_activation(np.full((1, 4), 1e41), np.int64(4))   # in range, and block as np.int64
    assert np.isfinite(q).all() and np.isfinite(s).all()
    with pytest.raises(ValueError, match="^block"):
        quantize_activation(np.ones((1, 4)), 0)
