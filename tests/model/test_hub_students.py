"""R1-Distill students (DeepSeek-R1 §2.4) from their hub files: Qwen2 and Llama-3 checkpoints, always
against refimpl's own saved files read by the ``safetensors`` library and an independent NumPy forward
(tests/model/students_helpers.py); the transformers oracle is in test_hub_students_oracle.py."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from refimpl import load_pretrained
from refimpl.core import rope_inv_freq
from refimpl.model import loss_backward, loss_forward, save_pretrained
from refimpl.model.checkpoint import config_from_hf, to_hub
from refimpl.model.safetensors_io import bf16_to_float32, float32_to_bf16
from refimpl.testing import check_grad, tol

from .students_helpers import LLAMA3, hub_config, numpy_forward, random_student

CASES = {
    "qwen2-untied-gqa": hub_config("qwen2", hk=2),
    "qwen2-tied-mqa": hub_config("qwen2", hk=1, tied=True),
    "llama3-rope": hub_config("llama", hk=2, rope_scaling=LLAMA3),
    "llama-linear-biases": hub_config("llama", hk=4, dh=6, attention_bias=True, mlp_bias=True,
                                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
}


def _paths(tree, path=()):
    if isinstance(tree, dict):
        return {q: v for k, sub in tree.items() for q, v in _paths(sub, path + (k,)).items()}
    if isinstance(tree, list):
        return {q: v for i, sub in enumerate(tree) for q, v in _paths(sub, path + (i,)).items()}
    return {path: tree}


def _equal_trees(a, b):
    pa, pb = _paths(a), _paths(b)
    assert sorted(map(str, pa)) == sorted(map(str, pb))
    for k, x in pa.items():
        assert x.dtype == pb[k].dtype, k
        np.testing.assert_array_equal(x, pb[k], err_msg=str(k))


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_files_match_an_independent_numpy_forward_and_round_trip(case, tmp_path):
    cfgd = CASES[case]
    config, params = random_student(cfgd, seed=len(case))
    save_pretrained(tmp_path, params, config)
    hub = load_file(str(tmp_path / "model.safetensors"))          # the safetensors library reads our file
    assert ("lm_head.weight" in hub) == (not cfgd["tie_word_embeddings"])
    assert any(k.endswith("q_proj.bias") for k in hub) == (cfgd["model_type"] == "qwen2" or "attention_bias" in cfgd)
    assert not any(k.endswith("o_proj.bias") for k in hub) or cfgd.get("attention_bias")
    written = json.loads((tmp_path / "config.json").read_text())
    m = load_pretrained(tmp_path)
    _equal_trees(m.params, params)                                 # exact round trip
    assert config_from_hf(written).to_dict() == m.config.to_dict()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfgd["vocab_size"], (2, 11))
    ours = m(ids)
    hub_cfg = {**cfgd, **({"rope_scaling": {**cfgd["rope_parameters"]}} if "rope_parameters" in cfgd else {})}
    if "rope_parameters" in cfgd:
        hub_cfg["rope_theta"] = hub_cfg["rope_scaling"].pop("rope_theta")
    for b in range(2):
        np.testing.assert_allclose(ours[b], numpy_forward(hub, hub_cfg, ids[b]), rtol=1e-11, atol=1e-12)
    # cached generation equals recomputation, greedy and sampled
    np.testing.assert_array_equal(m.generate(ids, 6), m.generate(ids, 6, use_cache=False))
    m32 = load_pretrained(tmp_path, dtype=np.float32)
    assert m32.params["lm_head"].dtype == np.float32
    np.testing.assert_allclose(m32(ids), ours, rtol=1e-4, atol=1e-5)


def test_tied_head_is_the_embedding_and_untied_head_is_required(tmp_path):
    config, params = random_student(CASES["qwen2-tied-mqa"])
    save_pretrained(tmp_path, params, config)
    m = load_pretrained(tmp_path)
    assert m.params["lm_head"] is m.params["model"]["embed_tokens"]
    untied = {**CASES["qwen2-untied-gqa"], "tie_word_embeddings": False}
    c2, p2 = random_student(untied)
    save_pretrained(tmp_path / "u", p2, c2)
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    hub = load_file(str(tmp_path / "u" / "model.safetensors"))
    del hub["lm_head.weight"]
    from safetensors.numpy import save_file
    save_file(hub, str(tmp_path / "u" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        load_pretrained(tmp_path / "u")                       # never fall back to the embedding (untied file)
    (tmp_path / "u" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    assert load_pretrained(tmp_path / "u").params["lm_head"] is not None


def test_bf16_files_load_exactly_and_shards_round_trip(tmp_path):
    config, params = random_student(CASES["llama3-rope"], seed=3)
    save_pretrained(tmp_path / "bf", params, config, dtype="bfloat16", max_shard_bytes=3000)
    index = json.loads((tmp_path / "bf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "bf" / "model.safetensors").exists()
    m = load_pretrained(tmp_path / "bf")
    pm = _paths(m.params)
    for k, a in _paths(params).items():
        np.testing.assert_array_equal(pm[k], bf16_to_float32(float32_to_bf16(a)).astype(np.float64), err_msg=str(k))
    # re-saving the loaded bf16 values in bf16 reproduces every stored bit; single file again
    m.save_pretrained(tmp_path / "bf")
    assert not (tmp_path / "bf" / "model.safetensors.index.json").exists()
    assert not any((tmp_path / "bf" / s).exists() for s in shards)
    _equal_trees(load_pretrained(tmp_path / "bf").params, m.params)


def test_fp16_and_fp32_files(tmp_path):
    config, params = random_student(CASES["qwen2-untied-gqa"], seed=4)
    for dt in (np.float16, np.float32):
        save_pretrained(tmp_path / dt.__name__, params, config, dtype=dt)
        stored = load_file(str(tmp_path / dt.__name__ / "model.safetensors"))
        assert {v.dtype for v in stored.values()} == {np.dtype(dt)}
        pm = _paths(load_pretrained(tmp_path / dt.__name__).params)
        for k, a in _paths(params).items():
            np.testing.assert_array_equal(pm[k], a.astype(dt).astype(np.float64), err_msg=str(k))


def test_loading_holds_each_weight_once(tmp_path):
    """tracemalloc peak while loading in float32 (from BF16 and from float64 files) <= 1.25x the float32
    parameter bytes: tensors are read one at a time, chunk by chunk, straight into the target dtype."""
    import tracemalloc
    cfgd = hub_config("qwen2", hk=2, h=4, dh=16, d=64, layers=24, vocab=300)
    config, params = random_student(cfgd)
    nbytes = 4 * sum(a.size for a in _paths(params).values())
    for dt in ("bfloat16", None):
        save_pretrained(tmp_path / str(dt), params, config, dtype=dt)
        tracemalloc.start()
        m = load_pretrained(tmp_path / str(dt), dtype=np.float32)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert m.params["lm_head"].dtype == np.float32
        assert peak <= 1.25 * nbytes, (dt, peak / nbytes)


def test_every_bf16_pattern_widens_exactly_and_rounds_back():
    bits = np.arange(65536, dtype=np.uint16)
    x = bf16_to_float32(bits)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(float32_to_bf16(x)[finite], bits[finite])
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.float32([np.nan])))).all()
    # round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1; 1 + 3*2^-8 -> 1 + 2^-6
    assert bf16_to_float32(float32_to_bf16(np.float32([1 + 2 ** -8, 1 + 3 * 2 ** -8]))).tolist() == [1.0, 1 + 2 ** -6]


def test_llama3_frequencies_as_the_reference_lists_them():
    """hd 128, θ 5e5, factor 8, L0 8192: 29 kept, 6 ramped (ratios 0.8282 ... 0.1902), 29 divided by 8."""
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    base = rope_inv_freq(128, 500000.0)
    ratio = rope_inv_freq(128, 500000.0, rs) / base
    assert np.sum(ratio == 1) == 29 and np.sum(ratio == 1 / 8) == 29
    np.testing.assert_allclose(ratio[29:35], [0.8282, 0.6437, 0.4935, 0.3711, 0.2714, 0.1902], atol=1e-4)
    assert np.all(np.diff(ratio) <= 0)
    np.testing.assert_allclose(rope_inv_freq(128, 500000.0, {**rs, "factor": 1.0}), base, rtol=1e-15)
    np.testing.assert_array_equal(rope_inv_freq(16, 1e4, {"type": "linear", "factor": 4.0}), rope_inv_freq(16, 1e4) / 4)


def test_rope_parameters_and_rope_scaling_forms_give_the_same_config():
    hub = hub_config("llama", rope_scaling={**LLAMA3}, rope_theta=5e5)
    v5 = {k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA3, "rope_theta": 5e5}
    a, b = config_from_hf(hub), config_from_hf(v5)
    assert a.rope_theta == b.rope_theta == 5e5 and a.rope_scaling == b.rope_scaling
    legacy = config_from_hf({**hub, "rope_scaling": {"type": "linear", "factor": 2.0}})
    np.testing.assert_array_equal(rope_inv_freq(8, 5e5, legacy.rope_scaling), rope_inv_freq(8, 5e5) / 2)
    no_l0 = config_from_hf({**hub, "rope_scaling": {k: v for k, v in LLAMA3.items()
                                                     if k != "original_max_position_embeddings"}})
    assert no_l0.rope_scaling["original_max_position_embeddings"] == hub["max_position_embeddings"]


def test_sliding_window_fields_are_dead_unless_enabled_and_then_refused():
    base = hub_config("qwen2")
    for w in (1, 4, 131072):
        assert config_from_hf({**base, "sliding_window": w, "max_window_layers": 1}).to_dict()["sliding_window"] == w
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf({**base, "layer_types": ["full_attention", "sliding_attention"]})
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        with pytest.raises(ValueError, match=f"missing required field '{field}'"):
            config_from_hf({k: v for k, v in base.items() if k != field})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31), case=st.sampled_from(["qwen2-untied-gqa", "llama-linear-biases", "llama3-rope"]),
       t=st.integers(2, 5))
def test_gradcheck_through_biases_and_scaled_rope(seed, case, t):
    """Finite differences of the next-token loss for every parameter, q/k/v/o and MLP biases included."""
    config, params = random_student({**CASES[case], "tie_word_embeddings": False}, seed=seed % 1000)
    assert any(k.endswith("_bias") for k in params["model"]["layers"][0]["self_attn"]) == (case != "llama3-rope")
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (2, t))

    def f(p):
        loss, cache, _ = loss_forward(ids, p, config, backend="numpy")
        return loss, lambda d: (loss_backward(float(d), cache, p),)
    assert check_grad(f, [params], max_entries=3, seed=seed % 1000) < tol("gradcheck")["rtol"]


def test_hub_names_and_shapes_of_a_qwen2_student():
    config, params = random_student(hub_config("qwen2", hk=2, h=4, dh=8, d=16))
    hub = to_hub(params, config)
    pre = "model.layers.0.self_attn."
    assert hub[pre + "q_proj.weight"].shape == (32, 16) and hub[pre + "k_proj.weight"].shape == (16, 16)
    assert hub[pre + "q_proj.bias"].shape == (32,) and hub[pre + "v_proj.bias"].shape == (16,)
    assert pre + "o_proj.bias" not in hub
    # the hub's rotate-half rows are refimpl's adjacent pairs, reordered per head
    w = params["model"]["layers"][0]["self_attn"]["k_proj"]
    np.testing.assert_array_equal(hub[pre + "k_proj.weight"][:8][[0, 4, 1, 5, 2, 6, 3, 7]], w[:8])


def test_deepseek_checkpoints_shard_too(tmp_path):
    from refimpl.config import ModelConfig
    from refimpl.model import init_params
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="MTP modules but config.num_nextn_predict_layers is 0"):
        save_pretrained(tmp_path, init_params(cfg, np.random.default_rng(0), mtp=True), cfg)
    cfg = cfg.replace(num_nextn_predict_layers=1)
    params = init_params(cfg, np.random.default_rng(0))
    save_pretrained(tmp_path, params, cfg, max_shard_bytes=20000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert any(".mlp.experts.3.up_proj.weight" in k for k in index["weight_map"])
    _equal_trees(load_pretrained(tmp_path).params, params)
