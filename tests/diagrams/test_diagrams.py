"""The book's diagrams: each draws, returns a figure, and prints the numbers of the config it is given."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from refimpl.accounting import parameter_counts  # noqa: E402
from refimpl.config import ModelConfig  # noqa: E402
from refimpl.diagrams import (  # noqa: E402
    DIAGRAMS,
    expert_parallel_diagram,
    grpo_diagram,
    lineage_diagram,
    mla_diagram,
    moe_diagram,
    mtp_diagram,
    texts,
)
from refimpl.rl import group_advantages  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def text_of(fig) -> str:
    return "\n".join(texts(fig))


@pytest.mark.parametrize("name", sorted(DIAGRAMS))
def test_every_diagram_draws_a_figure_with_labels(name, tmp_path):
    fig = DIAGRAMS[name]()
    assert isinstance(fig, Figure)
    assert len(texts(fig)) >= 5, texts(fig)
    fig.savefig(tmp_path / f"{name}.png", dpi=40)          # mathtext in the labels parses
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "tiny"])
def test_mla_diagram_shows_the_config_shapes(preset):
    c = ModelConfig.preset(preset)
    t = text_of(mla_diagram(c))
    dc, dr = c.kv_lora_rank, c.qk_rope_head_dim
    assert f"{dc} + {dr} = {dc + dr}" in t
    assert f"{c.num_attention_heads} x {c.qk_nope_head_dim}" in t and f"D = {c.hidden_size:,}" in t
    full = c.num_attention_heads * (c.qk_nope_head_dim + dr + c.v_head_dim)
    assert f"{full:,} numbers" in t
    if c.q_lora_rank is None:                                  # V2-Lite: no query latent drawn
        assert "$D_q$" not in t
    else:
        assert f"$D_q$ = {c.q_lora_rank:,}" in t


def test_mla_diagram_of_v3_has_the_published_numbers():
    t = text_of(mla_diagram("deepseek-v3"))
    for s in ("D = 7,168", "$D_q$ = 1,536", "$D_c$ = 512", "512 + 64 = 576", "128 x 128", "128 x 64"):
        assert s in t, s


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2", "tiny"])
def test_moe_diagram_shows_groups_experts_and_the_bias_rule(preset):
    c = ModelConfig.preset(preset)
    fig = moe_diagram(c)
    t = text_of(fig)
    assert f"E = {c.n_routed_experts} routed experts" in t
    assert f"G = {c.n_group} groups of {c.n_routed_experts // c.n_group}" in t
    assert f"best {c.topk_group} groups" in t and f"K = {c.num_experts_per_tok} experts" in t
    assert ("never to weight" in t) == (c.topk_method == "noaux_tc")
    green = [p for p in fig.axes[0].patches if p.get_facecolor()[:3] == matplotlib.colors.to_rgb("#2ca02c")]
    assert len(green) == c.num_experts_per_tok                # exactly K experts are marked chosen


def test_moe_diagram_rejects_a_dense_config():
    with pytest.raises(ValueError, match="config"):
        moe_diagram("deepseek-67b")


def test_lineage_sizes_come_from_the_configs():
    t = text_of(lineage_diagram())
    assert "236B total, 21B active" in t and "671B total, 37B active" in t and "67B parameters" in t
    lite = parameter_counts(ModelConfig.preset("deepseek-v2-lite"))
    t2 = text_of(lineage_diagram(v2="deepseek-v2-lite"))
    assert f"{lite['total'] / 1e9:.0f}B total, {lite['active'] / 1e9:.1f}B active" in t2


def test_mtp_diagram_uses_the_hidden_size_and_depth():
    t = text_of(mtp_diagram("deepseek-v3"))
    assert "concat (14,336) -> eh_proj -> 7,168" in t and "61 blocks" in t


def test_grpo_diagram_prints_refimpl_advantages():
    rewards = [1.0, 0.0, 0.0, 0.0]
    t = text_of(grpo_diagram(rewards))
    adv, _ = group_advantages(np.array(rewards), 4)
    for i, a in enumerate(adv):
        assert f"$\\hat A_{{{i + 1}}}$ = {a:+.2f}" in t
    assert "G = 4" in t and "mean 0.250" in t


def test_expert_parallel_diagram_splits_the_experts():
    t = text_of(expert_parallel_diagram("deepseek-v3", n_ranks=4))
    assert "experts 0-63\n(64 of 256)" in t and "experts 192-255\n(64 of 256)" in t and "at most 4 nodes" in t
    with pytest.raises(ValueError, match="n_ranks"):
        expert_parallel_diagram("deepseek-v3", n_ranks=3)


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="config"):
        mla_diagram(42)
    with pytest.raises(ValueError, match="rewards"):
        grpo_diagram([1.0])
