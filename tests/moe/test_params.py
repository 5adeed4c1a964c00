"""Parameter layouts, initialisation, and total vs active parameter counts of the published models."""

import numpy as np
import pytest

from refimpl.config import ModelConfig
from refimpl.moe import (
    count_parameters,
    experts_from_fused,
    experts_from_list,
    experts_to_list,
    init_moe_params,
    permute_experts,
)

# (preset, total, active, decimals of the published figure) -- DeepSeek-V2 §1 / App. B, V3 §1 / §4.2
PUBLISHED = [("deepseek-v2-lite", 15.7e9, 2.4e9, 1), ("deepseek-v2", 236e9, 21e9, 0),
             ("deepseek-v3", 671e9, 37e9, 0)]


@pytest.mark.parametrize("name, total, active, dec", PUBLISHED)
def test_total_and_active_parameters_match_the_papers(name, total, active, dec):
    c = count_parameters(ModelConfig.preset(name))
    assert round(c["total"] / 1e9, dec) == round(total / 1e9, dec)
    if name == "deepseek-v2-lite":
        # 2.451B by this count: the published "2.4B" is truncated (rounding would give 2.5B).
        assert np.floor(c["active"] / 1e8) / 10 == 2.4 and abs(c["active"] - active) < 0.06e9
    else:
        assert round(c["active"] / 1e9, dec) == round(active / 1e9, dec)
    # the counts are exact sums of their parts
    parts = sum(v for k, v in c.items() if k not in ("total", "active", "moe_routed_active"))
    assert parts == c["total"]


def test_moe_part_of_v3_exactly():
    c = count_parameters(ModelConfig.preset("deepseek-v3"))
    expert = 3 * 7168 * 2048
    assert c["moe_routed"] == 58 * 256 * expert and c["moe_routed_active"] == 58 * 8 * expert
    assert c["moe_shared"] == 58 * expert and c["moe_gate"] == 58 * (256 * 7168 + 256)
    assert c["dense_ffn"] == 3 * 3 * 7168 * 18432


def test_layouts_round_trip(rng):
    cfg = ModelConfig.preset("tiny")
    p = init_moe_params(cfg, rng)
    lst = experts_to_list(p["experts"])
    assert len(lst) == cfg.n_routed_experts and lst[3]["down_proj"].shape == (cfg.hidden_size, 16)
    back = experts_from_list(lst)
    for k in back:
        np.testing.assert_array_equal(back[k], p["experts"][k])
    fused = np.concatenate([p["experts"]["gate_proj"], p["experts"]["up_proj"]], axis=1)   # HF >= 5 layout
    f = experts_from_fused(fused, p["experts"]["down_proj"])
    for k in f:
        np.testing.assert_array_equal(f[k], p["experts"][k])
    perm = rng.permutation(cfg.n_routed_experts)
    q = permute_experts(p, perm)
    np.testing.assert_array_equal(q["experts"]["up_proj"][0], p["experts"]["up_proj"][perm[0]])
    np.testing.assert_array_equal(q["gate"]["weight"][0], p["gate"]["weight"][perm[0]])
    with pytest.raises(ValueError, match="perm"):
        permute_experts(p, [0] * cfg.n_routed_experts)
    with pytest.raises(ValueError, match="experts"):
        experts_from_list([])


def test_init(rng):
    v3 = ModelConfig.preset("tiny")
    p = init_moe_params(v3, rng, dtype=np.float32)
    assert p["gate"]["e_score_correction_bias"].dtype == np.float32 and not p["gate"]["e_score_correction_bias"].any()
    v2 = v3.replace(topk_method="greedy", scoring_func="softmax", n_shared_experts=0)
    p2 = init_moe_params(v2, rng)
    assert "e_score_correction_bias" not in p2["gate"] and "shared_experts" not in p2
    np.testing.assert_allclose(np.std(init_moe_params(v3.replace(hidden_size=256), 0)["experts"]["up_proj"]),
                               v3.initializer_range, rtol=0.05)
