"""DeepSeek-V3.2 (model_type deepseek_v32) through the decoder, generation and the hub layout.

Inputs are built to contain exact index-score ties (few indexer heads, ReLU zeros) wherever the tie
rule could matter; transformers' deepseek_v32 is compared only with index_topk >= T, where it is
self-consistent (reference §6, §8.3).
"""

import numpy as np
import pytest

from refimpl import load_pretrained
from refimpl.attention import select_topk
from refimpl.config import ModelConfig
from refimpl.model import (
    generate,
    init_caches,
    init_params,
    loss_backward,
    loss_forward,
    model_forward,
    model_infer,
    save_pretrained,
)
from refimpl.testing import tol

EQ64 = tol("equiv64")


def v32(topk=3, hi=1, **changes):
    base = dict(initializer_range=0.3, max_position_embeddings=64)
    base.update(changes)
    cfg = ModelConfig.preset("tiny-v32").replace(**base)
    cfg.extra.update(index_topk=topk, index_n_heads=hi)
    return cfg


def tied_params(cfg, seed=0):
    params = init_params(cfg, np.random.default_rng(seed))
    return params


def boundary_ties(params, cfg, ids):
    """Rows (over all layers) whose k-th and (k+1)-th causal index scores are exactly equal."""
    cache = model_forward(ids, params, cfg)[1]
    k, n = cfg.extra["index_topk"], 0
    for bc in cache.blocks:
        for i in range(k, ids.shape[1]):
            row = np.sort(bc.attn.scores[:, i, : i + 1], axis=-1)[:, ::-1]
            n += int((row[:, k - 1] == row[:, k]).sum())
    return n


def ids_for(cfg, shape=(2, 14), seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)


def test_the_inputs_contain_ties():
    cfg = v32()
    params = tied_params(cfg)
    assert boundary_ties(params, cfg, ids_for(cfg)) >= 2


def test_index_topk_at_least_t_equals_the_v3_model_exactly():
    cfg = v32(topk=14)
    params = tied_params(cfg)
    v3 = ModelConfig.preset("tiny").replace(initializer_range=0.3, max_position_embeddings=64)
    p3 = {"model": {**params["model"], "layers": [
        {**lp, "self_attn": {k: v for k, v in lp["self_attn"].items() if k != "indexer"}}
        for lp in params["model"]["layers"]]}, "lm_head": params["lm_head"]}
    ids = ids_for(cfg)
    np.testing.assert_array_equal(model_forward(ids, params, cfg)[0], model_forward(ids, p3, v3)[0])


def test_prefix_logits_never_change_when_the_sequence_grows():
    cfg = v32()
    params = tied_params(cfg)
    ids = ids_for(cfg)
    full = model_forward(ids, params, cfg)[0]
    for n in range(1, ids.shape[1]):
        np.testing.assert_allclose(model_forward(ids[:, :n], params, cfg)[0], full[:, :n], **EQ64)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_decode_equals_full_forward_from_any_prefill(impl):
    cfg = v32()
    params = tied_params(cfg)
    ids = ids_for(cfg)
    full = model_forward(ids, params, cfg)[0]
    for t0 in (1, 3, 4, 9):
        caches = init_caches(cfg, 2, ids.shape[1])
        out = [model_infer(ids[:, :t0], params, cfg, caches, 0, impl=impl)[0]]
        out += [model_infer(ids[:, i:i + 1], params, cfg, caches, i, impl=impl)[0] for i in range(t0, ids.shape[1])]
        np.testing.assert_allclose(np.concatenate(out, axis=1), full, **EQ64)


