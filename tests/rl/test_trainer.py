"""The GRPO trainer (refimpl.rl.trainer): gradients through the model, π_old reuse, dynamic sampling,
determinism, evaluation, SFT and rejection-sampling plumbing, bad input."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.model import init_params, model_forward, sft_rows
from refimpl.rl import rollout, trainer
from refimpl.rl.trainer import (
    GRPOConfig,
    RolloutBatch,
    completion_logps,
    evaluate,
    grpo_objective,
    grpo_train,
    rejection_sample,
    sft_train,
)
from refimpl.tasks import TOKENIZER, AdditionTask, eval_set
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

TASK = AdditionTask(1, 2)
EOS = TOKENIZER.eos_id


def tiny_config(**changes):
    """The 'tiny' preset (MLA + MoE, 2 layers) with the char tokenizer's vocabulary."""
    return ModelConfig.preset("tiny").replace(vocab_size=TOKENIZER.vocab_size, max_position_embeddings=64, **changes)


def small_gc(**changes):
    # an untrained policy rarely emits <eos>: keep truncated completions in the loss
    base = dict(num_generations=4, prompts_per_step=2, max_completion_length=6, steps=2, eval_n=4, lr=1e-2,
                mask_truncated_completions=False)
    return GRPOConfig(**{**base, **changes})


def random_batch(rng, gc, B=4):
    """Prompts of the task and random completions (some ending in <eos>, some cut at the limit)."""
    prompts = [TOKENIZER.encode(TASK.sample(rng).prompt, add_bos=True) for _ in range(B)]
    comps = []
    for i in range(B):
        n = int(rng.integers(1, gc.max_completion_length + 1))
        c = rng.integers(3, TOKENIZER.vocab_size, n)
        if i % 2 == 0:
            c[-1] = EOS
        comps.append(c.astype(np.int64))
    return RolloutBatch(prompts, comps, gc)


def text_rewards(monkeypatch):
    """Replace the rule rewards by one that varies within groups for an untrained policy: 1 if the
    completion's first character is a digit or a letter before 'n', else 0 (format reward 0)."""
    def score(task, texts, answers, lengths, gc):
        acc = np.array([1.0 if t[:1] and (t[0].isdigit() or "a" <= t[0] < "n") else 0.0 for t in texts])
        fmt = np.zeros(len(texts))
        return acc, fmt, acc * gc.reward_weights[0]
    monkeypatch.setattr(rollout, "score_completions", score)


# ----------------------------------------------------------------------------------------------
# Gradient of the objective through logits -> model
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,level,beta", [("dapo", "token", 0.04), ("grpo", "sequence", 0.0),
                                                  ("dr_grpo", "token", 0.1)])
def test_objective_gradient_matches_finite_differences(loss_type, level, beta):
    """d J / d params of grpo_objective (hand-written: loss -> logits -> model_backward) against central
    differences of the scalar objective in float64, with π_old != π (ratios away from the clip bounds)."""
    rng = np.random.default_rng(0)
    cfg = tiny_config()
    params = init_params(cfg, rng, np.float64)
    gc = small_gc(loss_type=loss_type, importance_sampling_level=level, beta=beta, temperature=0.8,
                  entropy_coef=0.01)
    batch = random_batch(rng, gc)
    adv = rng.standard_normal(4)                                        # (B,)
    cur = completion_logps(params, cfg, batch, gc.temperature)          # (B, Tc)
    old = cur + rng.uniform(-0.05, 0.05, cur.shape)                     # ratios within [0.95, 1.05]
    ref = cur + rng.uniform(-0.3, 0.3, cur.shape)

    def f(p):
        loss, grads, _ = grpo_objective(p, cfg, batch, adv, old, ref, gc)
        return loss, lambda d: ({k: _scale(v, float(d)) for k, v in grads.items()},)
    assert check_grad(f, [params], max_entries=3, seed=1) < tol("gradcheck")["rtol"]


def _scale(tree, d):
    if isinstance(tree, dict):
        return {k: _scale(v, d) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_scale(v, d) for v in tree]
    return tree * d


