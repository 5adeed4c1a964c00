"""The GRPO loss-type table (refimpl.rl.loss_types): every entry's gradient, its options through
GRPOConfig, and a new entry picked up by grpo_loss, the entropy bonus and the trainer's objective."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.model import init_params
from refimpl.rl import LOSS_TABLE, GRPOConfig, LossType, entropy_bonus, grpo_loss, grpo_objective, register_loss_type
from refimpl.rl.loss_types import clipped_surrogate, get_loss_type, items_weights
from refimpl.rl.trainer import completion_logps
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

from .helpers import make_batch
from .test_trainer import random_batch, small_gc, tiny_config

GRAD_TOL = tol("gradcheck")["rtol"]
OPTS = {"sapo": {"sapo_temperature_pos": 3.0, "sapo_temperature_neg": 0.5}}


@pytest.mark.parametrize("loss_type", list(LOSS_TABLE))
@given(rng=rst.seeds(), level=st.sampled_from(["token", "sequence"]), beta=st.sampled_from([0.0, 0.04]))
def test_every_entry_has_a_correct_gradient(loss_type, rng, level, beta):
    """float64 central differences of grpo_loss in the log-probs, random upstream gradient, every table entry
    (with non-default options where it has some)."""
    logits, ids, old, ref, adv, mask = make_batch(rng, level=level, loss_type=loss_type, epsilon_high=0.28)
    lp = old + rng.uniform(-0.1, 0.1, old.shape)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_high=0.28,
              max_completion_length=lp.shape[1], **OPTS.get(loss_type, {}))
    lp = np.where(mask, np.log(np.exp(old) * np.clip(np.exp(lp - old), 0.9, 1.1)), lp)   # ratios inside the clip

    def f(x):
        loss, g, _ = grpo_loss(x, old, ref, adv, mask, **kw)
        return loss, lambda d: (g * float(d),)
    assert check_grad(f, [lp]) < GRAD_TOL


def test_options_are_the_entrys_and_reach_the_loss():
    """sapo's temperatures change the loss; an option another entry declares is refused, by grpo_loss and
    by GRPOConfig (which validates loss_options against the entry)."""
    rng = np.random.default_rng(0)
    _, _, old, ref, adv, mask = make_batch(rng, loss_type="sapo")
    lp = old + 0.3
    a = grpo_loss(lp, old, None, adv, mask, loss_type="sapo")[0]
    b = grpo_loss(lp, old, None, adv, mask, loss_type="sapo", sapo_temperature_pos=5.0, sapo_temperature_neg=5.0)[0]
    assert a != b
    with pytest.raises(ValueError, match="loss_options"):
        grpo_loss(lp, old, None, adv, mask, loss_type="dapo", sapo_temperature_pos=5.0)
    assert GRPOConfig(loss_type="sapo", loss_options={"sapo_temperature_pos": 2.0}).loss_options
    with pytest.raises(ValueError, match="loss_options"):
        GRPOConfig(loss_type="grpo", loss_options={"sapo_temperature_pos": 2.0})
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        GRPOConfig(loss_type="sapo", loss_options={"sapo_temperature_neg": 0.0})
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="nope")


def _half_surrogate(ratio, A, logps, opts):
    """A test entry: the clipped surrogate times an option 'scale'."""
    pg, dldr, _ = clipped_surrogate(ratio, A, logps, opts)
    return opts["scale"] * pg, opts["scale"] * dldr, None


@pytest.fixture
def dummy_loss_type():
    entry = register_loss_type(LossType("dummy_half", _half_surrogate, items_weights, True, None, {"scale": 0.5}))
    yield entry
    LOSS_TABLE.pop(entry.name)


def test_a_registered_entry_is_picked_up_everywhere(dummy_loss_type):
    """One register_loss_type call: grpo_loss, entropy_bonus, GRPOConfig and grpo_objective (the trainer's
    loss) accept the new loss_type and its option, with the value the entry defines."""
    rng = np.random.default_rng(1)
    _, _, old, ref, adv, mask = make_batch(rng, loss_type="dapo", epsilon_high=0.28)
    lp = old + rng.uniform(-0.05, 0.05, old.shape)
    base, gbase, _ = grpo_loss(lp, old, None, adv, mask, loss_type="dapo", epsilon_high=0.28)
    half, ghalf, info = grpo_loss(lp, old, None, adv, mask, loss_type="dummy_half", epsilon_high=0.28)
    np.testing.assert_allclose(half, 0.5 * base, rtol=1e-14)
    np.testing.assert_allclose(ghalf, 0.5 * gbase, rtol=1e-14, atol=1e-300)
    assert "clip_ratio/low_mean" not in info                             # no diagnostics declared
    quarter = grpo_loss(lp, old, None, adv, mask, loss_type="dummy_half", epsilon_high=0.28, scale=0.25)[0]
    np.testing.assert_allclose(quarter, 0.25 * base, rtol=1e-14)
    t1 = entropy_bonus(np.ones(mask.shape), mask, entropy_coef=1.0, loss_type="dummy_half", num_items_in_batch=100)[0]
    assert t1 == pytest.approx(-mask.sum() / 100)                        # items_normalised=True
    assert get_loss_type("dummy_half") is dummy_loss_type

    cfg = tiny_config()
    params = init_params(cfg, np.random.default_rng(0), np.float64)
    gc_d = small_gc(loss_type="dapo", beta=0.0)
    gc_h = small_gc(loss_type="dummy_half", beta=0.0, loss_options={"scale": 0.25})
    batch = random_batch(np.random.default_rng(2), gc_d)
    adv = np.random.default_rng(3).standard_normal(4)
    cur = completion_logps(params, cfg, batch, gc_d.temperature)
    old = cur + np.random.default_rng(4).uniform(-0.05, 0.05, cur.shape)
    ld, gd, _ = grpo_objective(params, cfg, batch, adv, old, None, gc_d)
    lh, gh, _ = grpo_objective(params, cfg, batch, adv, old, None, gc_h)
    np.testing.assert_allclose(lh, 0.25 * ld, rtol=1e-12)
    np.testing.assert_allclose(gh["lm_head"], 0.25 * gd["lm_head"], rtol=1e-10, atol=1e-18)