def test_generation_with_and_without_cache_agree():
    cfg = v32()
    params = tied_params(cfg)
    ids = ids_for(cfg, (2, 5), seed=2)
    a = generate(params, cfg, ids, max_new_tokens=8)
    b = generate(params, cfg, ids, max_new_tokens=8, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_speculative_decoding_with_a_dsa_mtp_block_equals_greedy():
    from refimpl.model import speculative_generate
    cfg = v32(num_nextn_predict_layers=1)
    params = init_params(cfg, np.random.default_rng(3))
    ids = ids_for(cfg, (1, 6), seed=5)
    toks, _ = speculative_generate(params, cfg, ids, 10)
    np.testing.assert_array_equal(toks, generate(params, cfg, ids, max_new_tokens=10))


def test_lm_loss_gives_the_indexer_exactly_zero_gradient():
    cfg = v32()
    params = tied_params(cfg)
    loss, cache, _ = loss_forward(ids_for(cfg), params, cfg)
    grads = loss_backward(1.0, cache, params)
    for lg in grads["model"]["layers"]:
        ig = lg["self_attn"]["indexer"]
        assert all(np.all(ig[k] == 0) for k in ("wq_b", "wk", "weights_proj"))
        assert np.abs(lg["self_attn"]["q_a_proj"]).max() > 0


def test_save_and_load_in_the_hub_layout(tmp_path):
    from refimpl.model.checkpoint import read_safetensors
    cfg = v32()
    params = tied_params(cfg)
    save_pretrained(tmp_path, params, cfg)
    names = set(read_safetensors(tmp_path))
    assert {"model.layers.0.self_attn.indexer.wq_b.weight", "model.layers.1.self_attn.indexer.k_norm.bias",
            "model.layers.1.self_attn.indexer.weights_proj.weight"} <= names
    m = load_pretrained(tmp_path)
    assert m.config.extra["model_type"] == "deepseek_v32" and m.config.extra["index_topk"] == 3
    ids = ids_for(cfg)
    np.testing.assert_array_equal(m(ids), model_forward(ids, params, cfg)[0])


# ------------------------------------------------------------------------------------------------
# transformers' deepseek_v32: only where it is self-consistent (index_topk >= T)
# ------------------------------------------------------------------------------------------------

def _hf_v32(tmp_path, topk, hi=4):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV32ForCausalLM"):
        pytest.skip("this transformers has no deepseek_v32")
    cfg = v32(topk=topk, hi=hi, num_nextn_predict_layers=0)
    params = init_params(cfg, np.random.default_rng(5))
    save_pretrained(tmp_path, params, cfg)
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                                attn_implementation="eager",
                                                                experts_implementation="eager").eval()
    return torch, cfg, params, model


def test_matches_transformers_when_index_topk_covers_the_sequence(tmp_path):
    """index_topk >= T: the selection is every causal key in both, so ties cannot matter."""
    torch, cfg, params, model = _hf_v32(tmp_path, topk=16)
    ids = ids_for(cfg, (2, 12), seed=3)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model_forward(ids, params, cfg)[0], ref, **tol("transformers64"))


def test_transformers_selects_like_refimpl_on_tie_free_scores(tmp_path):
    """k < T, but only rows whose index scores have no tie at the k-th place are compared (marked tie-free)."""
    torch, cfg, params, model = _hf_v32(tmp_path, topk=4, hi=16)
    ids = ids_for(cfg, (1, 10), seed=4)
    scores = model_forward(ids, params, cfg)[1].blocks[0].attn.scores
    if boundary_ties(params, cfg, ids):
        pytest.skip("scores tied at the boundary: transformers is not an oracle there")
    assert select_topk(scores, 4)[0, -1].sum() == 4 and np.sort(scores[0, -1])[-5] > -np.inf
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model_forward(ids, params, cfg)[0], ref, **tol("transformers64"))


def test_a_transformers_checkpoint_loads_and_matches_with_index_topk_covering_the_sequence(tmp_path):
    """The other direction: transformers writes the checkpoint (its config.json: rope_parameters,
    layer_types, ...), refimpl loads it; index_topk >= T, so ties cannot matter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV32ForCausalLM"):
        pytest.skip("this transformers has no deepseek_v32")
    torch.manual_seed(0)
    cfg = transformers.DeepseekV32Config(
        vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12, q_lora_rank=16, qk_rope_head_dim=4,
        v_head_dim=8, qk_nope_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.2, index_topk=32,
        index_head_dim=8, index_n_heads=4, experts_implementation="eager", attn_implementation="eager")
    model = transformers.DeepseekV32ForCausalLM(cfg).to(torch.float64).eval()
    model.save_pretrained(tmp_path)
    m = load_pretrained(tmp_path)
    assert m.config.extra["index_topk"] == 32
    ids = ids_for(m.config, (2, 12), seed=6)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(m(ids), ref, **tol("transformers64"))
