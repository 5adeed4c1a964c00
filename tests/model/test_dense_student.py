"""The dense student: refimpl.model with standard (MHA/GQA) attention and a dense FFN in every layer.

Finite-difference gradients of the whole model, cached decoding == full forward, and an oracle test
against transformers' LlamaForCausalLM / Qwen2ForCausalLM built from a tiny random config. refimpl's
RoPE rotates adjacent channel pairs (2i, 2i+1); Llama and Qwen2 rotate halves (i, i + Dh/2) with the
same frequency i, so an HF checkpoint loads by taking each head's q_proj/k_proj rows in the order
``interleave`` below (the inverse of :func:`refimpl.core.deinterleave_perm`); scores are unchanged.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import core
from refimpl.attention import KVCache, kv_cache_elements_per_token, uses_mla
from refimpl.config import ModelConfig
from refimpl.model import (
    init_caches,
    init_params,
    loss_backward,
    loss_forward,
    model_backward,
    model_forward,
    model_infer,
    to_hub,
)
from refimpl.model.generate import generate
from refimpl.model.hub_dense import rope_rows
from refimpl.recipes.distill import dense_student_config
from refimpl.testing import check_grad, tol
from refimpl.tree import tree_flatten

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1}


def student(hk=2, h=4, dh=4, d=8, layers=2, yarn=False, **kw):
    return dense_student_config(vocab_size=11, hidden_size=d, intermediate_size=12, num_hidden_layers=layers,
                                num_attention_heads=h, num_key_value_heads=hk, head_dim=dh, max_position_embeddings=32,
                                initializer_range=0.4, rope_scaling=YARN if yarn else None, **kw)


def _loss_fn(ids, cfg, labels=None):
    def f(p):
        loss, cache, _ = loss_forward(ids, p, cfg, labels, backend="numpy")
        return loss, lambda d: (loss_backward(float(d), cache, p),)
    return f


def test_config_is_dense_standard_attention():
    cfg = student()
    p = init_params(cfg, np.random.default_rng(0))
    assert not uses_mla(cfg) and not any(cfg.is_moe_layer(n) for n in range(cfg.num_hidden_layers))
    assert sorted(p["model"]["layers"][0]["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert set(p["model"]["layers"][1]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert p["model"]["layers"][0]["self_attn"]["k_proj"].shape == (2 * 4, 8)           # (Hk*Dh, D)
    caches = init_caches(cfg, 3, 10)
    assert all(isinstance(c, KVCache) and c.k.shape == (3, 2, 10, 4) for c in caches)
    assert kv_cache_elements_per_token(cfg) == 2 * 2 * 4 * 2                             # 2 Hk Dh per layer
    biased = init_params(student(attention_bias=True), np.random.default_rng(0))["model"]["layers"][0]["self_attn"]
    assert sorted(biased) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "q_proj_bias", "k_proj_bias",
                                     "v_proj_bias", "o_proj_bias"])                  # Llama attention_bias
    qwen = init_params(student(model_type="qwen2"), np.random.default_rng(0))["model"]["layers"][0]["self_attn"]
    assert sorted(k for k in qwen if k.endswith("_bias")) == ["k_proj_bias", "q_proj_bias", "v_proj_bias"]
    with pytest.raises(ValueError, match="model_type"):
        dense_student_config(model_type="deepseek_v3")


def test_decoding_with_the_other_kind_of_cache_is_a_type_error():
    """The attention is chosen by the config (as in training), so a cache of the other kind is named."""
    ids = np.zeros((1, 3), np.int64)
    dense, mla = student(), ModelConfig.preset("tiny")
    with pytest.raises(TypeError, match="cache: expected a KVCache"):
        model_infer(ids, init_params(dense, np.random.default_rng(0)), dense, init_caches(mla, 1, 4), 0)
    with pytest.raises(TypeError, match="cache: expected a LatentKVCache"):
        model_infer(ids, init_params(mla, np.random.default_rng(0)), mla,
                    init_caches(dense, 1, 4, n_layers=mla.num_hidden_layers), 0)


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31), hk=st.sampled_from([1, 2, 4]), yarn=st.booleans(), t=st.integers(2, 6),
       masked=st.booleans())
def test_gradcheck_whole_dense_model(seed, hk, yarn, t, masked):
    """Every parameter of a 2-layer MHA/GQA/MQA dense model through the next-token loss, float64."""
    cfg = student(hk=hk, yarn=yarn)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng)
    for lp in params["model"]["layers"]:                      # non-unit gains: their gradients matter
        lp["input_layernorm"] = 1 + 0.3 * rng.standard_normal(cfg.hidden_size)
    ids = rng.integers(0, cfg.vocab_size, (2, t))
    labels = np.where(rng.random(ids.shape) < 0.3, -100, ids) if masked else None
    err = check_grad(_loss_fn(ids, cfg, labels), [params], max_entries=3, seed=seed % 1000)
    assert err < tol("gradcheck")["rtol"]


def test_gradient_of_logits_by_finite_differences():
    """model_backward with a random upstream gradient on all logits (not only through the loss)."""
    cfg = student(hk=1)
    rng = np.random.default_rng(3)
    params = init_params(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 5))

    def f(p):
        logits, cache, _ = model_forward(ids, p, cfg)
        return logits, lambda d: (model_backward(d, cache),)
    assert check_grad(f, [params], max_entries=4, seed=3) < tol("gradcheck")["rtol"]


@pytest.mark.parametrize("hk", [1, 2, 4])
def test_cached_prefill_and_decode_equal_full_forward(hk):
    cfg = student(hk=hk, yarn=True)
    rng = np.random.default_rng(hk)
    params = init_params(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    full = model_forward(ids, params, cfg)[0]                                 # (B, T, V)
    caches = init_caches(cfg, 2, 9)
    pre, _ = model_infer(ids[:, :4], params, cfg, caches, 0)
    mid, _ = model_infer(ids[:, 4:6], params, cfg, caches, 4)                 # a chunked prefill
    steps = [model_infer(ids[:, t:t + 1], params, cfg, caches, t)[0] for t in range(6, 9)]
    np.testing.assert_allclose(np.concatenate([pre, mid, *steps], axis=1), full, **tol("equiv64"))


def test_cached_generation_equals_recomputing_each_step():
    cfg = student()
    rng = np.random.default_rng(5)
    params = init_params(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (3, 4))
    np.testing.assert_array_equal(generate(params, cfg, ids, 8), generate(params, cfg, ids, 8, use_cache=False))
    sampled = [generate(params, cfg, ids, 8, temperature=1.2, top_p=0.9, rng=np.random.default_rng(7),
                        use_cache=c) for c in (True, False)]
    np.testing.assert_array_equal(*sampled)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (3, 5, 3)]
    for p, o in zip(prompts, generate(params, cfg, prompts, 5), strict=True):
        np.testing.assert_array_equal(o, generate(params, cfg, p[None], 5)[0])


def test_float32_model_and_cache():
    cfg = student()
    params = init_params(cfg, np.random.default_rng(0))
    p32 = tree_flatten(params)[1]([a.astype(np.float32) for a in tree_flatten(params)[0]])
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 6))
    logits = model_forward(ids, p32, cfg)[0]
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, model_forward(ids, params, cfg)[0], rtol=1e-4, atol=1e-5)
    caches = init_caches(cfg, 2, 6, np.float32)
    np.testing.assert_allclose(model_infer(ids, p32, cfg, caches, 0)[0], logits, **tol("equiv32"))


# ----------------------------------------------------------------------------------------------
# oracle: transformers' Llama / Qwen2 with refimpl's weights
# ----------------------------------------------------------------------------------------------

def interleave(dh):
    """Row order taking a rotate-half head (HF Llama/Qwen2) to refimpl's adjacent-pair layout:
    ``refimpl_rows = hf_rows[interleave(dh)]`` = [0, Dh/2, 1, Dh/2 + 1, ...]."""
    return np.argsort(core.deinterleave_perm(dh))


def hf_state_dict(params, cfg, torch, permute=True):
    """refimpl parameters as an HF Llama/Qwen2 state dict (:func:`refimpl.model.to_hub`: q/k rows and
    biases de-interleaved per head); ``permute=False`` keeps refimpl's row order (a wrong load)."""
    hub = to_hub(params, cfg)
    if not permute:
        hub = {k: rope_rows(v, k, cfg) for k, v in hub.items()}
    return {k: torch.tensor(v) for k, v in hub.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_and_gradients_match_transformers(arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = student(hk=2, h=4, dh=4, d=16, layers=2, model_type=arch)
    rng = np.random.default_rng(11)
    params = init_params(cfg, rng)
    for lp in params["model"]["layers"]:
        lp["post_attention_layernorm"] = 1 + 0.3 * rng.standard_normal(cfg.hidden_size)
        for k in [k for k in lp["self_attn"] if k.endswith("_bias")]:     # Qwen2's q/k/v biases, non-zero
            lp["self_attn"][k] = 0.3 * rng.standard_normal(lp["self_attn"][k].shape)
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=4, max_position_embeddings=32,
              rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              tie_word_embeddings=False, attn_implementation="sdpa")
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf, attention_bias=False))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf))
    model = model.to(torch.float64)
    sd = hf_state_dict(params, cfg, torch)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    ids = rng.integers(0, cfg.vocab_size, (2, 7))
    logits, cache, _ = model_forward(ids, params, cfg)
    dlogits = rng.standard_normal(logits.shape)
    grads = model_backward(dlogits, cache)
    hf_logits = model(torch.tensor(ids)).logits
    hf_logits.backward(torch.tensor(dlogits))
    loose = tol("transformers64")            # transformers' RoPE tables and RMSNorm run in float32
    np.testing.assert_allclose(logits, hf_logits.detach().numpy(), **loose)
    hf_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert (arch == "qwen2") == any(n.endswith(".bias") for n in hf_grads)
    ours = {k: v.numpy() for k, v in hf_state_dict(grads, cfg, torch).items()}
    assert set(ours) == set(hf_grads)
    scale = max(np.abs(g).max() for g in hf_grads.values())
    for name, g in hf_grads.items():
        np.testing.assert_allclose(ours[name], g, rtol=loose["rtol"], atol=loose["atol"] * scale, err_msg=name)
    # the rotate-half layout is not refimpl's: loading the rows unpermuted gives different logits
    np.testing.assert_array_equal(interleave(8), [0, 4, 1, 5, 2, 6, 3, 7])
    model.load_state_dict(hf_state_dict(params, cfg, torch, permute=False), strict=False)
    with torch.no_grad():
        assert np.abs(model(torch.tensor(ids)).logits.numpy() - logits).max() > 1e-3
