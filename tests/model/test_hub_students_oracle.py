"""transformers' Qwen2ForCausalLM / LlamaForCausalLM as the oracle for the R1-Distill students' files:
tiny random models saved by transformers (BF16 and FP32, one file and sharded) load into refimpl with
logits within 1e-6 of transformers' float64 model (whose RMSNorm and RoPE tables run in float32,
~3e-7; reference §2.8), equal greedy tokens, and refimpl's own saved files load back into transformers."""

import json

import numpy as np
import pytest

from refimpl import load_pretrained

from .students_helpers import LLAMA3, hub_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
    "qwen2-untied-2kv-fp32": (hub_config("qwen2", hk=2), torch.float32, None),
    "qwen2-tied-1kv-bf16": (hub_config("qwen2", hk=1, tied=True), torch.bfloat16, None),
    "qwen2-untied-1kv-bf16-sharded": (hub_config("qwen2", hk=1), torch.bfloat16, "3KB"),
    "llama3-2kv-fp32-sharded": (hub_config("llama", hk=2, rope_scaling=LLAMA3), torch.float32, "3KB"),
    "llama-bias-fp32": (hub_config("llama", hk=4, attention_bias=True, mlp_bias=True), torch.float32, None),
}


def _hf_model(cfgd, seed):
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[cfgd["model_type"]]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**{k: v for k, v in cfgd.items() if k not in ("model_type", "architectures")}))
    with torch.no_grad():                       # biases and norm gains away from their zero / one init
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    with torch.no_grad():
        return model, model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_files_load_and_match(case, tmp_path):
    cfgd, dtype, shard = CASES[case]
    model = _hf_model(cfgd, seed=len(case)).to(dtype)
    model.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(shard)
    ids = np.random.default_rng(1).integers(0, cfgd["vocab_size"], (2, 12))
    ref_model, ref = _hf_logits(tmp_path / "hf", ids)
    m = load_pretrained(tmp_path / "hf")
    assert (m.params["lm_head"] is m.params["model"]["embed_tokens"]) == cfgd["tie_word_embeddings"]
    ours = m(ids)
    assert np.abs(ours - ref).max() <= 1e-6, np.abs(ours - ref).max()
    # greedy decoding: same tokens as transformers, cached == uncached
    with torch.no_grad():
        hf_tokens = ref_model.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                       pad_token_id=0).numpy()
    np.testing.assert_array_equal(m.generate(ids, 8), hf_tokens)
    np.testing.assert_array_equal(m.generate(ids, 8, use_cache=False), hf_tokens)
    m32 = load_pretrained(tmp_path / "hf", dtype=np.float32)
    np.testing.assert_allclose(m32(ids), ref, rtol=1e-4, atol=1e-4)
    # refimpl's save_pretrained (bf16 too) reads back into transformers
    m.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == cfgd["model_type"] and "kv_lora_rank" not in written
    _, back = _hf_logits(tmp_path / "ours", ids)
    np.testing.assert_allclose(back, ref, rtol=0, atol=1e-12)


def test_llama3_scaling_changes_the_logits_and_is_matched(tmp_path):
    """With original_max_position_embeddings 16 the llama3 correction moves the logits of a 40-token
    prompt well beyond the tolerance, so the oracle comparison above can tell the scaling apart."""
    cfgd = hub_config("llama", hk=2, rope_scaling=LLAMA3)
    model = _hf_model(cfgd, seed=5)
    model.save_pretrained(tmp_path / "a")
    plain = {**cfgd}
    del plain["rope_scaling"]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "b").mkdir()
    for f in (tmp_path / "a").iterdir():
        (tmp_path / "b" / f.name).write_bytes(f.read_bytes())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfgd["rope_theta"]}
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    ids = np.random.default_rng(2).integers(0, cfgd["vocab_size"], (1, 40))
    scaled, unscaled = load_pretrained(tmp_path / "a")(ids), load_pretrained(tmp_path / "b")(ids)
    assert np.abs(scaled - unscaled).max() > 1e-3
    _, ref = _hf_logits(tmp_path / "a", ids)
    assert np.abs(scaled - ref).max() <= 1e-6
