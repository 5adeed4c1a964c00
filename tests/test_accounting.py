"""Accounting checked by hand on the tiny config and against the published figures.

Sources: DeepSeek-V2 §1, §3.2.3, App. B (236B/21B, 93.3% smaller KV cache); DeepSeek-V3 §1,
Table 1, §3.3.3, §4.2 and README_WEIGHTS (671B/37B, MTP 11.5B unique, HF 685B, 2.788M H800 GPU-hours,
$5.576M at $2/GPU-hour, 14.8T tokens). Published figures are compared at the precision printed.
"""

import math

import pytest

from refimpl.accounting import (
    COMPONENTS,
    FP32_ADAM_PLAN,
    H800_PEAK_FLOPS,
    V3_GPU_HOURS,
    V3_PLAN,
    V3_TRAINING_TOKENS,
    V3_USD_PER_GPU_HOUR,
    PrecisionPlan,
    forward_flops_per_token,
    get_config,
    gpu_hours,
    implied_utilisation,
    kv_cache_bytes_per_token,
    parameter_counts,
    six_n_flops_per_token,
    summary,
    training_cost,
    training_flops_per_token,
    training_memory_bytes,
)
from refimpl.moe import count_parameters

MLA_PRESETS = ["tiny", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"]


def test_tiny_by_hand():
    # tiny: V=64, D=32, L=2 (layer 0 dense I=64, layer 1 MoE), H=4, Dq=16, Dc=12, Dn=8, Dr=4, Dv=8,
    # E=8 routed + 1 shared of width 16, K=2, noaux_tc (gate bias of E).
    p = parameter_counts(get_config("tiny"))
    attn_w = 16 * 32 + 4 * 12 * 16 + 16 * 32 + 4 * 16 * 12 + 32 * 4 * 8  # q_a, q_b, kv_a, kv_b, o = 3584
    attn = attn_w + 16 + 12                                              # + q_a / kv_a layernorms
    expert = 3 * 32 * 16
    comp = {"embedding": (2048, 0), "attention": (2 * attn,) * 2, "dense_ffn": (3 * 32 * 64,) * 2,
            "routed_experts": (8 * expert, 2 * expert), "shared_experts": (expert,) * 2,
            "norms_router": ((2 * 2 + 1) * 32 + 8 * 32 + 8,) * 2, "lm_head": (2048,) * 2}
    assert p["components"] == {k: {"total": t, "active": a} for k, (t, a) in comp.items()}
    assert (p["total"], p["active"]) == (31712, 20448)
    assert p["mtp"] == {"total": 0, "active": 0}
    # forward: 2 x matmul weights (no norm gains or gate bias) + context 2 T H (Dqk + Dv) per layer
    matmul = 2 * attn_w + 3 * 32 * 64 + 2 * expert + expert + 8 * 32 + 64 * 32
    for t in (0, 1, 7):
        assert forward_flops_per_token(get_config("tiny"), t)["total"] == 2 * matmul + 2 * 2 * t * 4 * (12 + 8)
    # absorbed: 2 T H (2 Dc + Dr) per layer
    assert forward_flops_per_token(get_config("tiny"), 5, attention_impl="absorbed")["attention_context"] == \
        2 * 2 * 5 * 4 * (2 * 12 + 4)
    # causal training on T=7: mean context (7+1)/2 = 4, 3x the forward
    assert training_flops_per_token(get_config("tiny"), 7) == 3 * (2 * matmul + 4 * 4 * 4 * 20)
    assert training_flops_per_token(get_config("tiny"), 7, causal=False) == 3 * (2 * matmul + 4 * 7 * 4 * 20)
    assert six_n_flops_per_token(get_config("tiny")) == {"forward": 2 * 20448, "training": 6 * 20448}
    # KV: (Dc + Dr) x L elements x 2 bytes
    assert kv_cache_bytes_per_token(get_config("tiny")) == (12 + 4) * 2 * 2
    mem = training_memory_bytes(get_config("tiny"), V3_PLAN)
    assert mem == {"weights": 2 * 31712, "master": 4 * 31712, "grads": 4 * 31712, "optimizer": 4 * 31712,
                   "total": 14 * 31712}
    assert training_memory_bytes(get_config("tiny"), FP32_ADAM_PLAN)["total"] == 18 * 31712
    assert training_memory_bytes(get_config("tiny"), PrecisionPlan(master=None))["master"] == 0


@pytest.mark.parametrize("name", MLA_PRESETS + ["deepseek-67b", "llama-3-70b-like", "qwen2.5-32b-like"])
def test_components_sum_and_agree_with_count_parameters(name):
    cfg = get_config(name)
    p = parameter_counts(cfg)
    assert set(p["components"]) == set(COMPONENTS)
    assert sum(v["total"] for v in p["components"].values()) == p["total"]
    assert sum(v["active"] for v in p["components"].values()) == p["active"]
    c = count_parameters(cfg)
    if name in MLA_PRESETS:
        assert (p["total"], p["active"]) == (c["total"], c["active"])
    else:  # count_parameters counts MLA attention; only the attention differs for a dense GQA model
        assert p["total"] - p["components"]["attention"]["total"] == c["total"] - c["attention"]
    # the 6N forward estimate is 2x active; the exact count at zero context differs only by norm gains
    # and biases (< 0.1% for real models; tiny's exact gap is checked in test_tiny_by_hand)
    f = forward_flops_per_token(cfg, 0)
    gap = six_n_flops_per_token(cfg)["forward"] - f["total"]
    assert 0 <= gap and (name == "tiny" or gap < 1e-3 * f["total"])


@pytest.mark.parametrize("name, total, active, dec", [("deepseek-v2", 236e9, 21e9, 0),
                                                        ("deepseek-v3", 671e9, 37e9, 0),
                                                        ("deepseek-v2-lite", 15.7e9, 2.4e9, 1),
                                                        ("deepseek-67b", 67e9, None, 0)])
def test_published_parameter_counts(name, total, active, dec):
    p = parameter_counts(get_config(name))
    assert round(p["total"] / 1e9, dec) == round(total / 1e9, dec)
    if name == "deepseek-v2-lite":  # 2.451B: the published "2.4B" is truncated, not rounded
        assert p["active"] == 2_451_435_008 and math.floor(p["active"] / 1e8) / 10 == 2.4
    elif active is not None:
        assert round(p["active"] / 1e9, dec) == round(active / 1e9, dec)


@pytest.mark.parametrize("name, n", [("deepseek-v2-lite", 15_706_484_224), ("deepseek-v2", 235_741_434_880),
                                     ("llama-3-70b-like", 70_553_706_496), ("qwen2.5-32b-like", 32_763_876_352)])
def test_totals_equal_hf_safetensors_counts(name, n):
    # Element counts of the HF hub checkpoints (safetensors metadata, read second-hand from public
    # copies; Llama-3.3-70B for the Llama-3-70B shape, Qwen2.5-32B-Instruct for Qwen).
    assert parameter_counts(get_config(name))["total"] == n


def test_v3_mtp_and_hf_total():
    cfg = get_config("deepseek-v3")
    p = parameter_counts(cfg)
    d, v = cfg.hidden_size, cfg.vocab_size
    # Our MTP count: one MoE decoder layer + eh_proj (2 D^2) + 5 norms = 11.610B. The published
    # "11.5B unique" equals it without eh_proj (11.507B): we keep eh_proj, it is a unique tensor.
    assert p["mtp"]["total"] == 11_610_068_224
    assert round((p["mtp"]["total"] - 2 * d * d) / 1e9, 1) == 11.5
    # HF's "685B" is the hub's safetensors element count 684,531,386,000 (second-hand, from public
    # copies of the hub metadata): 671B + MTP + layer 61's stored copies of embedding and head
    # (2 V D) + the FP32 weight_scale_inv of every 128x128 FP8 block of every linear in the 61 + 1
    # decoder layers (not gate, embedding, head, nor eh_proj, which is BF16). It matches exactly.
    hf = p["total"] + p["mtp"]["total"] + 2 * v * d
    assert round(hf / 1e9, 2) == 684.49
    blocks = lambda o, i: math.ceil(o / 128) * math.ceil(i / 128)  # noqa: E731
    attn = blocks(1536, d) + blocks(128 * 192, 1536) + blocks(576, d) + blocks(128 * 256, 512) + blocks(d, 128 * 128)
    expert = 2 * blocks(2048, d) + blocks(d, 2048)
    scales = 62 * attn + 3 * (2 * blocks(18432, d) + blocks(d, 18432)) + 59 * 257 * expert
    assert hf + scales == 684_531_386_000


def test_v3_gpu_hours_and_price_exactly():
    hours = sum(V3_GPU_HOURS.values())
    assert hours == 2_788_000
    cost = training_cost(hours, usd_per_gpu_hour=V3_USD_PER_GPU_HOUR, n_gpus=2048)
    assert cost["usd"] == 5_576_000
    assert 56 < cost["days"] < 57  # V3 §1: pre-training "in less than two months" on 2048 H800s
    # V3 §1: 180K GPU-hours per trillion tokens = 3.7 days on 2048 GPUs; 14.8T x 180K = 2664K
    assert 14.8 * 180_000 == pytest.approx(V3_GPU_HOURS["pre_training"])
    assert round(training_cost(180_000, usd_per_gpu_hour=2, n_gpus=2048)["days"], 1) == 3.7


def test_v3_implied_mfu():
    # Assumed dense peaks: H800 = H100 SXM, BF16 989 TFLOP/s, FP8 1979 TFLOP/s. Pre-training only
    # (2664K GPU-hours, 14.8T tokens). We solve for MFU rather than assert one.
    cfg = get_config("deepseek-v3")
    six_n = six_n_flops_per_token(cfg)["training"]  # 6 x 36.6B = 219.8 GFLOP/token
    exact = training_flops_per_token(cfg, 4096)    # + causal attention at 4K context: 250.5 GFLOP
    h = V3_GPU_HOURS["pre_training"]
    mfu_bf16 = implied_utilisation(V3_TRAINING_TOKENS, six_n, h, peak_flops=H800_PEAK_FLOPS["bf16"])
    mfu_fp8 = implied_utilisation(V3_TRAINING_TOKENS, six_n, h, peak_flops=H800_PEAK_FLOPS["fp8"])
    assert round(mfu_bf16, 3) == 0.343 and round(mfu_fp8, 3) == 0.171
    assert round(implied_utilisation(V3_TRAINING_TOKENS, exact, h, peak_flops=989e12), 3) == 0.391
    # and back: at the implied MFU, gpu_hours reproduces the published hours
    assert gpu_hours(V3_TRAINING_TOKENS, six_n, peak_flops=989e12, utilisation=mfu_bf16) == pytest.approx(h)
    # a plausible MFU band (20-50% of BF16 peak) brackets the published hours
    lo, hi = (gpu_hours(V3_TRAINING_TOKENS, exact, peak_flops=989e12, utilisation=u) for u in (0.5, 0.2))
    assert lo < h < hi


def test_kv_cache_reduction_vs_67b():
    v2, b67 = get_config("deepseek-v2"), get_config("deepseek-67b")
    assert kv_cache_bytes_per_token(b67, "bf16") == 8 * 128 * 2 * 95 * 2 == 389_120
    assert kv_cache_bytes_per_token(v2, "6bit") == 576 * 60 * 6 / 8 == 25_920
    assert round(100 * (1 - 25_920 / 389_120), 1) == 93.3  # V2 §1: "reduces the KV cache by 93.3%"
    reduction = 1 - kv_cache_bytes_per_token(v2, "6bit") / kv_cache_bytes_per_token(b67, "bf16")
    assert round(100 * reduction, 1) == 93.3
    by_elements = 1 - kv_cache_bytes_per_token(v2, "bf16") / kv_cache_bytes_per_token(b67, "bf16")
    assert round(100 * by_elements, 1) == 82.2
    assert kv_cache_bytes_per_token(get_config("deepseek-v3"), "bf16") == 576 * 61 * 2
    assert kv_cache_bytes_per_token(v2, "bf16", scheme="mla_naive") == 128 * 320 * 60 * 2


def test_dense_peers_by_hand():
    # Llama-3-70B-like: q,o 2*H*Dh*D, k,v 2*Hk*Dh*D, SwiGLU 3*D*I, 2 norms per layer, untied head.
    d, layers = 8192, 80
    per_layer = 2 * 64 * 128 * d + 2 * 8 * 128 * d + 3 * d * 28672 + 2 * d
    n = layers * per_layer + 2 * 128256 * d + d
    p = parameter_counts(get_config("llama-3-70b-like"))
    assert p["total"] == n and round(n / 1e9, 1) == 70.6 and p["active"] == n - 128256 * d
    assert kv_cache_bytes_per_token(get_config("llama-3-70b-like")) == 2 * 8 * 128 * 80 * 2
    # Qwen2.5-32B-like: as above with q/k/v biases (H + 2 Hk) Dh.
    d = 5120
    per_layer = 2 * 40 * 128 * d + 2 * 8 * 128 * d + (40 + 16) * 128 + 3 * d * 27648 + 2 * d
    n = 64 * per_layer + 2 * 152064 * d + d
    assert parameter_counts(get_config("qwen2.5-32b-like"))["total"] == n  # 32.76B
    # dense: forward FLOPs context term uses query heads: 2 T H (Dh + Dh) per layer
    f = forward_flops_per_token(get_config("qwen2.5-32b-like"), 10)
    assert f["attention_context"] == 64 * 2 * 10 * 40 * 256 and f["routed_experts"] == 0


def test_summary_collects_the_headline_figures():
    cfg = get_config("deepseek-v3")
    s = summary(cfg)
    assert (s["total"], s["active"], s["mtp"]) == (671_026_419_200, 36_625_618_432, 11_610_068_224)
    assert s["training_6n"] == 6 * s["active"] and s["kv_bytes_per_token"] == 70_272
    assert s["training_exact"] == training_flops_per_token(cfg, 4096)


def test_v3_mtp_flops_counted_apart():
    cfg = get_config("deepseek-v3")
    f = forward_flops_per_token(cfg, 0)
    assert f["mtp"] == 2 * parameter_counts(cfg)["mtp"]["active"] - 2 * (5 * 7168 + 256 + 1536 + 512)
    # ^ minus 5 norms, the gate bias and the q_a/kv_a latent norms
    assert training_flops_per_token(cfg, 4096, mtp=True) > training_flops_per_token(cfg, 4096)
    assert f["total"] == sum(v for k, v in f.items() if k not in ("total", "mtp"))


@pytest.mark.parametrize("call, arg", [
    (lambda: gpu_hours(-1, 1e9, peak_flops=1e15, utilisation=0.4), "tokens"),
    (lambda: gpu_hours(1e12, 1e9, peak_flops=1e15, utilisation=0.0), "utilisation"),
    (lambda: gpu_hours(1e12, 1e9, peak_flops=1e15, utilisation=1.5), "utilisation"),
    (lambda: gpu_hours(1e12, 1e9, peak_flops=-1, utilisation=0.5), "peak_flops"),
    (lambda: implied_utilisation(1e12, 1e9, 0, peak_flops=1e15), "hours"),
    (lambda: training_cost(-5, usd_per_gpu_hour=2), "hours"),
    (lambda: training_cost(5, usd_per_gpu_hour=2, n_gpus=0), "n_gpus"),
    (lambda: PrecisionPlan(weights="fp4"), "weights"),
    (lambda: PrecisionPlan(adam_v="double"), "adam_v"),
    (lambda: kv_cache_bytes_per_token(get_config("tiny"), "int3"), "cache_dtype"),
    (lambda: training_memory_bytes(get_config("tiny"), "bf16"), "plan"),
    (lambda: forward_flops_per_token(get_config("tiny"), -1), "context"),
    (lambda: forward_flops_per_token(get_config("tiny"), 1, attention_impl="flash"), "attention_impl"),
    (lambda: training_flops_per_token(get_config("tiny"), 0), "seq_len"),
    (lambda: get_config("gpt-5"), "name"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


def test_dsa_costs_reproduce_the_reference_arithmetic_for_v32():
    """Reference deepseek-v32.md §2.1 and §5: indexer parameters and the 128K decode FLOPs."""
    from refimpl.accounting import dsa_attention_costs, indexer_parameters
    cfg = get_config("deepseek-v32")
    assert indexer_parameters(cfg) == 851_524_864
    c = dsa_attention_costs(cfg, 131072)
    assert c["dense_flops"] / 61 == 278_528 * 131072                   # 36.5 GFLOP per layer
    assert c["sparse_flops"] / 61 == 278_528 * 2048                    # 0.57 GFLOP
    assert c["indexer_flops"] / 61 == 16_384 * 131072                  # 2.15 GFLOP
    assert round(c["dense_flops"] / 1e12, 2) == 2.23 and round(c["dsa_flops"] / 1e12, 3) == 0.166
    assert c["dsa_bytes"] / 61 == 2048 * 656 + 131072 * 132
    p = dsa_attention_costs(cfg, 131072, phase="prefill")
    assert p["dense_flops"] / 61 == 81_920 * 131072
    short = dsa_attention_costs(cfg, 1000)                             # below k: DSA only adds the indexer
    assert short["sparse_flops"] == short["dense_flops"] and short["dsa_bytes"] > short["dense_bytes"]
