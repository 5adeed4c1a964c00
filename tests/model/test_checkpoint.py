"""Hub-layout checkpoints: round trip, strict names and shapes, config reading."""

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")

from refimpl import load_pretrained  # noqa: E402
from refimpl.model.checkpoint import config_from_hf, read_safetensors, save_pretrained  # noqa: E402
from refimpl.tree import tree_flatten, tree_paths  # noqa: E402


def _resave(path, tensors):
    from safetensors.numpy import save_file
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"))


def test_round_trip_with_mtp(tiny, tmp_path):
    cfg, params = tiny
    save_pretrained(tmp_path, params, cfg)
    t = read_safetensors(tmp_path)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in t
    assert "model.layers.2.eh_proj.weight" in t and "model.layers.2.shared_head.head.weight" in t
    m = load_pretrained(tmp_path)
    assert tree_paths(m.params) == tree_paths(params)
    for a, b in zip(tree_flatten(m.params)[0], tree_flatten(params)[0], strict=True):
        np.testing.assert_array_equal(a, b)
    ids = np.array([[1, 2, 3, 4]])
    assert m(ids).shape == (1, 4, cfg.vocab_size) and m.generate(ids, max_new_tokens=3).shape == (1, 7)


def test_strict_names_and_shapes(tiny, tmp_path):
    cfg, params = tiny
    save_pretrained(tmp_path, params, cfg)
    t = read_safetensors(tmp_path)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    _resave(tmp_path, {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_pretrained(tmp_path)
    _resave(tmp_path, {**t, "model.layers.0.mlp.extra.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_pretrained(tmp_path)
    _resave(tmp_path, {**t, "model.norm.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_pretrained(tmp_path)
    # a config that contradicts the weights names the first mis-shaped tensor
    _resave(tmp_path, t)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "kv_lora_rank": 6}))
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa"):
        load_pretrained(tmp_path)


def test_checkpoint_without_mtp_tensors_loads_without_mtp(tiny, tmp_path):
    cfg, params = tiny
    save_pretrained(tmp_path, {k: v for k, v in params.items() if k != "mtp"}, cfg)
    assert "mtp" not in load_pretrained(tmp_path).params


def test_config_from_transformers_rope_parameters():
    d = {"model_type": "deepseek_v3", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
         "intermediate_size": 16, "num_hidden_layers": 2,
         "num_key_value_heads": 2, "n_routed_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
         "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0,
                             "original_max_position_embeddings": 8}}
    c = config_from_hf(d)
    assert c.rope_theta == 5000.0 and c.rope_scaling["factor"] == 4.0 and "rope_theta" not in c.rope_scaling
    assert c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"
    v2 = config_from_hf({**d, "model_type": "deepseek_v2", "n_group": None, "topk_group": None,
                         "norm_topk_prob": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert v2.scoring_func == "softmax" and not v2.norm_topk_prob and v2.n_group == 1 and v2.rope_scaling is None
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**d, "model_type": "mistral"})


def test_bf16_and_fp8_block_scaled_checkpoints(tiny, tmp_path):
    """Hub checkpoints in bf16 (V2) and FP8 with 128x128 block scales (V3) load, without pickle."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from refimpl.model import to_hub
    from refimpl.quant.fp8 import quantize_weight

    cfg, params = tiny
    save_pretrained(tmp_path, params, cfg)
    hub = to_hub(params, cfg)
    bf16 = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in hub.items()}
    (tmp_path / "model.safetensors").unlink()
    save_file(bf16, str(tmp_path / "model.safetensors"))
    m = load_pretrained(tmp_path)
    w = m.params["model"]["layers"][0]["self_attn"]["kv_b_proj"]
    np.testing.assert_array_equal(w, bf16["model.layers.0.self_attn.kv_b_proj.weight"].double().numpy())
    # FP8: one matrix quantised per 128x128 block, stored as e4m3 + float32 weight_scale_inv
    name = "model.layers.0.mlp.gate_proj.weight"
    q, s = quantize_weight(hub[name].astype(np.float32))
    fp8 = {k: torch.from_numpy(np.array(v)) for k, v in hub.items()}
    fp8[name] = torch.from_numpy(q).to(torch.float8_e4m3fn)
    fp8[name + "_scale_inv"] = torch.from_numpy(s)
    (tmp_path / "model.safetensors").unlink()
    save_file(fp8, str(tmp_path / "model.safetensors"))
    m = load_pretrained(tmp_path)
    np.testing.assert_array_equal(m.params["model"]["layers"][0]["mlp"]["gate_proj"], q * s[0, 0])
    np.testing.assert_allclose(m.params["model"]["layers"][0]["mlp"]["gate_proj"], hub[name], rtol=0.07, atol=1e-3)
