"""Exact resume for every method on the shared loop: N steps in one run == N/2, checkpoint, load, N/2 more
(parameters bit for bit, history equal except ``seconds``, evaluations equal)."""

import numpy as np
import pytest

from refimpl.config import ModelConfig
from refimpl.distill.pipelines import GKDConfig, default_data, gkd_train, sequence_kd_train
from refimpl.model import init_params
from refimpl.model.train import TrainConfig, init_state, train
from refimpl.optim import warmup_cosine_lr
from refimpl.rl import GRPOConfig, grpo_train, rollout, sft_train
from refimpl.tasks import TOKENIZER, AdditionTask
from refimpl.train import History, load_checkpoint
from refimpl.tree import tree_flatten

from ..distill.helpers import student_config, teacher_config

TASK = AdditionTask(1, 2)
V = TOKENIZER.vocab_size


def _same(a, b):
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(la) == len(lb) and all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(la, lb, strict=False))


def _check(full, resumed, half_steps, n):
    assert isinstance(full["history"], History) and isinstance(resumed["history"], History)
    assert len(full["history"]) == n and resumed["history"]["step"] == list(range(1, n + 1))
    assert resumed["history"] == full["history"]                        # == ignores seconds only
    assert all(r["seconds"] > 0 for r in resumed["history"]) and len(resumed["seconds"]) == n
    assert _same(resumed["params"], full["params"])
    assert not _same(half_steps["params"], full["params"])              # the second half did something


def tiny_policy():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=V, max_position_embeddings=64)
    return cfg, init_params(cfg, np.random.default_rng(3), np.float32)


def varied_rewards(monkeypatch):
    """A reward that varies within groups for an untrained policy (the rule rewards are all 0 there)."""
    def score(task, texts, answers, lengths, cfg):
        acc = np.array([1.0 if t[:1] and (t[0].isdigit() or "a" <= t[0] < "n") else 0.0 for t in texts])
        return acc, np.zeros(len(texts)), acc * cfg.reward_weights[0]
    monkeypatch.setattr(rollout, "score_completions", score)


@pytest.mark.parametrize("changes", [
    dict(beta=0.02, num_iterations=2, warmup_steps=2),                 # π_ref (in the checkpoint) and π_old
    dict(dynamic_sampling=True, keep_routing=True, entropy_coef=0.01),  # resampling rounds, V3.2 record
])
def test_grpo_resumes_exactly(monkeypatch, tmp_path, changes):
    varied_rewards(monkeypatch)
    cfg, p0 = tiny_policy()
    gcfg = GRPOConfig(**{**dict(num_generations=4, prompts_per_step=2, max_completion_length=6, steps=4, eval_n=4,
                                lr=1e-2, mask_truncated_completions=False), **changes})
    full = grpo_train(p0, cfg, TASK, gcfg, progress=False, eval_every=1)
    ck = tmp_path / "grpo.npz"
    half = grpo_train(p0, cfg, TASK, gcfg, progress=False, eval_every=1, stop_at=2, checkpoint_path=ck)
    assert half["state"].step == 2 and [e["step"] for e in half["evals"]] == [0, 1, 2]
    state, cfg2 = load_checkpoint(ck)
    assert cfg2 == cfg and ("ref_params" in state.frozen) == (gcfg.beta != 0)
    if gcfg.beta:
        assert _same(state.frozen["ref_params"], p0)                   # π_ref: the initial policy
    resumed = grpo_train(p0, cfg, TASK, gcfg, progress=False, eval_every=1, resume=ck)
    _check(full, resumed, half, 4)
    assert resumed["evals"] == full["evals"] and [e["step"] for e in full["evals"]] == [0, 1, 2, 3, 4]
    lr = [warmup_cosine_lr(s, lr=gcfg.lr, warmup_steps=gcfg.warmup_steps, total_steps=4, min_lr=gcfg.lr)
          for s in range(4)]
    assert full["history"]["lr"] == lr                                  # the one schedule (constant after warmup)
    with pytest.raises(ValueError, match="resume"):
        grpo_train(p0, cfg.replace(max_position_embeddings=32), TASK, gcfg, progress=False, resume=ck)


