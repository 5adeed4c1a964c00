"""KV-cache accounting against DeepSeek-V2's published numbers, and the YaRN constants of the presets."""

import numpy as np
import pytest
from hypothesis import given

from refimpl import core
from refimpl.attention import (
    default_head_dim,
    default_scheme,
    init_kv_cache,
    init_latent_cache,
    kv_cache_bytes,
    kv_cache_elements_per_token,
    uses_mla,
)
from refimpl.config import ModelConfig
from refimpl.testing import strategies as rst

V2, V3, LITE, B67 = (ModelConfig.preset(n) for n in ("deepseek-v2", "deepseek-v3", "deepseek-v2-lite",
                                                      "deepseek-67b"))


def test_576_values_per_token_per_layer_for_v2_and_v3():
    for cfg in (V2, V3, LITE):
        assert kv_cache_elements_per_token(cfg, per_layer=True) == 576
        assert init_latent_cache(cfg, 1, 2, dtype=np.float32).values_per_token == 576
    assert kv_cache_elements_per_token(V2) == 34_560 and kv_cache_elements_per_token(V3) == 35_136


def test_paper_table_1_and_table_9():
    """V2 Table 1 per layer (d_h = 128, n_h = 128) and App. D.2 Table 9 whole-model counts."""
    assert kv_cache_elements_per_token(V2, "mha", per_layer=True) == 32_768
    assert kv_cache_elements_per_token(V2, "mqa", per_layer=True) == 256
    assert kv_cache_elements_per_token(V2, "gqa", per_layer=True) == 2 * 128 * 128   # Hk = H here
    assert 576 / 32_768 == pytest.approx(0.0176, abs=1e-4)
    assert kv_cache_elements_per_token(LITE, "mha") == 110_592                       # "110.6K"
    assert kv_cache_elements_per_token(LITE) == 15_552                               # "15.6K"
    assert kv_cache_elements_per_token(V2) == 34_560                                 # "34.6K"
    assert kv_cache_elements_per_token(V3, "mla_naive", per_layer=True) == 40_960


def test_deepseek_67b_is_gqa_and_the_93_3_percent_reduction():
    assert not uses_mla(B67) and uses_mla(V2)
    assert default_scheme(B67) == "gqa" and default_head_dim(B67) == 128
    assert kv_cache_elements_per_token(B67) == 194_560
    b67 = kv_cache_bytes(B67, bytes_per_element=2)                  # bf16: 389,120 bytes / token
    v2 = kv_cache_bytes(V2, bytes_per_element=0.75)                 # "6 bits on average" (§3.2.3)
    assert (b67, v2) == (389_120, 25_920)
    assert 1 - v2 / b67 == pytest.approx(0.9334, abs=5e-5)          # the quoted 93.3%
    assert 1 - kv_cache_bytes(V2) / b67 == pytest.approx(0.8224, abs=5e-5)   # bf16 both: only 82.2%


def test_schemes_for_a_gqa_config_and_scaling_with_context():
    assert kv_cache_elements_per_token(B67, "mha", per_layer=True) == 2 * 64 * 128
    assert kv_cache_elements_per_token(B67, "mqa", per_layer=True) == 256
    assert kv_cache_bytes(V3, 1000, batch_size=3, bytes_per_element=1) == 35_136 * 3000
    assert default_scheme(B67.replace(num_key_value_heads=1)) == "mqa"
    assert default_scheme(B67.replace(num_key_value_heads=64)) == "mha"
    with pytest.raises(ValueError, match="scheme"):
        kv_cache_elements_per_token(V3, "mha2")
    with pytest.raises(ValueError, match="bytes_per_element"):
        kv_cache_bytes(V3, bytes_per_element=0)
    with pytest.raises(ValueError, match="context"):
        kv_cache_bytes(V3, -1)


@given(cfg=rst.model_configs(moe=False))
def test_allocated_caches_match_the_accounting(cfg):
    assert init_latent_cache(cfg, 2, 3).latent.shape == (2, 3, kv_cache_elements_per_token(cfg, per_layer=True))
    kv = init_kv_cache(cfg, 1, 3)
    assert kv.values_per_token == kv_cache_elements_per_token(cfg, "gqa", per_layer=True)


def test_alloc_errors():
    with pytest.raises(ValueError, match="max_len"):
        init_latent_cache(V3, 1, 0)
    with pytest.raises(TypeError, match="dtype"):
        init_latent_cache(V3, 1, 2, dtype=np.float16)


def test_yarn_constants_of_the_presets():
    """Softmax scale d_qk^-1/2 m^2 (V2: μ = 0.707, V3: μ = 1) and the frequency ramp low = 10, high = 23."""
    no_yarn = core.softmax_scale(V3.qk_head_dim, None)
    assert no_yarn == pytest.approx(0.0721688, abs=5e-8)
    assert core.softmax_scale(V2.qk_head_dim, V2.rope_scaling) == pytest.approx(0.1147214, abs=5e-8)
    assert core.softmax_scale(LITE.qk_head_dim, LITE.rope_scaling) == pytest.approx(0.1147214, abs=5e-8)
    assert core.softmax_scale(V3.qk_head_dim, V3.rope_scaling) == pytest.approx(0.1352338, abs=5e-8)
    assert core.rope_attention_factor(V3.rope_scaling) == 1.0 == core.rope_attention_factor(V2.rope_scaling)
    ratio = core.rope_inv_freq(64, V3.rope_theta, V3.rope_scaling) / core.rope_inv_freq(64, V3.rope_theta)
    i = np.arange(32)
    expected = np.where(i <= 10, 1.0, np.where(i >= 23, 1 / 40, 1 - (i - 10) / 13 * (1 - 1 / 40)))
    np.testing.assert_allclose(ratio, expected, rtol=1e-12)
