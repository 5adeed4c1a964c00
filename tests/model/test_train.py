"""Training loop: loss goes down, bias update, deterministic, exact resume from a checkpoint."""

import numpy as np

from refimpl.model.train import TrainConfig, init_state, load_checkpoint, train
from refimpl.tree import tree_flatten


def _batch_fn(cfg):
    def batch(rng, step):
        start = rng.integers(0, cfg.vocab_size, (4, 1))
        ids = (start + np.arange(8)) % cfg.vocab_size            # counting task: next = current + 1
        return ids, None
    return batch


TC = TrainConfig(steps=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, backend="numpy", bias_update_speed=0.01)


def test_training_reduces_loss_and_moves_biases(tiny):
    cfg, params = tiny
    bias0 = params["model"]["layers"][1]["mlp"]["gate"]["e_score_correction_bias"].copy()
    state = train(init_state(params, seed=3), cfg, _batch_fn(cfg), TrainConfig(**{**TC.__dict__, "steps": 25}),
                  progress=False)
    h = state.history
    assert len(h["loss"]) == 25 and np.mean(h["lm_loss"][-5:]) < np.mean(h["lm_loss"][:5])
    moved = state.params["model"]["layers"][1]["mlp"]["gate"]["e_score_correction_bias"] - bias0
    k = moved / 0.01
    assert np.allclose(k, np.round(k), atol=1e-9)                # whole multiples of gamma
    assert np.abs(moved).max() > 0


def test_deterministic_and_exact_resume(tiny, tmp_path):
    cfg, params = tiny
    full = train(init_state(params, seed=7), cfg, _batch_fn(cfg), TC, progress=False)
    again = train(init_state(params, seed=7), cfg, _batch_fn(cfg), TC, progress=False)
    assert full.history == again.history
    ck = tmp_path / "ck.npz"
    half = train(init_state(params, seed=7), cfg, _batch_fn(cfg), TC, stop_at=3, checkpoint_path=ck, progress=False)
    assert half.step == 3
    state, cfg2 = load_checkpoint(ck)
    assert cfg2 == cfg
    resumed = train(state, cfg2, _batch_fn(cfg2), TC, progress=False)
    assert resumed.history == full.history                     # same losses, bit for bit
    for a, b in zip(tree_flatten(resumed.params)[0], tree_flatten(full.params)[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_step_bias_update_uses_the_batch_load(tiny):
    from refimpl.model import loss_forward
    from refimpl.moe import bias_update
    cfg, params = tiny
    state = init_state(params, seed=1)
    batch = _batch_fn(cfg)(np.random.default_rng(1), 0)
    info = loss_forward(batch[0], params, cfg, backend="numpy")[2]
    tc = TrainConfig(**{**TC.__dict__, "steps": 1, "warmup_steps": 1})
    new = train(state, cfg, _batch_fn(cfg), tc, progress=False)
    for lp, new_lp, load in zip([params["model"]["layers"][1], params["mtp"][0]],
                                [new.params["model"]["layers"][1], new.params["mtp"][0]],
                                info["load"] + info["mtp_load"], strict=True):
        b = lp["mlp"]["gate"]["e_score_correction_bias"]
        np.testing.assert_array_equal(new_lp["mlp"]["gate"]["e_score_correction_bias"], bias_update(b, load, 0.01))
