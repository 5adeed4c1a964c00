"""Generation: cached == recomputed, absorbed == naive, ragged batches, sampling, stop tokens, MTP drafts."""

import numpy as np
import pytest

from refimpl.model import init_caches, model_forward, model_infer
from refimpl.model.generate import generate, sample_next, speculative_generate
from refimpl.testing import tol


def test_prefill_and_decode_logits_equal_full_forward(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    full = model_forward(ids, params, cfg, backend="numpy")[0]              # (B, T, V)
    for impl in ("absorb", "naive"):
        caches = init_caches(cfg, 2, 9)
        pre, _ = model_infer(ids[:, :5], params, cfg, caches, 0, impl=impl)
        steps = [model_infer(ids[:, t:t + 1], params, cfg, caches, t, impl=impl)[0] for t in range(5, 9)]
        np.testing.assert_allclose(np.concatenate([pre, *steps], axis=1), full, **tol("equiv64"))


def test_cached_generation_equals_recomputing_each_step(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 4))
    ref = generate(params, cfg, ids, 8, use_cache=False)
    np.testing.assert_array_equal(generate(params, cfg, ids, 8), ref)
    np.testing.assert_array_equal(generate(params, cfg, ids, 8, impl="naive"), ref)
    sampled = [generate(params, cfg, ids, 8, temperature=1.3, top_p=0.9, rng=np.random.default_rng(5),
                        use_cache=c) for c in (True, False)]
    np.testing.assert_array_equal(*sampled)


def test_ragged_batch_equals_each_prompt_alone(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (3, 6, 3, 5)]
    out = generate(params, cfg, prompts, 6)
    for p, o in zip(prompts, out, strict=True):
        np.testing.assert_array_equal(o, generate(params, cfg, p[None], 6)[0])


def test_stop_tokens_end_rows(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (4, 3))
    free = generate(params, cfg, ids, 8)
    stop = int(free[0, 4])                     # the second generated token of row 0
    out = generate(params, cfg, ids, 8, stop_tokens=[stop], pad_id=0)
    for row, ref in zip(out, free, strict=True):
        hits = np.flatnonzero(ref[3:] == stop)
        end = 3 + (hits[0] + 1 if hits.size else 8)
        np.testing.assert_array_equal(row[:end], ref[:end])
        assert (row[end:] == 0).all()
    cut = generate(params, cfg, [ids[0]], 8, stop_tokens=[stop])[0]
    assert cut[-1] == stop and len(cut) <= 3 + 2


def test_sampling_top_p_and_temperature():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = np.array([sample_next(logits, temperature=1.0, top_p=0.7, rng=rng)[0] for _ in range(4000)])
    assert set(draws) == {0, 1}                              # the nucleus of mass >= 0.7 is {0, 1}
    assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.03
    draws = np.array([sample_next(logits, temperature=1.0, rng=rng)[0] for _ in range(4000)])
    assert abs(np.mean(draws == 3) - 0.05) < 0.015
    assert sample_next(logits)[0] == 0
    with pytest.raises(TypeError, match="rng"):
        sample_next(logits, temperature=1.0)


def test_speculative_decoding_equals_greedy(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 5))
    toks, info = speculative_generate(params, cfg, ids, 12)
    np.testing.assert_array_equal(toks, generate(params, cfg, ids, 12))
    assert 0 <= info["accepted"] <= info["drafted"] and info["main_forwards"] < 12 + 1
    assert info["main_forwards"] == 1 + info["drafted"]


def test_generate_rejects_too_long(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, cfg, np.zeros((1, 30), dtype=np.int64), 5)
