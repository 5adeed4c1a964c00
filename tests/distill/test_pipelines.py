"""GKD and sequence-level KD pipelines: gradients, where the sequences come from, rejection, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.distill import generalized_jsd_loss, pipelines
from refimpl.distill.pipelines import (
    GKDConfig,
    encode_pairs,
    gkd_loss,
    gkd_train,
    sequence_kd_train,
    teacher_generations,
)
from refimpl.model import init_params, model_forward, shift_labels
from refimpl.rl.trainer import sft_train
from refimpl.tasks import TOKENIZER, AdditionTask, reference_completion
from refimpl.testing import check_grad, tol
from refimpl.tree import tree_flatten

from .helpers import student_config, teacher_config

TASK = AdditionTask(1, 2)
V = TOKENIZER.vocab_size


@pytest.fixture(scope="module")
def models():
    tc, sc = teacher_config(), student_config()
    return (init_params(sc, np.random.default_rng(1)), sc, init_params(tc, np.random.default_rng(0)), tc)


def _batch(rng, n=2):
    pairs = [(f"{a}+{b}=", reference_completion(TASK, TASK.sample(rng))[:6]) for a, b in rng.integers(0, 10, (n, 2))]
    return encode_pairs(pairs)


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31), beta=st.sampled_from([0.0, 0.3, 0.5, 1.0]), temp=st.sampled_from([1.0, 2.0]))
def test_gkd_gradient_by_finite_differences(models, seed, beta, temp):
    """Every student parameter's gradient of the GJSD objective, MoE+MLA teacher, dense student, float64."""
    sp, sc, tp, tc = models
    rng = np.random.default_rng(seed)
    ids, labels = _batch(rng)

    def f(p):
        loss, grads, _ = gkd_loss(p, sc, tp, tc, ids, labels, beta=beta, temperature=temp)
        return loss, lambda d: ({k: tree_flatten(g)[1]([float(d) * a for a in tree_flatten(g)[0]])
                                 for k, g in grads.items()},)
    assert check_grad(f, [sp], max_entries=3, seed=seed % 1000) < tol("gradcheck")["rtol"]


def test_gkd_loss_is_the_jsd_on_completion_tokens(models):
    sp, sc, tp, tc = models
    ids, labels = _batch(np.random.default_rng(0), 3)
    loss, _, info = gkd_loss(sp, sc, tp, tc, ids, labels, beta=0.5)
    s, t = model_forward(ids, sp, sc)[0], model_forward(ids, tp, tc)[0]
    ref, _ = generalized_jsd_loss(s, t, shift_labels(labels), beta=0.5)
    np.testing.assert_allclose(loss, ref, **tol("equiv64"))
    assert info["tokens"] == int((labels != -100).sum())            # every completion token is scored once
    # the teacher distilled into itself: zero loss and zero gradient
    loss0, grads0, _ = gkd_loss(tp, tc, tp, tc, ids, labels, beta=0.5)
    assert abs(float(loss0)) < 1e-14 and max(np.abs(g).max() for g in tree_flatten(grads0)[0]) < 1e-12


def _spy(monkeypatch):
    """Record every generate call (whose config) and every sequence batch the loss sees."""
    calls, seen = [], []
    real_gen, real_loss = pipelines._generate, pipelines.gkd_loss

    def gen(params, config, prompts, cfg, rng):
        calls.append("student" if config.extra.get("model_type") == "llama" else "teacher")
        return real_gen(params, config, prompts, cfg, rng)

    def loss(*args, **kw):
        seen.append(args[4])
        return real_loss(*args, **kw)
    monkeypatch.setattr(pipelines, "_generate", gen)
    monkeypatch.setattr(pipelines, "gkd_loss", loss)
    return calls, seen


@pytest.mark.parametrize(("lmbda", "seq_kd", "expect", "per_step_calls"),
                         [(0.0, False, "dataset", []), (1.0, False, "student", ["student"]),
                          (0.0, True, "teacher", ["teacher"]), (1.0, True, "student", ["teacher", "student"])])