def test_objective_gradient_is_zero_for_masked_rows_and_flat_groups():
    """All-equal advantages (a flat group) and β = 0: no gradient; a fully masked (truncated) batch too."""
    rng = np.random.default_rng(1)
    cfg = tiny_config()
    params = init_params(cfg, rng, np.float64)
    gc = small_gc()
    batch = random_batch(rng, gc)
    _, grads, _ = grpo_objective(params, cfg, batch, np.zeros(4), None, None, gc)
    assert all(np.all(g == 0) for g in _leaves(grads))
    _, grads, _ = grpo_objective(params, cfg, batch, rng.standard_normal(4), None, None, gc)
    assert any(np.any(g != 0) for g in _leaves(grads))


@pytest.mark.parametrize("backend", [None, "numpy", "numba"])
def test_objective_passes_its_backend_to_the_loss_unresolved(monkeypatch, backend):
    """GRPOConfig.backend reaches the loss's log-prob pass as given: None keeps that pass on the
    reference (refimpl.backend, "Sites whose default is the reference"), an explicit choice is honoured."""
    seen = []
    real = trainer.grpo_loss_from_logits

    def spy(*args, **kw):
        seen.append(kw["backend"])
        return real(*args, **kw)
    monkeypatch.setattr(trainer, "grpo_loss_from_logits", spy)
    rng = np.random.default_rng(1)
    cfg = tiny_config()
    params = init_params(cfg, rng, np.float64)
    gc = small_gc(backend=backend)
    grpo_objective(params, cfg, random_batch(rng, gc), rng.standard_normal(4), None, None, gc)
    assert seen == [backend]


def _leaves(tree):
    from refimpl.tree import tree_flatten
    return tree_flatten(tree)[0]


def test_rollout_batch_layout():
    """Position p_i + t - 1 predicts completion token t; truncated rows are masked when asked."""
    rng = np.random.default_rng(2)
    gc = small_gc()
    batch = random_batch(rng, small_gc(mask_truncated_completions=True), B=6)
    for i in range(6):
        lp, lc = batch.lp[i], batch.lc[i]
        np.testing.assert_array_equal(batch.ids[i, batch.pos[i, :lc] + 1], batch.comp[i, :lc])
        assert batch.pos[i, 0] == lp - 1
    cut = np.array([batch.comp[i, batch.lc[i] - 1] != EOS and batch.lc[i] == gc.max_completion_length
                    for i in range(6)])
    np.testing.assert_array_equal(batch.truncated, cut)
    assert not batch.mask[cut].any()
    keep = RolloutBatch([r[:lp] for r, lp in zip(batch.ids, batch.lp, strict=True)],
                        [c[:n] for c, n in zip(batch.comp, batch.lc, strict=True)],
                        small_gc(mask_truncated_completions=False))
    np.testing.assert_array_equal(keep.mask.sum(1), batch.lc)
    # gather/scatter are adjoint: <gather(x), y> = <x, scatter(y)>
    x = rng.standard_normal((*batch.ids.shape, 3))
    y = rng.standard_normal((*batch.comp.shape, 3))
    assert np.isclose(np.sum(batch.gather(x) * y), np.sum(x * batch.scatter(y, x.shape)))


@given(rng=rst.seeds(), B=st.integers(1, 5), L=st.integers(1, 6), masked=st.booleans())
def test_rollout_batch_gather_scatter_are_adjoint(rng, B, L, masked):
    """For any prompt and completion lengths: every real completion token t of row i is predicted by
    position p_i + t - 1 (which holds token t - 1), no two real tokens share a position, and
    <gather(x), y> = <x, scatter(y)> (the trainer's backward through the layout)."""
    gc = small_gc(max_completion_length=L, mask_truncated_completions=masked)
    V = TOKENIZER.vocab_size
    prompts = [np.r_[TOKENIZER.bos_id, rng.integers(3, V, int(rng.integers(0, 4)))] for _ in range(B)]
    comps = [rng.integers(3, V, int(rng.integers(1, L + 1))) for _ in range(B)]
    for c in comps[::2]:
        c[-1] = EOS                                                     # ended rows are never masked
    batch = RolloutBatch(prompts, comps, gc)
    for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        pos = batch.pos[i, :len(c)]
        np.testing.assert_array_equal(pos, len(p) - 1 + np.arange(len(c)))
        np.testing.assert_array_equal(batch.ids[i, pos + 1], c)
        cut = masked and len(c) == L and c[-1] != EOS
        assert len(set(pos)) == len(c) and batch.mask[i].sum() == (0 if cut else len(c))
    x = rng.standard_normal((*batch.ids.shape, 2))
    y = rng.standard_normal((*batch.comp.shape, 2)) * batch.mask[..., None]
    assert np.isclose(np.sum(batch.gather(x) * y), np.sum(x * batch.scatter(y, x.shape)))


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

