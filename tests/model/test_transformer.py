"""Decoder + loss: hypothesis gradient checks, autograd (transformers) differential test, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.model import init_params, loss_backward, loss_forward, model_forward
from refimpl.testing import check_grad, tol
from refimpl.tree import tree_flatten, tree_paths

from .conftest import tiny_config


def _loss_fn(ids, cfg, labels=None, **kw):
    def f(p):
        loss, cache, _ = loss_forward(ids, p, cfg, labels, backend="numpy", **kw)
        return loss, lambda d: (loss_backward(float(d), cache, p),)
    return f


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31), q_lora=st.booleans(), method=st.sampled_from(["noaux_tc", "group_limited_greedy"]),
       t=st.integers(3, 6), masked=st.booleans())
def test_gradcheck_dense_moe_mtp(seed, q_lora, method, t, masked):
    """Every parameter's gradient through CE + balance loss + MTP, 2 layers (dense, MoE), float64."""
    cfg = tiny_config(q_lora_rank=4 if q_lora else None, topk_method=method,
                      scoring_func="sigmoid" if method == "noaux_tc" else "softmax",
                      norm_topk_prob=method == "noaux_tc")
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, t))
    labels = np.where(rng.random(ids.shape) < 0.3, -100, ids) if masked else None
    err = check_grad(_loss_fn(ids, cfg, labels), [params], max_entries=3, seed=seed % 1000)
    assert err < tol("gradcheck")["rtol"]


def test_gradient_tree_matches_params(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5))
    loss, cache, info = loss_forward(ids, params, cfg, backend="numpy")
    grads = loss_backward(1.0, cache, params)
    assert tree_paths(grads) == tree_paths(params)
    for g, p in zip(tree_flatten(grads)[0], tree_flatten(params)[0], strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
    assert info["balance_loss"] > 0 and info["mtp_loss"] > 0 and len(info["load"]) == 1
    assert float(loss) == pytest.approx(info["lm_loss"] + info["balance_loss"] + info["mtp_loss"])
    # without MTP the modules get zero gradients, and the loss is the LM + balance loss only
    loss0, cache0, info0 = loss_forward(ids, params, cfg, mtp_lambda=0.0, backend="numpy")
    assert all(not g.any() for g in tree_flatten(loss_backward(1.0, cache0, params)["mtp"])[0])
    assert float(loss0) == pytest.approx(info0["lm_loss"] + info0["balance_loss"])


def test_float32_runs_and_returns_float32(tiny):
    cfg, params = tiny
    p32 = tree_flatten(params)[1]([a.astype(np.float32) for a in tree_flatten(params)[0]])
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 6))
    logits = model_forward(ids, p32, cfg, backend="numpy")[0]
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, model_forward(ids, params, cfg, backend="numpy")[0], rtol=1e-4, atol=1e-5)
    loss, cache, _ = loss_forward(ids, p32, cfg, backend="numpy")
    assert loss.dtype == np.float32
    assert all(g.dtype == np.float32 for g in tree_flatten(loss_backward(1.0, cache, p32))[0])


def test_bad_input_names_the_argument(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="input_ids"):
        model_forward(np.array([[0, cfg.vocab_size]]), params, cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model_forward(np.zeros((1, cfg.max_position_embeddings + 1), dtype=np.int64), params, cfg)
    with pytest.raises(TypeError, match="input_ids"):
        model_forward(np.zeros((1, 3)), params, cfg)
    with pytest.raises(ValueError, match="labels"):
        loss_forward(np.zeros((1, 3), dtype=np.int64), params, cfg, labels=np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="kv_b_proj"):
        bad = {**params, "model": {**params["model"], "layers": [
            {**params["model"]["layers"][0], "self_attn": {**params["model"]["layers"][0]["self_attn"],
                                                           "kv_b_proj": np.zeros((3, 3))}},
            params["model"]["layers"][1]]}}
        model_forward(np.zeros((1, 3), dtype=np.int64), bad, cfg)


def test_evaluation_skips_the_gradient_and_backward_takes_dloss_first(tiny):
    """loss_forward(grad=False) gives the same loss without the (B, T, V) gradient, and then loss_backward
    refuses; loss_backward(dloss, cache) scales every gradient by dloss and names a cache passed first."""
    cfg, params = tiny
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5))
    loss, cache, _ = loss_forward(ids, params, cfg, backend="numpy")
    loss_e, cache_e, _ = loss_forward(ids, params, cfg, backend="numpy", grad=False)
    assert loss_e == loss and cache_e.ce.dlogits is None and cache.ce.dlogits.shape == (2, 5, cfg.vocab_size)
    with pytest.raises(ValueError, match="grad=False"):
        loss_backward(1.0, cache_e, params)
    with pytest.raises(TypeError, match="cache"):
        loss_backward(cache, params)
    g1, g3 = loss_backward(1.0, cache, params), loss_backward(3.0, cache, params)
    for a, b in zip(tree_flatten(g1)[0], tree_flatten(g3)[0], strict=True):
        np.testing.assert_allclose(b, 3.0 * a, rtol=1e-12, atol=1e-300)