def test_lmbda_and_seq_kd_choose_the_sequences(monkeypatch, models, lmbda, seq_kd, expect, per_step_calls):
    sp, sc, tp, tc = models
    calls, seen = _spy(monkeypatch)
    data = pipelines.default_data(TASK, 20)
    cfg = GKDConfig(lmbda=lmbda, seq_kd=seq_kd, steps=3, batch_size=4, max_new_tokens=6)
    out = gkd_train(sp, sc, tp, tc, TASK, cfg, data=data, progress=False)
    assert [h["source"] for h in out["history"]] == [expect] * 3
    assert calls == per_step_calls * 3
    dataset_rows = {tuple(np.trim_zeros(r, "b")) for r in encode_pairs(data)[0]}     # without the <pad> (id 0)
    from_dataset = [all(tuple(np.trim_zeros(r, "b")) in dataset_rows for r in ids) for ids in seen]
    assert from_dataset == [expect == "dataset"] * 3
    if expect != "dataset":                         # generated rows: at most max_new_tokens after the prompt
        assert all(ids.shape[1] <= len(TOKENIZER.encode("99+99=", add_bos=True)) + 6 for ids in seen)


def test_lmbda_is_the_probability_of_student_sequences(monkeypatch, models):
    sp, sc, tp, tc = models
    monkeypatch.setattr(pipelines, "_generate", lambda params, config, prompts, cfg, rng: list(prompts))
    monkeypatch.setattr(pipelines, "gkd_loss", lambda p, *a, **k: (0.0, {kk: np.zeros_like(v) if isinstance(
        v, np.ndarray) else tree_flatten(v)[1]([np.zeros_like(x) for x in tree_flatten(v)[0]]) for kk, v in p.items()},
        {"tokens": 1}))
    cfg = GKDConfig(lmbda=0.3, steps=400, batch_size=1, seed=4)
    hist = gkd_train(sp, sc, tp, tc, TASK, cfg, data=[("1+1=", "2")], progress=False)["history"]
    frac = np.mean([h["source"] == "student" for h in hist])
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 400)


def test_rejection_drops_wrong_answers(monkeypatch, models):
    sp, sc, tp, tc = models

    def fake_generate(params, config, prompts, n, **kw):        # right answer on even calls' rows, wrong on odd
        outs = []
        for i, p in enumerate(prompts):
            a, b = TOKENIZER.decode(p).rstrip("=").split("+")
            ans = int(a) + int(b) + (i % 2)
            outs.append(np.concatenate([p, TOKENIZER.encode(f"<think>x</think><answer>{ans}</answer>", add_eos=True)]))
        return outs
    monkeypatch.setattr(pipelines, "generate", fake_generate)
    task = AdditionTask(1, 2)
    kept = teacher_generations(tp, tc, task, 10, progress=False, batch_size=4)
    everything = teacher_generations(tp, tc, task, 10, progress=False, batch_size=4, reject=False)
    assert everything["n_generated"] == kept["n_generated"] == 10
    assert len(everything["data"]) == 10 and 0 < len(kept["data"]) < 10
    assert all(s["kept"] == s["accepted"] for s in kept["samples"])
    for prompt, completion in kept["data"]:
        assert completion.endswith(f"<answer>{task.solve(prompt)}</answer>")
    assert kept["acceptance_rate"] == pytest.approx(len(kept["data"]) / 10)
    # a right answer outside the R1 template is rejected unless the format is not required
    assert not pipelines.accept(task, "<answer>12</answer>", "12")
    assert pipelines.accept(task, "<answer>12</answer>", "12", require_format=False)
    assert pipelines.accept(task, "<think>5+7=12</think><answer>12</answer>", "12")
    with pytest.raises(ValueError, match="data"):
        sequence_kd_train(sp, sc, [], steps=1, progress=False)