def test_grpo_resume_from_a_mid_run_checkpoint_after_a_crash(monkeypatch, tmp_path):
    """checkpoint_every=1 and a run killed after step 3: resuming from the step-3 file finishes the run
    exactly as the uninterrupted one (the file is written after the step's evaluation)."""
    varied_rewards(monkeypatch)
    cfg, p0 = tiny_policy()
    gcfg = GRPOConfig(num_generations=2, prompts_per_step=2, max_completion_length=5, steps=4, eval_n=2, lr=1e-2,
                      mask_truncated_completions=False)
    full = grpo_train(p0, cfg, TASK, gcfg, progress=False, eval_every=2)

    def crash(step, row, params):
        if step == 4:
            raise KeyboardInterrupt
    ck = tmp_path / "every.npz"
    with pytest.raises(KeyboardInterrupt):
        grpo_train(p0, cfg, TASK, gcfg, progress=False, eval_every=2, checkpoint_path=ck, checkpoint_every=1,
                   callback=crash)
    assert load_checkpoint(ck)[0].step == 3
    resumed = grpo_train(p0, cfg, TASK, gcfg, progress=False, eval_every=2, resume=load_checkpoint(ck)[0])
    assert resumed["history"] == full["history"] and resumed["evals"] == full["evals"]
    assert _same(resumed["params"], full["params"])


def test_grpo_resume_needs_pi_ref_when_beta_is_set(tmp_path):
    cfg, p0 = tiny_policy()
    gcfg = GRPOConfig(num_generations=2, prompts_per_step=1, max_completion_length=4, steps=2, eval_n=2)
    ck = tmp_path / "b0.npz"
    grpo_train(p0, cfg, TASK, gcfg, progress=False, stop_at=1, checkpoint_path=ck)
    with pytest.raises(ValueError, match="ref_params"):
        grpo_train(p0, cfg, TASK, gcfg.replace(beta=0.1), progress=False, resume=ck)
    out = grpo_train(p0, cfg, TASK, gcfg.replace(beta=0.1), progress=False, resume=ck, ref_params=p0)
    assert out["state"].step == 2 and _same(out["state"].frozen["ref_params"], p0)


def test_pretraining_resumes_exactly(tmp_path):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=13, max_position_embeddings=16)
    params = init_params(cfg, np.random.default_rng(0))

    def batch(rng, step):
        start = rng.integers(0, cfg.vocab_size, (4, 1))
        return (start + np.arange(8)) % cfg.vocab_size, None
    tc = TrainConfig(steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=2, bias_update_speed=0.01)
    full = train(init_state(params, seed=7), cfg, batch, tc, progress=False)
    half = train(init_state(params, seed=7), cfg, batch, tc, progress=False, stop_at=3, checkpoint_path=tmp_path / "p")
    state, _ = load_checkpoint(tmp_path / "p")
    resumed = train(state, cfg, batch, tc, progress=False)
    _check({"history": full.history, "params": full.params},
           {"history": resumed.history, "params": resumed.params, "seconds": resumed.history["seconds"]},
           {"params": half.params}, 6)


def teacher_student():
    sc, tc = student_config(), teacher_config()
    return init_params(sc, np.random.default_rng(1)), sc, init_params(tc, np.random.default_rng(0)), tc


def test_gkd_resumes_exactly(tmp_path):
    sp, sc, tp, tc = teacher_student()
    cfg = GKDConfig(lmbda=0.5, seq_kd=True, steps=6, batch_size=3, max_new_tokens=5, seed=2, warmup_steps=1)
    full = gkd_train(sp, sc, tp, tc, TASK, cfg, n_data=16, progress=False)
    assert {"student", "teacher"} <= set(full["history"]["source"])   # both arms of the coin are resumed
    half = gkd_train(sp, sc, tp, tc, TASK, cfg, n_data=16, progress=False, stop_at=3,
                     checkpoint_path=tmp_path / "g.npz")
    resumed = gkd_train(sp, sc, tp, tc, TASK, cfg, n_data=16, progress=False, resume=tmp_path / "g.npz")
    _check(full, resumed, half, 6)


@pytest.mark.parametrize("method", ["sft", "sequence_kd"])
def test_sft_and_sequence_kd_resume_exactly(tmp_path, method):
    sp, sc, _, _ = teacher_student()
    data = default_data(TASK, 12)
    run = (lambda **k: sft_train(sp, sc, data, steps=6, batch_size=3, lr=3e-3, warmup_steps=1, seed=4,
                                 progress=False, **k)) if method == "sft" else \
          (lambda **k: sequence_kd_train(sp, sc, data, steps=6, batch_size=3, seed=4, progress=False, **k))
    full = run()
    half = run(stop_at=3, checkpoint_path=tmp_path / "s.npz")
    resumed = run(resume=tmp_path / "s.npz")
    _check(full, resumed, half, 6)
    assert resumed["tokens"] == full["tokens"] > half["tokens"] > 0   # the token count rides in the state
