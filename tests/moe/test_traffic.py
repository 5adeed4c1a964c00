"""Simulated expert parallelism: conservation laws, a hand-counted case, node-limited routing."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.moe import all_to_all_stats, expert_placement
from refimpl.moe.traffic import node_limited_comparison
from refimpl.testing import strategies as rst


def test_hand_counted_example():
    """4 experts on 4 devices, 2 devices per node; token 0 lives on device 0, token 1 on device 2."""
    idx = np.array([[1, 2], [0, 1]])
    s = all_to_all_stats(idx, 4, 4, 2, hidden_size=10, bytes_per_value=1)
    np.testing.assert_array_equal(s["device_load"], [1, 2, 1, 0])
    np.testing.assert_array_equal(s["nodes_per_token"], [2, 1])
    assert s["cross_node_tokens"] == 2            # token 0 -> node 1 once; token 1 -> node 0 once
    assert s["cross_node_tokens_per_device"] == 3  # token 1 needs devices 0 and 1, both on node 0
    assert s["intra_node_tokens"] == 1            # token 0 -> device 1, same node
    assert s["cross_node_bytes"] == 20
    np.testing.assert_array_equal(s["a2a_tokens"], [[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


@given(rst.seeds(), st.sampled_from([(8, 4, 2), (16, 8, 4), (12, 6, 3), (8, 8, 8)]), st.integers(1, 4))
def test_conservation(rng, placement, k):
    e, n_dev, per_node = placement
    n = 40
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    s = all_to_all_stats(idx, e, n_dev, per_node)
    assert s["device_load"].sum() == n * k
    dev = expert_placement(e, n_dev, per_node)[0][idx]
    distinct = np.array([len(set(r)) for r in dev.tolist()])
    assert s["a2a_tokens"].sum() == distinct.sum() == s["device_tokens"].sum()
    home = np.arange(n) * n_dev // n
    np.testing.assert_array_equal(s["a2a_tokens"].sum(1), np.bincount(home, weights=distinct, minlength=n_dev))
    local = np.trace(s["a2a_tokens"])
    assert s["cross_node_tokens_per_device"] + s["intra_node_tokens"] + local == distinct.sum()
    assert s["cross_node_tokens"] <= s["cross_node_tokens_per_device"]
    if per_node == n_dev:
        assert s["cross_node_tokens"] == 0 and s["max_nodes_per_token"] == 1


def test_node_limited_routing_bounds_nodes_per_token_and_cuts_cross_node_traffic(rng):
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=64, n_group=8, topk_group=2, num_experts_per_tok=8,
                                             topk_method="noaux_tc", scoring_func="sigmoid")
    gate = {"weight": rng.standard_normal((64, cfg.hidden_size)), "e_score_correction_bias": np.zeros(64)}
    x = rng.standard_normal((256, cfg.hidden_size))
    out = node_limited_comparison(x, gate, cfg, n_devices=16, devices_per_node=2)
    lim, free = out["limited"], out["unlimited"]
    assert lim["max_nodes_per_token"] <= 2 < free["max_nodes_per_token"]
    assert lim["cross_node_tokens"] < 0.6 * free["cross_node_tokens"]
    assert lim["cross_node_bytes"] == lim["cross_node_tokens"] * cfg.hidden_size


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_devices"):
        expert_placement(8, 3)
    with pytest.raises(ValueError, match="devices_per_node"):
        expert_placement(8, 4, 3)
    with pytest.raises(ValueError, match="idx"):
        all_to_all_stats(np.array([[8]]), 8, 4)
    with pytest.raises(ValueError, match="token_device"):
        all_to_all_stats(np.array([[1]]), 8, 4, token_device=np.array([0, 1]))