def test_runs_are_deterministic_by_seed(models):
    sp, sc, tp, tc = models
    cfg = GKDConfig(lmbda=0.5, seq_kd=True, steps=4, batch_size=3, max_new_tokens=5, seed=2)
    a, b = (gkd_train(sp, sc, tp, tc, TASK, cfg, n_data=16, progress=False) for _ in range(2))
    assert a["history"] == b["history"]
    assert all(np.array_equal(x, y) for x, y in zip(tree_flatten(a["params"])[0], tree_flatten(b["params"])[0],
                                                    strict=True))
    c = gkd_train(sp, sc, tp, tc, TASK, GKDConfig(**{**cfg.__dict__, "seed": 3}), n_data=16, progress=False)
    assert c["history"] != a["history"]
    g1, g2 = (teacher_generations(tp, tc, TASK, 6, num_samples=2, temperature=1.0, seed=5, progress=False)
              for _ in range(2))
    assert g1["samples"] == g2["samples"]
    s1, s2 = (sequence_kd_train(sp, sc, g1["data"] or [("1+1=", "2")], steps=3, batch_size=4, progress=False)
              for _ in range(2))
    assert s1["history"] == s2["history"]


def test_sequence_kd_fits_the_teacher_text(models):
    sp, sc, _, _ = models
    data = [("1+2=", "<think>1+2=3</think><answer>3</answer>")]
    out = sequence_kd_train(sp, sc, data, steps=30, batch_size=2, lr=1e-2, progress=False)
    assert out["history"]["loss"][-1] < 0.5 * out["history"]["loss"][0]


def test_gkd_moves_the_student_towards_the_teacher(models):
    """Off-policy GKD on a fixed batch: the JSD to the teacher on that batch falls (the gradient's sign is
    right through the optimiser, not only by finite differences)."""
    sp, sc, tp, tc = models
    data = [("1+2=", "<think>1+2=3</think><answer>3</answer>"), ("4+4=", "<think>4+4=8</think><answer>8</answer>")]
    ids, labels = encode_pairs(data)
    before = float(gkd_loss(sp, sc, tp, tc, ids, labels)[0])
    cfg = GKDConfig(lmbda=0.0, steps=30, batch_size=2, lr=1e-2)
    out = gkd_train(sp, sc, tp, tc, TASK, cfg, data=data, progress=False)
    after = float(gkd_loss(out["params"], sc, tp, tc, ids, labels)[0])
    assert after < 0.5 * before


def test_sequence_kd_is_the_r1_recipes_sft(models):
    """On a dense student, sequence-level KD is exactly R1's SFT stage (refimpl.rl.trainer.sft_train) on the
    teacher's text: same rows, same batches, same optimiser; it only adds the token count for FLOPs."""
    sp, sc, _, _ = models
    data = pipelines.default_data(TASK, 12)
    ours = sequence_kd_train(sp, sc, data, steps=6, batch_size=3, lr=3e-3, seed=4, progress=False)
    ref = sft_train(sp, sc, data, steps=6, batch_size=3, lr=3e-3, warmup_steps=1, seed=4, progress=False)
    assert ours["history"] == ref["history"]
    assert all(np.array_equal(x, y) for x, y in zip(tree_flatten(ours["params"])[0], tree_flatten(ref["params"])[0],
                                                    strict=True))
    lengths = (encode_pairs(data)[0] != TOKENIZER.pad_id).sum(axis=1)
    rng = np.random.default_rng(4)                  # train() draws the batches from default_rng(seed)
    assert ours["tokens"] == sum(int(lengths[rng.integers(0, len(data), 3)].sum()) for _ in range(6))


def test_bad_input(models):
    sp, sc, tp, tc = models
    ids, labels = _batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="vocab_size"):
        gkd_loss(sp, sc, tp, tc.replace(vocab_size=V + 1), ids, labels)
    with pytest.raises(ValueError, match="labels"):
        gkd_loss(sp, sc, tp, tc, ids, labels[0])
    for bad in (dict(lmbda=1.5), dict(beta=-0.1), dict(loss_temperature=0.0), dict(steps=0), dict(top_p=0.0),
                dict(top_p=1.5), dict(lr=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GKDConfig(**bad)
    with pytest.raises(TypeError, match="cfg"):
        gkd_train(sp, sc, tp, tc, TASK, {"lmbda": 0.5})
    with pytest.raises(ValueError, match="num_samples"):
        teacher_generations(tp, tc, TASK, 2, num_samples=2, temperature=0.0, progress=False)
    for bad in (dict(n_prompts=0), dict(batch_size=0), dict(max_new_tokens=0), dict(num_samples=0, temperature=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            teacher_generations(tp, tc, TASK, **{"n_prompts": 2, **bad}, progress=False)
