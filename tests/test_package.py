"""Package-level promises: a cheap import that compiles nothing, and consistent configs."""

import json
import subprocess
import sys

import pytest

import refimpl
from refimpl import PRESETS, ModelConfig


def test_import_does_not_load_numba_or_hypothesis():
    code = ("import sys, refimpl, refimpl.core, refimpl.testing; "
            "print(sorted(m for m in ('numba', 'hypothesis', 'torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version():
    assert refimpl.__version__.count(".") == 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_roundtrip(name, tmp_path):
    cfg = ModelConfig.preset(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_json(path) == cfg


def test_published_shapes():
    v3 = ModelConfig.preset("deepseek-v3")
    assert v3.qk_head_dim == 192 and v3.kv_lora_rank + v3.qk_rope_head_dim == 576
    assert [l for l in range(v3.num_hidden_layers) if v3.is_moe_layer(l)] == list(range(3, 61))
    lite = ModelConfig.preset("deepseek-v2-lite")
    assert lite.q_lora_rank is None
    assert [l for l in range(27) if lite.is_moe_layer(l)] == list(range(1, 27))


def test_moe_layer_freq():
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=6, moe_layer_freq=2, first_k_dense_replace=1)
    assert [l for l in range(6) if cfg.is_moe_layer(l)] == [2, 4]


def test_unknown_keys_kept_and_q_lora_zero_means_none():
    cfg = ModelConfig.from_dict({**PRESETS["tiny"], "q_lora_rank": 0, "architectures": ["X"]})
    assert cfg.q_lora_rank is None and cfg.extra == {"architectures": ["X"]}
    assert cfg.to_dict()["architectures"] == ["X"]


@pytest.mark.parametrize("change, field", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"topk_group": 5}, "topk_group"),
    ({"n_group": 3}, "n_group"),
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"topk_method": "top2"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling"),
    ({"num_experts_per_tok": 5, "topk_group": 2}, "num_experts_per_tok"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ModelConfig.preset("tiny").replace(**change)
    with pytest.raises(ValueError, match="name"):
        ModelConfig.preset("deepseek-v4")


def test_replace_does_not_share_mutable_fields():
    a = ModelConfig.preset("deepseek-v3")
    b = a.replace(num_hidden_layers=2)
    b.extra["x"] = 1
    b.rope_scaling["factor"] = 2
    assert "x" not in a.extra and a.rope_scaling["factor"] == 40


def test_submodules_load_lazily():
    assert refimpl.quant.round_to_fp8 is not None and refimpl.optim.adamw_update is not None
    with pytest.raises(AttributeError):
        refimpl.nonexistent  # noqa: B018


def test_source_markdown_renders_real_source():
    from refimpl.core import rmsnorm_forward
    from refimpl.display import source_markdown
    md = source_markdown(rmsnorm_forward)
    assert md.startswith("```python\ndef rmsnorm_forward(") and md.endswith("\n```")
    with pytest.raises(ValueError, match="^objects"):
        source_markdown()
