"""Bad input to the GRPO losses raises early, naming the argument."""

import numpy as np
import pytest

from refimpl.rl import entropy_bonus, grpo_loss, grpo_loss_from_logits, per_token_kl

B, T = 4, 3
LP = np.full((B, T), -1.0)
MASK = np.ones((B, T), bool)
ADV = np.array([1.0, -1.0, 0.5, -0.5])


def call(**over):
    args = dict(logps=LP, old_logps=None, ref_logps=None, advantages=ADV, mask=MASK)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return grpo_loss(*args.values(), **kw)


@pytest.mark.parametrize(("over", "exc", "match"), [
    (dict(loss_type="ppo"), ValueError, "loss_type: expected one of"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(mask=np.ones((B, T + 1), bool)), ValueError, "mask: expected shape"),
    (dict(mask=np.full((B, T), 2)), ValueError, "mask: expected a bool"),
    (dict(mask=[[1] * T] * B), TypeError, "mask"),
    (dict(advantages=np.ones(B + 1)), ValueError, "advantages: expected shape"),
    (dict(advantages=np.array([1.0, np.nan, 0.0, 0.0])), ValueError, "advantages"),
    (dict(old_logps=np.zeros((B, T), np.float32)), TypeError, "old_logps: expected dtype"),
    (dict(old_logps=np.zeros((B, T + 1))), ValueError, "old_logps: expected shape"),
    (dict(ref_logps=np.zeros((B, 2))), ValueError, "ref_logps: expected shape"),
    (dict(logps=np.full(B, -1.0)), ValueError, "logps: expected 2 dimensions"),
    (dict(logps=np.full((B, T), -1, dtype=np.int64)), TypeError, "logps"),
    (dict(beta=0.1), ValueError, "ref_logps: required when beta"),
    (dict(beta=-0.1, ref_logps=LP), ValueError, "beta"),
    (dict(epsilon=-0.2), ValueError, "epsilon"),
    (dict(epsilon_high="0.28"), TypeError, "epsilon_high"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length: required"),
    (dict(loss_type="dr_grpo", max_completion_length=T - 1), ValueError, "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=4.0), TypeError, "max_completion_length"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg"),
])
def test_grpo_loss_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_logits_entry_point_bad_input(rng):
    z = rng.standard_normal((B, T, 5))
    ids = rng.integers(0, 5, size=(B, T))
    with pytest.raises(ValueError, match="logits: expected 3 dimensions"):
        grpo_loss_from_logits(z[0], ids[0], None, None, ADV, MASK)
    with pytest.raises(ValueError, match="completion_ids: expected shape"):
        grpo_loss_from_logits(z, ids[:, :2], None, None, ADV, MASK)
    with pytest.raises(ValueError, match="entropy_coef"):
        grpo_loss_from_logits(z, ids, None, None, ADV, MASK, entropy_coef=-1.0)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss_from_logits(z, ids, None, None, ADV, MASK, loss_type="reinforce")
    with pytest.raises(ValueError, match="mask"):
        entropy_bonus(np.zeros((B, T)), np.ones((B, 2), bool), entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        per_token_kl(LP, LP, kl_estimator="k5")


def test_empty_mask_gives_zero_not_nan():
    for lt in ("grpo", "bnpo", "dapo", "cispo", "sapo"):
        J, g, info = call(mask=np.zeros((B, T), bool), loss_type=lt, old_logps=LP - 0.1)
        assert J == 0.0 and not g.any() and info["num_tokens"] == 0
        assert all(np.isfinite(v) for v in info.values())