def test_same_seed_same_history_and_params(monkeypatch):
    text_rewards(monkeypatch)
    cfg = tiny_config()
    p0 = init_params(cfg, np.random.default_rng(3), np.float32)
    gc = small_gc(beta=0.01, entropy_coef=0.01)
    a = grpo_train(p0, cfg, TASK, gc, progress=False, eval_every=1)
    b = grpo_train(p0, cfg, TASK, gc, progress=False, eval_every=1)
    c = grpo_train(p0, cfg, TASK, gc.replace(seed=1), progress=False, eval_every=1)
    assert a["history"] == b["history"] and a["evals"] == b["evals"]
    for x, y in zip(_leaves(a["params"]), _leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a["history"] != c["history"]
    assert any(np.any(x != y) for x, y in zip(_leaves(a["params"]), _leaves(p0), strict=True))
    h = a["history"][-1]
    for key in ("reward", "accuracy", "format", "completion_length", "kl", "clip_ratio/region_mean",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "frac_reward_zero_std", "grad_norm",
                "eval_accuracy", "eval_format"):
        assert key in h and np.isfinite(h[key]), key
    assert [e["step"] for e in a["evals"]] == [0, 1, 2]
    assert len(a["seconds"]) == 2


def test_num_iterations_reuses_pi_old(monkeypatch):
    """μ > 1: the first update is on-policy (ratio exactly 1), later ones see ratios != 1 against
    the fixed sampling policy, and with a large step some tokens leave the trust region (clipped)."""
    text_rewards(monkeypatch)
    cfg = tiny_config()
    p0 = init_params(cfg, np.random.default_rng(4), np.float32)
    res = grpo_train(p0, cfg, TASK, small_gc(steps=1, num_iterations=4, lr=0.05, max_grad_norm=100.0),
                     progress=False, eval_every=0)
    its = res["history"][0]["iterations"]
    assert len(its) == 4
    assert its[0]["ratio_mean"] == 1.0 and its[0]["clip_ratio/region_mean"] == 0.0
    assert all(it["ratio_mean"] != 1.0 for it in its[1:])
    assert max(it["clip_ratio/region_mean"] for it in its[1:]) > 0
    one = grpo_train(p0, cfg, TASK, small_gc(steps=1), progress=False, eval_every=0)
    assert [it["ratio_mean"] for it in one["history"][0]["iterations"]] == [1.0]


def test_dynamic_sampling_drops_flat_groups(monkeypatch):
    """DAPO dynamic sampling: only groups with reward spread reach the loss, refilled from new prompts."""
    text_rewards(monkeypatch)
    seen = []
    real = trainer.group_advantages

    def spy(rewards, G, **kw):
        seen.append(np.asarray(rewards).reshape(-1, G))
        return real(rewards, G, **kw)
    monkeypatch.setattr(trainer, "group_advantages", spy)
    cfg = tiny_config()
    p0 = init_params(cfg, np.random.default_rng(5), np.float32)
    gc = small_gc(steps=4, prompts_per_step=3, num_generations=2, max_resample_rounds=8)
    res = grpo_train(p0, cfg, TASK, gc.replace(dynamic_sampling=True), progress=False, eval_every=0)
    assert seen and all((r.max(1) > r.min(1)).all() for r in seen)
    hist = res["history"]
    assert any(h["frac_reward_zero_std"] > 0 for h in hist)              # there was something to drop
    assert any(h["generation_rounds"] > 1 for h in hist)                 # ... and it was refilled
    assert all(h["num_groups"] == 3 for h in hist)
    seen.clear()
    grpo_train(p0, cfg, TASK, gc, progress=False, eval_every=0)         # without: flat groups are kept
    assert any((r.max(1) == r.min(1)).any() for r in seen)


def test_rl_leaves_mtp_and_router_bias_untouched(monkeypatch):
    """As the trainer's docstring says: with weight decay on, RL updates the trunk's matrices but
    neither the MTP modules (no RL gradient, and no decay) nor the router's correction bias."""
    from refimpl.tree import tree_paths
    text_rewards(monkeypatch)
    cfg = tiny_config(num_nextn_predict_layers=1)
    p0 = init_params(cfg, np.random.default_rng(11), np.float32)
    res = grpo_train(p0, cfg, TASK, small_gc(steps=1, weight_decay=0.1), progress=False, eval_every=0)
    changed = {k for k, x, y in zip(tree_paths(p0), _leaves(p0), _leaves(res["params"]), strict=True)
               if not np.array_equal(x, y)}
    fixed = [k for k in tree_paths(p0) if k.startswith("mtp.") or k.endswith("e_score_correction_bias")]
    assert any(k.startswith("mtp.") for k in fixed) and any(k.endswith("bias") for k in fixed)
    assert not changed & set(fixed)
    assert "lm_head" in changed and any(k.startswith("model.layers.") for k in changed)


def test_callback_can_stop_the_run():
    cfg = tiny_config()
    p0 = init_params(cfg, np.random.default_rng(6), np.float32)
    calls = []
    res = grpo_train(p0, cfg, TASK, small_gc(steps=5), progress=False, eval_every=0,
                     callback=lambda step, m, p: calls.append(step) or step == 2)
    assert calls == [1, 2] and len(res["history"]) == 2 and res["evals"][-1]["step"] == 2


# ----------------------------------------------------------------------------------------------
# Evaluation, SFT, rejection sampling
# ----------------------------------------------------------------------------------------------

def test_evaluate_is_greedy_and_consistent(monkeypatch):
    """evaluate decodes greedily (each token the argmax of a full, uncached forward pass), and its
    metrics are exactly the means over the completions it sampled."""
    cfg = tiny_config()
    p = init_params(cfg, np.random.default_rng(25), np.float32)      # a seed whose completions stop early
    sampled = []
    real = rollout.sample_completions

    def spy(*args):
        ids, comps = real(*args)
        sampled.append(comps)
        return ids, comps
    monkeypatch.setattr(rollout, "sample_completions", spy)
    a = evaluate(p, cfg, TASK, n=6, max_new_tokens=5)
    b = evaluate(p, cfg, TASK, n=6, max_new_tokens=5)
    assert a == b
    assert [s["prompt"] for s in a["samples"]] == [e.prompt for e in eval_set(TASK)[:6]]
    assert a["accuracy"] == np.mean([s["correct"] for s in a["samples"]])
    assert a["format"] == np.mean([s["formatted"] for s in a["samples"]])
    comps = sampled[0]
    assert any(c[-1] == EOS for c in comps) and any(len(c) == 5 for c in comps)   # both stop reasons occur
    assert a["mean_length"] == np.mean([len(c) for c in comps])            # <eos> counted
    for s, c in zip(a["samples"], comps, strict=True):
        row = list(TOKENIZER.encode(s["prompt"], add_bos=True))
        for _ in range(5):                                              # greedy, no KV cache
            row.append(int(np.argmax(model_forward(np.array([row]), p, cfg)[0][0, -1])))
            if row[-1] == EOS:
                break
        np.testing.assert_array_equal(c, row[len(row) - len(c):])
        assert len(row) - len(c) == len(TOKENIZER.encode(s["prompt"], add_bos=True))
        assert s["completion"] == rollout.completion_text(c)


def test_sft_learns_completions_only():
    """SFT on (prompt, completion) pairs: the loss covers completion tokens only, and it goes down."""
    rows, targets = sft_rows([("12+3=", "<answer>15</answer>"), "7+1=8"])
    assert targets[0].tolist() == [False] * 6 + [True] * 5        # <answer> 1 5 </answer> <eos>
    assert targets[1].all() and rows[1][0] == TOKENIZER.bos_id and rows[1][-1] == EOS
    cfg = tiny_config()
    p = init_params(cfg, np.random.default_rng(8), np.float32)
    data = [("12+3=", "<answer>15</answer>"), ("4+4=", "<answer>8</answer>")]
    res = sft_train(p, cfg, data, steps=30, batch_size=4, lr=1e-2, progress=False)
    assert res["history"]["lm_loss"][-1] < 0.5 * res["history"]["lm_loss"][0]


def test_rejection_sampling_keeps_correct_formatted_distinct(monkeypatch):
    def fake(params, config, prompts, G, *args):
        comps = []
        for p in prompts:
            right = TASK.solve(p)
            pool = [f"<think>x</think><answer>{right}</answer>", f"<think>x</think><answer>{right}</answer>",
                    f"<answer>{right}</answer>", f"<think>y</think><answer>{int(right) + 1}</answer>"]
            comps += [np.append(TOKENIZER.encode(pool[j % 4]), EOS) for j in range(G)]
        return None, comps
    monkeypatch.setattr(rollout, "sample_completions", fake)
    cfg = tiny_config()
    p = init_params(cfg, np.random.default_rng(9), np.float32)
    kept = rejection_sample(p, cfg, TASK, 5, 4)
    assert len(kept) == 5                                               # one distinct good one per prompt
    held = {e.prompt for e in eval_set(TASK)}
    for prompt, comp in kept:
        assert comp == f"<think>x</think><answer>{TASK.solve(prompt)}</answer>" and prompt not in held


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,name", [
    (dict(num_generations=1), "num_generations"), (dict(loss_type="ppo"), "loss_type"),
    (dict(scale_rewards="std"), "scale_rewards"), (dict(reward_weights=(1.0,)), "reward_weights"),
    (dict(top_p=0.0), "top_p"), (dict(temperature=0.0), "temperature"), (dict(num_iterations=0), "num_iterations"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"), (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(soft_punish_cache=100), "soft_punish_cache"), (dict(epsilon=-0.1), "epsilon"),
    (dict(backend="cuda"), "backend"), (dict(prompts_per_step=0), "prompts_per_step"), (dict(delta=0.0), "delta"),
])
def test_bad_config(changes, name):
    with pytest.raises(ValueError, match=name):
        GRPOConfig(**changes)
    with pytest.raises(ValueError, match="changes"):
        GRPOConfig().replace(bogus=1)


def test_bad_arguments():
    cfg = tiny_config()
    p = init_params(cfg, np.random.default_rng(10), np.float32)
    with pytest.raises(TypeError, match="cfg"):
        grpo_train(p, cfg, TASK, dataclasses.asdict(small_gc()), progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        grpo_train(p, cfg.replace(vocab_size=10), TASK, small_gc(), progress=False)
    with pytest.raises(TypeError, match="task"):
        grpo_train(p, cfg, "addition", small_gc(), progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        grpo_train(p, cfg, TASK, small_gc(), progress=False, eval_every=-1)
    with pytest.raises(ValueError, match="n"):
        evaluate(p, cfg, TASK, n=0)
    with pytest.raises(ValueError, match="data"):
        sft_train(p, cfg, [], progress=False)
    with pytest.raises(TypeError, match="data"):
        sft_train(p, cfg, [("a", 1)], progress=False)
    with pytest.raises(ValueError, match="n_prompts"):
        rejection_sample(p, cfg, TASK, 0, 4)
    with pytest.raises(ValueError, match="completions"):
        RolloutBatch([np.array([1, 5])], [], small_gc())
    assert model_forward(np.array([[1, 2]]), p, cfg)[0].shape == (1, 2, cfg.vocab_size)
