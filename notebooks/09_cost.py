# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What it costs
#
# The story that made DeepSeek famous is cost. DeepSeek-V3 reports that its whole training run
# took 2.788M H800 GPU-hours, USD 5.576M at an assumed USD 2 per GPU-hour, for a model of 671B
# parameters of which only 37B are active for each token {cite}`deepseekai2024v3`; DeepSeek-V2
# before it reported a KV cache 93.3% smaller than that of the dense DeepSeek 67B
# {cite}`deepseekai2024v2,deepseekai2024llm`; and V3 trained most of its matrix products in
# 8-bit floating point. This chapter checks each of these claims from the model configurations
# themselves, with `refimpl.accounting` and `refimpl.quant`, and states every assumption that a
# number depends on. Nothing here is re-implemented: the code shown is the library's own source.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * compute parameters, FLOPs and KV-cache bytes of the released configurations;
# * check DeepSeek-V3's reported training cost and V2's cache claim, naming every assumption behind
#   them;
# * explain the FP8 formats, why V3 scales them per tile and per block, and what that costs in
#   accuracy.
# ```

# %%
import os

# The FP8 training experiment multiplies tiny matrices: BLAS threads only add synchronisation cost
# (set before NumPy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from refimpl.accounting import (  # noqa: E402
    DENSE_PRESETS,
    FP32_ADAM_PLAN,
    H800_PEAK_FLOPS,
    V3_GPU_HOURS,
    V3_PLAN,
    V3_TRAINING_TOKENS,
    V3_USD_PER_GPU_HOUR,
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
from refimpl.core import linear_backward, linear_forward  # noqa: E402
from refimpl.display import show_source  # noqa: E402
from refimpl.quant import (  # noqa: E402
    FP8_FORMATS,
    FP8Gemm,
    dequantize_activation,
    dequantize_weight,
    fp8_autocast,
    fp8_gemm,
    fp8_linear_backward,
    fp8_linear_forward,
    fp8_values,
    quantize_activation,
    quantize_rows,
    quantize_weight,
    round_to_fp8,
)
from refimpl.recipes.fp8_train import fp8_train_run, relative_loss_error  # noqa: E402

t_start = time.perf_counter()
rng = np.random.default_rng(0)
NAMES = {"deepseek-67b": "DeepSeek 67B", "deepseek-v2-lite": "V2-Lite", "deepseek-v2": "DeepSeek-V2",
         "deepseek-v3": "DeepSeek-V3", "llama-3-70b-like": "Llama-3-70B-like",
         "qwen2.5-32b-like": "Qwen2.5-32B-like"}
assert set(DENSE_PRESETS) <= set(NAMES)
CONFIGS = {name: get_config(name) for name in NAMES}
SUMMARY = {name: summary(cfg) for name, cfg in CONFIGS.items()}


# %% [markdown]
# ## Total and active parameters
#
# A mixture-of-experts model stores many experts but runs only a few per token. Its **total**
# parameters decide how much memory it needs; its **active** parameters, those one token's
# forward pass multiplies with, decide how much arithmetic it needs. `parameter_counts` counts
# both, component by component, from a config: for DeepSeek's MoE models only $K$ of the $E$
# routed experts are active, plus the shared experts, attention, the dense layers and the LM
# head (the embedding is a row lookup, not a product). V3's multi-token-prediction (MTP) module is
# counted apart, since it is not part of the model that serves (its unique parameters only: it
# shares the embedding and output head with the main model). The dense peers are
# "-like" configurations with the published shapes of Llama-3-70B and Qwen2.5-32B, built by
# `refimpl.accounting.DENSE_PRESETS`.

# %%
show_source(parameter_counts)

# %% tags=["hide-input"]
rows = ["| model | total | active | active / total | MTP (apart) |", "|---|---:|---:|---:|---:|"]
for name, s in SUMMARY.items():
    mtp = f"{s['mtp'] / 1e9:.2f}B" if s["mtp"] else "–"
    rows.append(f"| {NAMES[name]} | {s['total'] / 1e9:.2f}B | {s['active'] / 1e9:.2f}B | "
                f"{s['active'] / s['total']:.1%} | {mtp} |")
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(figsize=(9, 3.8))
x = np.arange(len(NAMES))
totals = np.array([SUMMARY[n]["total"] for n in NAMES]) / 1e9
actives = np.array([SUMMARY[n]["active"] for n in NAMES]) / 1e9
ax.bar(x - 0.2, totals, 0.4, label="total")
ax.bar(x + 0.2, actives, 0.4, label="active per token")
for xi, (t, a) in enumerate(zip(totals, actives, strict=True)):
    ax.annotate(f"{t:.0f}", (xi - 0.2, t), ha="center", va="bottom", fontsize=8)
    ax.annotate(f"{a:.1f}", (xi + 0.2, a), ha="center", va="bottom", fontsize=8)
ax.set_xticks(x, [NAMES[n] for n in NAMES], fontsize=8)
ax.set_yscale("log")
ax.set_ylabel("parameters (billions, log scale)")
ax.set_title("Stored vs used per token")
ax.legend(frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# The published figures, to the precision the papers give them: DeepSeek-V2 has 236B parameters
# with 21B active {cite}`deepseekai2024v2`, DeepSeek-V3 671B with 37B active
# {cite}`deepseekai2024v3`, and V2-Lite 15.7B with 2.4B active {cite}`deepseekai2024v2`. The
# first two round correctly; V2-Lite's active count, 2.45B, is **truncated** to 2.4B in the
# paper rather than rounded (it would round to 2.5B). The dense models have nearly all their
# parameters active (only the embedding table is not), and DeepSeek 67B's total matches its name.

# %%
P = {name: parameter_counts(cfg) for name, cfg in CONFIGS.items()}
assert round(P["deepseek-v2"]["total"] / 1e9) == 236 and round(P["deepseek-v2"]["active"] / 1e9) == 21
assert round(P["deepseek-v3"]["total"] / 1e9) == 671 and round(P["deepseek-v3"]["active"] / 1e9) == 37
assert round(P["deepseek-v2-lite"]["total"] / 1e8) == 157
assert int(P["deepseek-v2-lite"]["active"] / 1e8) == 24 and round(P["deepseek-v2-lite"]["active"] / 1e8) == 25
assert round(P["deepseek-67b"]["total"] / 1e9) == 67
for name in ("deepseek-67b", "llama-3-70b-like", "qwen2.5-32b-like"):
    p = P[name]
    # all but the lookup table
    assert p["total"] - p["active"] == p["components"]["embedding"]["total"]
v3_ratio = P["deepseek-v3"]["total"] / P["deepseek-v3"]["active"]
routed_share = P["deepseek-v3"]["components"]["routed_experts"]["total"] / P["deepseek-v3"]["total"]
print(f"V3 stores {v3_ratio:.1f}x the parameters it uses per token; its routed experts are "
      f"{routed_share:.1%} "
      "of the total")
assert v3_ratio > 18

# %% [markdown]
# ## Training FLOPs per token and V3's GPU-hours
#
# The usual estimate of training compute is $6N$ FLOPs per token for $N$ active parameters:
# $2N$ for the forward pass (one multiply and one add per weight) and twice that for the
# backward. It leaves out attention's scores and values, whose cost grows with the context.
# `training_flops_per_token` adds that term exactly: in causal training at sequence length $T$
# a token attends on average to $(T+1)/2$ keys. V3 was pre-trained at $T = 4096$
# {cite}`deepseekai2024v3`.

# %% tags=["hide-input"]
rows = ["| model | 6N (TFLOP/token) | exact at 4K (TFLOP/token) | exact / 6N |", "|---|---:|---:|---:|"]
for name, s in SUMMARY.items():
    rows.append(f"| {NAMES[name]} | {s['training_6n'] / 1e12:.3f} | {s['training_exact'] / 1e12:.3f} | "
                f"{s['training_exact'] / s['training_6n']:.3f} |")
    assert s["training_exact"] > s["training_6n"]                 # the context term only adds
display(Markdown("\n".join(rows)))

v3 = CONFIGS["deepseek-v3"]
fwd = forward_flops_per_token(v3, (4096 + 1) / 2)
print(f"V3 forward at average context 2048.5: attention-context term "
      f"{fwd['attention_context'] / fwd['total']:.1%} of {fwd['total'] / 1e9:.1f} GFLOP/token")
assert training_flops_per_token(v3, 4096) == 3 * fwd["total"]
mla_models, dense_models = list(NAMES)[1:4], ["deepseek-67b", *DENSE_PRESETS]
extra = {n: SUMMARY[n]["training_exact"] / SUMMARY[n]["training_6n"] for n in NAMES}
assert min(extra[n] for n in mla_models) > max(extra[n] for n in dense_models)
assert 1.12 < SUMMARY["deepseek-v3"]["training_exact"] / SUMMARY["deepseek-v3"]["training_6n"] < 1.16

# %% [markdown]
# The context term matters more for the MLA models than for the dense ones: V2's and V3's 128
# heads of 192-dimensional queries and keys make the scores expensive relative to the few active
# parameters. For V3 it adds about 14% to $6N$.
#
# **The USD 5.576M.** DeepSeek-V3's Table 1 gives 2.664M H800 GPU-hours of pre-training, 0.119M of
# context extension and 0.005M of post-training, and prices them at an assumed rental of USD 2 per
# GPU-hour {cite}`deepseekai2024v3`. This figure is the final run only; the paper says it
# excludes the cost of prior research and ablation experiments. On the 2,048 GPUs of V3's cluster it is about
# eight weeks.

# %%
hours = sum(V3_GPU_HOURS.values())
cost = training_cost(hours, usd_per_gpu_hour=V3_USD_PER_GPU_HOUR, n_gpus=2048)
print(f"{hours:,} GPU-hours x ${V3_USD_PER_GPU_HOUR:.2f} = ${cost['usd']:,.0f}; "
      f"{cost['days']:.1f} days on 2,048 GPUs")
assert hours == 2_788_000 and cost["usd"] == 5_576_000.0
assert 7 < cost["days"] / 7 < 9

# %% [markdown]
# **What utilisation does that imply?** The paper does not report a model FLOPs utilisation
# (MFU), so instead of assuming one we *solve* for it: the fraction of peak at which 14.8T
# tokens × FLOPs per token take 2.664M GPU-hours. The answer depends on the peak assumed.
# **Assumption:** the H800's dense (no sparsity) tensor-core peaks are those of the H100 SXM, 989
# TFLOP/s in BF16 and 1979 TFLOP/s in FP8 (the H800 is an export variant of the H100 whose main
# difference is reduced NVLink bandwidth). V3 runs its large GEMMs in FP8 but attention, the
# router and several other operators in BF16 or higher, so the true effective peak lies between
# the two. The exact FLOPs include the MTP module, which V3 trained with.

# %%
show_source(implied_utilisation, gpu_hours, checks=False)

# %% tags=["hide-input"]
pre_hours = V3_GPU_HOURS["pre_training"]
estimates = {"6N": six_n_flops_per_token(v3)["training"],
             "exact at 4K, with MTP": training_flops_per_token(v3, 4096, mtp=True)}
rows = ["| FLOPs per token | TFLOP/token | MFU at BF16 peak (989T) | MFU at FP8 peak (1979T) |",
        "|---|---:|---:|---:|"]
mfu = {}
for label, f in estimates.items():
    mfu[label] = {k: implied_utilisation(V3_TRAINING_TOKENS, f, pre_hours, peak_flops=p)
                  for k, p in H800_PEAK_FLOPS.items()}
    rows.append(f"| {label} | {f / 1e12:.3f} | {mfu[label]['bf16']:.1%} | {mfu[label]['fp8']:.1%} |")
    # solving and re-deriving the hours agree
    for k, p in H800_PEAK_FLOPS.items():
        assert np.isclose(gpu_hours(V3_TRAINING_TOKENS, f, peak_flops=p, utilisation=mfu[label][k]), pre_hours)
display(Markdown("\n".join(rows)))
assert H800_PEAK_FLOPS == {"bf16": 989e12, "fp8": 1979e12}
exact_mfu = mfu["exact at 4K, with MTP"]
assert 0.15 < exact_mfu["fp8"] < 0.25 and 0.35 < exact_mfu["bf16"] < 0.45      # "roughly 20% / 40%"

# %% [markdown]
# The implied MFU is roughly 20% of the FP8 peak or 40% of the BF16 peak: plausible for a
# large MoE run whose experts are spread over many nodes, where all-to-all communication,
# pipeline bubbles and the non-GEMM operators take a large share of the time. The claim is
# therefore consistent; what the GPU-hour figure does *not* say is what the experiments that
# led to the final run cost.
#
# ## KV cache per token
#
# At serving time the KV cache, not the weights, decides how many sequences fit on a GPU and how
# long they can be; every decoding step also reads all of it. Per token, DeepSeek 67B (GQA with 8
# key/value heads, 95 layers) caches $2 \times 8 \times 128$ numbers per layer; the dense peers
# also use GQA; V2 and V3 cache MLA's 512-dimensional latent plus a 64-dimensional rope key per
# layer, $(D_c + D_r)\,L\,b$ bytes per token by {eq}`eq-mla-cache` (chapter {doc}`03_mla`).

# %% tags=["hide-input"]
rows = ["| model | KV cache per token (bf16) | at 128K context |", "|---|---:|---:|"]
for name, cfg in CONFIGS.items():
    b = kv_cache_bytes_per_token(cfg, "bf16")
    assert b == SUMMARY[name]["kv_bytes_per_token"]
    rows.append(f"| {NAMES[name]} | {b / 2**10:,.1f} KiB | {b * 2**17 / 2**30:,.1f} GiB |")
display(Markdown("\n".join(rows)))

context = np.logspace(np.log10(256), np.log10(131072), 40)
fig, ax = plt.subplots(figsize=(8, 4))
for i, name in enumerate(n for n in NAMES if n != "deepseek-v2-lite"):
    b = kv_cache_bytes_per_token(CONFIGS[name], "bf16")
    ax.loglog(context, b * context, color=f"C{i}", label=f"{NAMES[name]} ({b / 2**10:,.0f} KiB/token)")
b6 = kv_cache_bytes_per_token(CONFIGS["deepseek-v2"], "6bit")
ax.loglog(context, b6 * context, color="C1", ls=":", label=f"DeepSeek-V2, 6-bit cache ({b6 / 2**10:,.0f} KiB/token)")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("KV cache per sequence (bytes, bf16 unless noted)")
ax.grid(True, which="major", alpha=0.3)
ax.legend(fontsize=8, frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# DeepSeek-V2's "93.3% smaller KV cache" compares a V2 cache quantised to about 6 bits per
# element (V2 §3.2.3) with a bf16 67B cache. By element count alone, both in bf16, the reduction
# is 82.2%; chapter {doc}`03_mla` derives both. Against the dense GQA peers, which cache 8
# key/value heads of 128 numbers in each of 80 or 64 layers, V3's bf16 cache is 3.7–4.7 times
# smaller.

# %%
b67 = kv_cache_bytes_per_token(CONFIGS["deepseek-67b"], "bf16")
bv2 = kv_cache_bytes_per_token(CONFIGS["deepseek-v2"], "bf16")
print(f"V2 6-bit vs 67B bf16: {1 - b6 / b67:.1%} smaller;  V2 bf16 vs 67B bf16: "
      f"{1 - bv2 / b67:.1%} smaller")
assert round(100 * (1 - b6 / b67), 1) == 93.3 and round(100 * (1 - bv2 / b67), 1) == 82.2
bv3 = kv_cache_bytes_per_token(v3, "bf16")
# eq-mla-cache, b = 2
assert bv3 == (v3.kv_lora_rank + v3.qk_rope_head_dim) * v3.num_hidden_layers * 2
for peer in DENSE_PRESETS:
    ratio = kv_cache_bytes_per_token(CONFIGS[peer], "bf16") / bv3
    print(f"{NAMES[peer]} caches {ratio:.2f}x V3's bytes per token")
    assert 3.5 < ratio < 5

# %% [markdown]
# ## Memory for weights and optimizer state
#
# Training keeps more than the weights. DeepSeek-V3's precision plan (§3.3.3) keeps BF16
# working weights (cast to FP8 block by block for each GEMM), an FP32 master copy, FP32
# gradient accumulation, and the two AdamW moments in BF16; the classic mixed-precision plan
# keeps both moments in FP32. `training_memory_bytes` counts these over *all* parameters
# (activations, the KV cache, communication buffers and sharding are not counted).

# %%
show_source(training_memory_bytes, checks=False)

# %% tags=["hide-input"]
n_v3 = P["deepseek-v3"]["total"]
rows = ["| plan | weights | master | grads | optimizer | total | bytes / parameter |",
        "|---|---:|---:|---:|---:|---:|---:|"]
mem = {}
for label, plan in (("V3 (BF16 moments)", V3_PLAN), ("FP32 Adam", FP32_ADAM_PLAN)):
    m = mem[label] = training_memory_bytes(v3, plan)
    rows.append(f"| {label} | " + " | ".join(f"{m[k] / 1e12:.2f} TB" for k in
                                              ("weights", "master", "grads", "optimizer", "total"))
                + f" | {m['total'] / n_v3:.0f} |")
display(Markdown("\n".join(rows)))
assert mem["V3 (BF16 moments)"]["total"] == 14 * n_v3 and mem["FP32 Adam"]["total"] == 18 * n_v3
saved = mem["FP32 Adam"]["total"] - mem["V3 (BF16 moments)"]["total"]
saving = saved / mem["FP32 Adam"]["total"]
per_gpu = mem["V3 (BF16 moments)"]["total"] / 2048 / 2**30
print(f"V3's plan saves {saving:.1%} ({saved / 1e12:.2f} TB); spread evenly over 2,048 GPUs it is "
      f"{per_gpu:.1f} GiB each")
assert np.isclose(saving, 4 / 18) and per_gpu < 80e9 / 2**30

# %% [markdown]
# With BF16 working weights and FP32 master weights and gradients (2 + 4 + 4 bytes), the moments
# are the rest: 4 bytes in BF16 against 8 in FP32, so V3's plan needs 14 bytes per parameter
# against 18, 2.7 TB less for V3. Even the whole state of a
# 671B model fits comfortably in 2,048 GPUs of 80 GB once it is spread across them; the hard
# part is arranging the spreading so that communication stays hidden.
#
# ## FP8 in pictures
#
# An FP8 number has a sign, a few exponent bits and a few mantissa bits. **E4M3** (4 exponent,
# 3 mantissa bits) reaches only ±448 but spaces its values more finely; **E5M2** reaches ±57344
# with half the precision. V3 uses E4M3 for all tensors, forward and backward, and recovers range
# with fine-grained scales {cite}`deepseekai2024v3`. `fp8_values` decodes every bit pattern:

# %% tags=["hide-input"]
grids = {fmt: fp8_values(fmt) for fmt in ("e4m3", "e5m2")}
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
for i, (fmt, v) in enumerate(grids.items()):
    pos = v[v > 0]
    ax0.vlines(pos, i - 0.35, i + 0.35, color=f"C{i}", lw=0.6)
    gap = np.diff(pos) / pos[:-1]                                      # relative spacing to the next value
    ax1.semilogx(pos[:-1], gap, ".", color=f"C{i}", ms=3, label=fmt.upper())
    f = FP8_FORMATS[fmt]
    print(f"{fmt.upper()}: {len(v)} finite non-negative values, smallest subnormal {f.min_subnormal:.3g}, "
          f"smallest normal {f.min_normal:.3g}, max {f.max:g}")
ax0.set_xscale("log")
ax0.set_yticks([0, 1], ["E4M3", "E5M2"])
ax0.set_xlabel("positive representable values (log scale)")
ax1.set_xlabel("value")
ax1.set_ylabel("gap to next value / value")
ax1.legend(frameon=False)
fig.tight_layout()
plt.show()
assert len(grids["e4m3"]) == 127 and len(grids["e5m2"]) == 124              # with zero; NaN/inf excluded
assert grids["e4m3"][-1] == 448 and grids["e5m2"][-1] == 57344
assert FP8_FORMATS["e4m3"].min_subnormal == 2.0**-9 and FP8_FORMATS["e5m2"].min_subnormal == 2.0**-16
for fmt, v in grids.items():
    assert np.array_equal(round_to_fp8(v, fmt), v)                       # every value round-trips
    normal = v[v >= FP8_FORMATS[fmt].min_normal]
    gaps = np.diff(normal) / normal[:-1]
    assert np.isclose(gaps.max(), 2.0 ** -FP8_FORMATS[fmt].mantissa_bits)  # 12.5% (E4M3), 25% (E5M2)

# %% [markdown]
# In the normal range the gap between neighbours is at most $2^{-3} = 12.5\%$ of the value for
# E4M3 and $2^{-2} = 25\%$ for E5M2, so rounding to nearest errs by at most half that; below the
# smallest normal the subnormals space values evenly and the *relative* gap grows until values
# flush to zero. Range, not precision, is what a scale must manage.
#
# ### Block-wise vs per-tensor scaling
#
# To use the grid, a tensor is divided by a scale $s = \mathrm{amax}/448$ so that its largest
# magnitude lands on 448. With one scale per tensor, a single large outlier pushes every other
# value down toward the subnormals, where it loses precision or flushes to zero. V3 instead uses
# one scale per 1×128 tile of activations and per 128×128 block of weights, so an outlier coarsens
# only its own tile:

# %%
show_source(quantize_activation, checks=False)

# %% [markdown]
# The experiment: activations of 64 tokens × 1024 channels, standard normal, with one outlier
# channel (as LLM activations have) whose entries have magnitude $A$. We quantise with one
# scale for the whole tensor, one per token (row), and one per 1×128 tile (all with
# `quantize_activation`, the tile being the whole tensor, the row, or 128 channels), and measure
# the relative error $\lVert \hat x - x \rVert / \lVert x \rVert$ over the ordinary entries, the
# ones an outlier should not be allowed to spoil.

# %% tags=["hide-input"]
M, K = 64, 1024
base = rng.standard_normal((M, K))
outlier_channel = 300
ordinary = np.ones(K, dtype=bool)
ordinary[outlier_channel] = False
magnitudes = np.logspace(0, 6, 25)


def bulk_error(x, block, rows):
    """Relative error on the ordinary channels after quantising x reshaped to `rows` rows."""
    xr = x.reshape(rows, -1)
    q, s = quantize_activation(xr, block=block)
    x_hat = dequantize_activation(q, s, block=block).reshape(x.shape)
    return np.linalg.norm((x_hat - x)[:, ordinary]) / np.linalg.norm(x[:, ordinary])


schemes = {"per-tensor": lambda x: bulk_error(x, M * K, 1),
           "per-token (1×1024)": lambda x: bulk_error(x, K, M),
           "block-wise (1×128)": lambda x: bulk_error(x, 128, M)}
errors = {label: [] for label in schemes}
for a in magnitudes:
    x = base.copy()
    x[:, outlier_channel] = a * np.sign(base[:, outlier_channel])
    for label, fn in schemes.items():
        errors[label].append(fn(x))
errors = {k: np.array(v) for k, v in errors.items()}

fig, ax = plt.subplots(figsize=(7.5, 4))
for label, err in errors.items():
    ax.loglog(magnitudes, err, "o-", ms=3, label=label)
ax.set_xlabel("outlier magnitude $A$ (ordinary entries ~ N(0, 1))")
ax.set_ylabel("relative error on ordinary entries")
ax.grid(True, which="major", alpha=0.3)
ax.legend(frameon=False)
fig.tight_layout()
plt.show()

blk, tensor = errors["block-wise (1×128)"], errors["per-tensor"]
wins = blk < 0.5 * tensor
threshold = magnitudes[np.argmax(wins & np.flip(np.cumprod(np.flip(wins))).astype(bool))]
print(f"no outlier (A=1): per-tensor {tensor[0]:.2%}, block-wise {blk[0]:.2%}")
print(f"block-wise error is under half the per-tensor error for every A >= {threshold:.0f}")
print(f"at A = {magnitudes[-1]:.0e}: per-tensor {tensor[-1]:.1%}, per-token {errors['per-token (1×1024)'][-1]:.1%}, "
      f"block-wise {blk[-1]:.2%}")
assert tensor[0] < 0.05 and blk[0] < 0.05                        # without outliers both are fine
subnormal_onset = FP8_FORMATS["e4m3"].max / FP8_FORMATS["e4m3"].min_normal   # A at which 1.0 scales to 2**-6
print(f"per-tensor scaling puts an entry of 1.0 below E4M3's smallest normal once A > {subnormal_onset:,.0f}")
assert np.all(wins[magnitudes >= threshold]) and 1e4 < threshold < 1e5
assert np.allclose(blk[magnitudes < 1e4], tensor[magnitudes < 1e4], rtol=0.05)   # no difference below ~1e4
assert tensor[-1] > 0.9 and blk[-1] < np.sqrt(1 / 8) * 1.01      # only the outlier's tile (1 in 8) is lost
assert np.all(blk <= tensor * 1.05)                               # block-wise never meaningfully worse

# %% [markdown]
# Without outliers all three schemes lose about 2.6%, E4M3's rounding error. Because FP8 is a
# floating-point format, its relative precision does not depend on the scale while values stay
# in the normal range, so up to outliers of about $10^4$ the three schemes are
# indistinguishable. Beyond that the
# per-tensor scale pushes the ordinary entries into the subnormals and then to zero, and the
# error climbs toward 100%. Per-token scaling fails the same way here, since every token carries
# the outlier channel. Block-wise scaling confines the damage to the one tile in eight that holds
# the outlier channel; the other seven keep E4M3's precision, so the error is under half the
# per-tensor error from $A \approx 5 \times 10^4$ and at worst approaches
# $\sqrt{1/8} \approx 35\%$, the share of the ordinary entries that sit in outlier tiles. Finer
# scales also matter for another reason that this experiment, which computes each scale from the
# exact current maximum, does not show: a per-tensor scale is often taken from the history of
# maxima ("delayed scaling"), which a new, larger outlier saturates. V3 computes its tile scales online
# {cite}`deepseekai2024v3`.
#
# ### The block GEMM with FP32 promotion
#
# An FP8 GEMM multiplies the quantised values and applies the two scales afterwards, once per
# 128-wide block of the contraction: $y_{ij} = \sum_b s^x_{ib}\, s^w_{jb} \sum_{k\in b}
# q^x_{ik} q^w_{jk}$. V3 promotes each block's partial sum to an FP32 accumulator, because the
# H800's tensor cores keep only about 14 bits while accumulating FP8 products
# {cite}`deepseekai2024v3`. (The emulation computes the inner sums in float32 and does not model
# the 14-bit accumulator.)

# %%
show_source(fp8_gemm, checks=False)

# %%
xa = rng.standard_normal((64, 512))
wa = rng.standard_normal((256, 512)) / np.sqrt(512)
xq, xs = quantize_activation(xa)
wq, ws = quantize_weight(wa)
y = fp8_gemm(xq, xs, wq, ws)
x_hat, w_hat = dequantize_activation(xq, xs).astype(np.float64), dequantize_weight(wq, ws).astype(np.float64)
# float64 product of the FP8 operands
exact_deq = x_hat @ w_hat.T
# float64 product of the originals
exact = xa @ wa.T
acc_err = np.linalg.norm(y - exact_deq) / np.linalg.norm(exact_deq)
quant_err = np.linalg.norm(y - exact) / np.linalg.norm(exact)
print(f"FP8 GEMM vs float64 product of the dequantised operands: {acc_err:.1e} (accumulation error)")
print(f"FP8 GEMM vs float64 product of the original operands:    {quant_err:.1e} (quantisation "
      "error)")
assert acc_err < 1e-6 < 1e-3 < quant_err < 0.05

# %% [markdown]
# The scaled block accumulation adds only float32 rounding, about $10^{-7}$; all of the error
# that matters comes from rounding both operands to E4M3 (about 2.6% each, as in the experiment
# above), which together make a few percent in the product. For training, `fp8_linear_forward` wraps this GEMM as a
# layer, and `fp8_linear_backward` treats quantisation as the identity (a straight-through
# estimator), so the gradients are those of the float layer at the dequantised operands:

# %%
y_lin, cache = fp8_linear_forward(xa, wa)
dy = rng.standard_normal(y_lin.shape)
dx, dw = fp8_linear_backward(dy, cache)
assert np.allclose(y_lin, y, rtol=1e-5, atol=1e-5)
assert np.allclose(dx, dy @ w_hat, rtol=1e-10, atol=1e-10) and np.allclose(dw, dy.T @ x_hat, rtol=1e-10, atol=1e-10)
rel = np.linalg.norm(dx - dy @ wa) / np.linalg.norm(dy @ wa)
print(f"input gradient vs the unquantised layer's: relative difference {rel:.1e}")
assert rel < 0.05

# %% [markdown]
# ## Training in FP8
#
# One FP8 GEMM is a kernel; training in FP8 runs every large product of a training step that
# way. DeepSeek-V3's recipe (§3.3) {cite}`deepseekai2024v3`:
#
# * **In FP8 (E4M3):** all three GEMMs of every linear layer, the forward product (Fprop,
#   $y = xW^\top$), the input gradient (Dgrad, $dx = dy\,W$) and the weight gradient (Wgrad,
#   $dW = dy^\top x$), with scales computed online from the max-abs value of each 1×128 tile of
#   activations and gradients and of each 128×128 block of weights, and partial sums promoted to
#   FP32 every 128 elements.
# * **In BF16 or FP32:** the embedding, the output head, the MoE gate, the normalisations and the
#   attention operator; master weights and gradient accumulation in FP32, AdamW moments in BF16.
#
# With this recipe V3 reports a relative loss error against the same training in BF16 that stays
# below 0.25% {cite}`deepseekai2024v3`.
#
# `refimpl.quant.fp8_autocast` applies the recipe to refimpl's NumPy model. Inside the `with`
# block every `linear_forward` and every routed expert's GEMMs compute their three products with
# `FP8Gemm`; the output head is named in `exclude` and stays in float32. The MoE gate, attention's
# score and value products, the norms and the embedding lookup never pass through those two
# places, so they stay in float32 too, as do the master weights, the gradients and both AdamW
# moments (V3 keeps the moments in BF16; here they are not the point). The backward is a
# straight-through estimator, quantisation counting as the identity, and its two GEMMs run on FP8
# operands as well: Dgrad quantises $dy$ in tiles along the output axis and reuses the weight's
# square blocks, and Wgrad, which sums over tokens, quantises $dy^\top$ and $x^\top$ in tiles
# along the token axis.

# %%
show_source(FP8Gemm.fprop, FP8Gemm.dgrad, FP8Gemm.wgrad)

# %% [markdown]
# The hook changes nothing but the products. With 128-element tiles, the linear layer under
# `fp8_autocast` returns exactly the block GEMM of the previous section, its backward is the
# float64 product of the quantised gradient and the dequantised weight up to float32 accumulation,
# and outside the block `linear_forward` is the plain float product again:

# %%
with fp8_autocast(tile=128):
    y_hook, c_hook = linear_forward(xa, wa)
assert np.array_equal(y_hook, y.astype(xa.dtype))                  # the FP8 GEMM above, bit for bit
dx_hook, dw_hook, _ = linear_backward(dy, c_hook)
dq, ds = quantize_rows(dy, 128)
# exact in float64
dy_hat = dequantize_activation(dq.astype(np.float64), ds.astype(np.float64), 128)
assert np.allclose(dx_hook, dy_hat @ w_hat, rtol=1e-5, atol=1e-5 * np.abs(dy_hat @ w_hat).max())
assert np.array_equal(linear_forward(xa, wa)[0], xa @ wa.T)         # off: the float layer again
print(f"FP8 Dgrad vs the exact straight-through gradient dy·Ŵ: relative difference "
      f"{np.linalg.norm(dx_hook - dy @ w_hat) / np.linalg.norm(dy @ w_hat):.1e}")

# %% [markdown]
# ### The experiment
#
# The tiny DeepSeek-V3 of chapter {doc}`05_tiny_v3` (MLA, a dense and an MoE layer, MTP) is trained
# on column addition from the same initial weights, on the same batches, with the same optimizer,
# once in float32 and once under `fp8_autocast`. Its widths are 16 to 128, smaller than V3's
# 128-element tiles, so the tiles here are 32 wide (**a deliberate change from V3**; a width that 32
# does not divide, such as the 16-dimensional KV latent, gets one shorter tile, padded with zeros).
# Three more runs serve as yardsticks:
#
# * **BF16**, V3's own baseline: `bf16_autocast` rounds the operands of the same GEMMs to
#   bfloat16 (8 significant bits; FP8's E4M3 has 4) and multiplies in float32;
# * **float64** from the same start on the same batches: its gap to float32 is what ordinary
#   float32 rounding does to the curves;
# * **float32 with the batches in another order**: how far apart two equally valid runs end.
#
# Each final model is then evaluated on 64 freshly drawn problems. `fp8_train_run` is in
# `refimpl.recipes`; `python -m refimpl fp8-train --steps 1000` runs it longer.
#
# **The verdict first** (asserted under the plots): the FP8 run learns as much as the float32
# run; it stays within 3% of the BF16 run per step on average, more than V3's 0.25% at this toy
# scale, and drifts from float32 about as far as the BF16 run does.

# %%
fp8_run = fp8_train_run(steps=150, seed=0, tile=32, progress=False, cache_dir="_cache")
FP8_STEPS = fp8_run["train_config"].steps
l32, l8, l16 = fp8_run["loss_fp32"], fp8_run["loss_fp8"], fp8_run["loss_bf16"]
rel8, rel8_bf16 = fp8_run["relative_error"], fp8_run["relative_error_vs_bf16"]
rel16, rel_ctl = fp8_run["bf16_relative_error"], fp8_run["control_relative_error"]

kinds = {}
for kind, m_, n_, k_ in fp8_run["gemms"]:
    kinds[kind] = kinds.get(kind, 0) + 2 * m_ * n_ * k_
cfg_t = fp8_run["config"]
# main head + MTP head positions per step
tokens = 16 * 64 + 16 * 63
# its Fprop, Dgrad and Wgrad, in float32
head_flops = 3 * 2 * tokens * cfg_t.hidden_size * cfg_t.vocab_size
fp8_share = sum(kinds.values()) / (sum(kinds.values()) + head_flops)
print(f"one step: {len(fp8_run['gemms'])} FP8 GEMMs, "
      + ", ".join(f"{k} {v / 1e6:.0f} MFLOP" for k, v in kinds.items())
      + f"; output head {head_flops / 1e6:.0f} MFLOP in float32 -> {fp8_share:.0%} of linear-layer FLOPs in FP8")
assert set(kinds) == {"fprop", "dgrad", "wgrad"} and 0.8 < fp8_share < 1

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.9))
steps_axis = np.arange(1, FP8_STEPS + 1)
ax0.plot(steps_axis, l32, label="float32", lw=1.2)
ax0.plot(steps_axis, l16, label="BF16 GEMMs", lw=1.0)
ax0.plot(steps_axis, l8, label="FP8 GEMMs (E4M3, tile 32)", lw=1.0)
ax0.set_xlabel("step")
ax0.set_ylabel("training loss (next-token CE)")
ax0.set_yscale("log")
ax0.legend(frameon=False)
ax1.semilogy(steps_axis, rel8_bf16, ".", ms=3, color="C2", label="FP8 vs BF16, per step")
ax1.semilogy(steps_axis, relative_loss_error(l8, l16, window=10), color="C2", label="FP8 vs BF16, 10-step means")
ax1.semilogy(steps_axis, relative_loss_error(l16, l32, window=10), color="C1", label="BF16 vs float32, 10-step means")
ax1.semilogy(steps_axis, np.maximum(rel_ctl, 1e-9), color="0.5", lw=1, label="float32 vs float64, per step")
ax1.axhline(0.0025, color="k", ls="--", lw=1, label="V3: FP8 vs BF16 < 0.25%")
ax1.set_xlabel("step")
ax1.set_ylabel("relative loss error")
ax1.legend(frameon=False, fontsize=8)
fig.tight_layout()
plt.show()

ev = fp8_run["eval_loss"]
rows = ["| final model | loss on fresh problems, float forward | FP8 forward |", "|---|---:|---:|"]
for name, v in ev.items():
    rows.append(f"| {name} | {v['float']:.4f} | {v['fp8']:.4f} |")
display(Markdown("\n".join(rows)))
ev_ref = ev["fp32 weights"]["float"]
gap = {name: v["float"] / ev_ref - 1 for name, v in ev.items()}
gap_reading = ev["fp32 weights"]["fp8"] / ev_ref - 1
print(f"relative loss error, FP8 vs BF16 (V3's measure): mean {rel8_bf16.mean():.2%} per step "
      f"(max {rel8_bf16.max():.1%}); last 10 steps' means {fp8_run['final_relative_error_vs_bf16']:.2%}")
print(f"vs float32: FP8 mean {rel8.mean():.2%}, BF16 mean {rel16.mean():.2%}; float64 mean "
      f"{rel_ctl.mean():.3%}")
print("fresh problems, vs the float32 model: " + ", ".join(f"{k} {v:+.2%}" for k, v in gap.items() if v)
      + f"; the float32 model read with FP8 GEMMs {gap_reading:+.2%}")
print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in fp8_run["seconds"].items())
      + (" (measured when the result was computed; this build loaded it from the cache)" if fp8_run["cached"] else ""))
assert (l8[0] - l8[-1]) > 0.9 * (l32[0] - l32[-1]) > 2          # all learn, by as much
# not float32 rounding
assert rel8.mean() > 20 * rel_ctl.mean() and rel16.mean() > 20 * rel_ctl.mean()
# ~1%
assert 0.0025 < fp8_run["final_relative_error_vs_bf16"] < 0.03 and 0.005 < rel8_bf16.mean() < 0.03
# FP8 drifts from float32 about as far as BF16
assert 0.5 < rel8.mean() / rel16.mean() < 2
# the float64 gap grows
assert rel_ctl[:10].max() < 1e-6 and rel_ctl[-10:].max() > 100 * rel_ctl[:10].max()
assert abs(gap_reading) < 0.005 and max(abs(v) for v in gap.values()) < 0.05

# %% [markdown]
# All four runs learn the task at the same pace. Measured as V3 measures it, against the BF16
# run, the FP8 run's relative loss error averages about 1.3% per step, the means of the last ten
# steps differ by about 0.65%, and single steps reach 6%: several times V3's 0.25%. But the BF16
# run is just as far from float32 (about 1.6% per step on average, against 1.2% for FP8), although
# it rounds sixteen times more finely. Only the float64 run stays close, 0.02% on average, and
# even its gap grows from about $10^{-8}$ at the start to about $10^{-3}$ by the end: training
# amplifies small differences, and BF16's and FP8's larger ones reach the percent level within a
# few dozen steps. So on this model and budget the number measures how far two runs with different
# arithmetic drift apart, not a cost that FP8 adds on top of BF16. The evaluation on
# fresh problems tells the same story: reading the float32 model with FP8 GEMMs changes its loss by
# only about 0.1%, while the final models of the runs differ by a few percent among themselves,
# the BF16 one included. With a single seed and 150 steps of a model of about $10^5$ parameters,
# still learning fast, that is as far as this experiment can see; V3's 0.25% concerns its own, far
# larger models.
#
# **What the emulation captures:** the E4M3 grid exactly (every operand is rounded as the format
# defines), online max-abs scales per 1×$N_c$ tile and $N_c$×$N_c$ block, FP32 promotion of each
# tile's partial sum, FP8 operands in all three GEMMs, the straight-through backward, and which
# operators stay in high precision. **What it does not:** any speed-up. FP8 values are stored in
# float32 arrays and every quantisation is extra work, so on a CPU the FP8 run is several times
# *slower* than the float32 one (the wall times above); on an H800 the gain comes from tensor
# cores that multiply FP8 at twice the BF16 rate (the 1979 vs 989 TFLOP/s peaks assumed above) and
# from moving half the bytes. Nor does it model the ~14-bit accumulation inside a tensor core's
# 128-element partial sums, V3's other memory savings (the E5M6 cache before the attention output
# projection, FP8-cached SwiGLU inputs, FP8 MoE dispatch, BF16 optimizer moments), BF16 anywhere
# but the GEMM operands of the baseline, or 128-wide tiles, which the tiny model's widths do not
# allow.
#
# ## Price per million tokens
#
# When DeepSeek-R1 {cite}`deepseekai2025r1` was released in January 2025, its API listed
# \$0.55 per million input tokens (\$0.14 when the prompt prefix is already cached) and \$2.19 per
# million output tokens, the reasoning tokens included {cite}`deepseek2025pricing`. OpenAI's o1,
# the model R1 was compared with, listed \$15 per million input tokens (\$7.50 cached) and \$60 per
# million output tokens {cite}`openai2024pricing`. List prices change, and these are the ones
# published at the time, with their sources; the ratios below are computed from them.

# %% tags=["hide-input"]
LIST_PRICE = {  # USD per million tokens, as published (see the two citations above)
    "DeepSeek-R1 (deepseek-reasoner)": {"input": 0.55, "cached input": 0.14, "output": 2.19},
    "OpenAI o1": {"input": 15.00, "cached input": 7.50, "output": 60.00},
}
r1_price, o1_price = LIST_PRICE["DeepSeek-R1 (deepseek-reasoner)"], LIST_PRICE["OpenAI o1"]
rows = ["| model | input | cached input | output |", "|---|---:|---:|---:|"]
# (dollar signs escaped: the rendered markdown would otherwise read "$0.55 | $0.14" as math)
rows += [f"| {m} | \\${p['input']:.2f} | \\${p['cached input']:.2f} | \\${p['output']:.2f} |"
         for m, p in LIST_PRICE.items()]
price_ratio = {k: o1_price[k] / r1_price[k] for k in r1_price}
rows.append("| o1 / R1 | " + " | ".join(f"{price_ratio[k]:.1f}x" for k in ("input", "cached input", "output")) + " |")
display(Markdown("\n".join(rows)))
# A reasoning answer is mostly output tokens: 1,000 prompt tokens and 8,000 tokens of thought and answer
job = {"input": 1_000, "output": 8_000}
job_usd = {m: sum(p[k] * n for k, n in job.items()) / 1e6 for m, p in LIST_PRICE.items()}
for m, usd in job_usd.items():
    print(f"{m}: ${usd:.4f} for one answer with {job['input']:,} prompt and {job['output']:,} output tokens")
assert 26 < price_ratio["output"] < 28 and 26 < price_ratio["input"] < 28
assert 26 < job_usd["OpenAI o1"] / job_usd["DeepSeek-R1 (deepseek-reasoner)"] < 28

# %% [markdown]
# At list prices, o1 cost about 27 times as much as R1 per token, in and out. What the configs
# *can* tell us is how hardware cost turns into a price per token, which says how much of that
# gap an efficient architecture can explain. A GPU that rents for $p$ per hour
# and produces $r$ tokens per hour costs $10^6 p / r$ per million tokens, and
#
# $$ r = \frac{3600 \cdot \text{peak} \cdot \text{MFU}}{\text{forward FLOPs per token}}. $$
#
# **Hypothetical example.** The numbers below are *illustrative assumptions*, not measurements
# or published figures: USD 2 per GPU-hour (V3's own assumed rental), the H800's FP8 peak, an MFU of
# 10% while decoding (decoding is bound by memory bandwidth, so utilisation is far lower than in
# training), at contexts of 1K and 4K tokens, with MLA decoding in its absorbed form against the
# latent cache (the dense models attend to their GQA caches). Because the FLOPs per token are
# computed from the configs, the comparison between models is meaningful even though the
# absolute prices are only as good as the assumptions.

# %% tags=["hide-input"]
HYPOTHETICAL = dict(usd_per_gpu_hour=2.0, peak=H800_PEAK_FLOPS["fp8"], mfu=0.10)
contexts = (1024, 4096)
rows = ["| model | context | forward GFLOP/token | tokens per GPU-hour | USD per million tokens (hypothetical) |",
        "|---|---:|---:|---:|---:|"]
usd_per_m = {}
for name in ("deepseek-v3", "llama-3-70b-like", "qwen2.5-32b-like", "deepseek-67b"):
    impl = "absorbed" if name.startswith("deepseek-v") else "naive"
    for ctx in contexts:
        f = forward_flops_per_token(CONFIGS[name], ctx, attention_impl=impl)["total"]
        per_hour = 3600 * HYPOTHETICAL["peak"] * HYPOTHETICAL["mfu"] / f
        usd_per_m[name, ctx] = 1e6 * HYPOTHETICAL["usd_per_gpu_hour"] / per_hour
        # the same number through the library's GPU-hour and cost formulas
        h = gpu_hours(1e6, f, peak_flops=HYPOTHETICAL["peak"], utilisation=HYPOTHETICAL["mfu"])
        assert np.isclose(training_cost(h, usd_per_gpu_hour=HYPOTHETICAL["usd_per_gpu_hour"])["usd"],
                          usd_per_m[name, ctx])
        rows.append(f"| {NAMES[name]} | {ctx:,} | {f / 1e9:.1f} | {per_hour:,.0f} | \\${usd_per_m[name, ctx]:.3f} |")
display(Markdown("\n".join(rows)))
ratios = {ctx: usd_per_m["llama-3-70b-like", ctx] / usd_per_m["deepseek-v3", ctx] for ctx in contexts}
for ctx, r in ratios.items():
    print(f"at equal utilisation and {ctx:,} tokens of context, a Llama-3-70B-like model costs {r:.2f}x V3 per token")
assert 0.6 < 1 / ratios[1024] < 0.7 and ratios[4096] < 1.1          # "about two thirds"
v3_ctx = forward_flops_per_token(v3, 4096, attention_impl="absorbed")
print(f"V3 absorbed decoding at 4K: attention over the cache is {v3_ctx['attention_context'] / v3_ctx['total']:.0%} "
      "of the forward FLOPs")
assert v3_ctx["attention_context"] > 0.4 * v3_ctx["total"]

# %% [markdown]
# At a short context V3 needs about two thirds of the FLOPs per token of a 70B dense model,
# despite storing nearly ten times the parameters, because it computes with only 37B of them. At 4K the
# advantage in FLOPs is gone: absorbed MLA attends with 128 heads of width $2 \cdot 512 + 64$
# over the latent cache, and that term grows with the context until it rivals the whole of the
# weights. Its real saving when decoding is in *bytes*: each step reads 37B active weights and a
# cache about 4 times smaller than a GQA peer's, and decoding is limited by memory bandwidth, which
# is why a FLOP-based utilisation of 10% is a plausible order of magnitude at all. Equal
# utilisation is the strong assumption: serving a 671B MoE needs the weights spread over many
# GPUs and large batches to keep the experts busy, and the batch that fits is limited by the KV
# cache, which is where MLA's small cache pays off. The real price of a token is set by these
# serving arrangements, and by the vendor's margin, not by arithmetic alone.
#
# Set side by side, the hypothetical compute cost and the list price:

# %%
for ctx in contexts:
    usd = usd_per_m["deepseek-v3", ctx]
    print(f"{ctx:>5,} tokens of context: hypothetical compute ${usd:.3f} per million tokens = "
          f"{usd / r1_price['output']:.0%} of R1's output list price, {usd / o1_price['output']:.1%} of o1's")
assert usd_per_m["deepseek-v3", 4096] < 0.25 * r1_price["output"]         # "under a fifth"
# "more than a hundred times"
assert o1_price["output"] > 100 * usd_per_m["deepseek-v3", 4096]
at_2pct = usd_per_m["deepseek-v3", 4096] * HYPOTHETICAL["mfu"] / 0.02     # cost scales as 1 / MFU
print(f"at 2% MFU and 4K context: ${at_2pct:.2f} per million output tokens")
# "would approach R1's price"
assert 0.75 < at_2pct / r1_price["output"] < 1.0

# %% [markdown]
# Under these assumptions the compute of an output token is under a fifth of R1's list price for
# it, so that price is not below cost by arithmetic, while o1's price is more than a hundred times
# the same compute. The 27-fold gap between the two says more about margins and serving
# arrangements than about FLOPs, and it cannot be settled from configs. Change `HYPOTHETICAL` (a
# lower MFU, a higher rental) to see how sensitive the first conclusion is: at 2% MFU the compute
# alone would approach R1's price.
#
# ## Summary
#
# * Parameters, FLOPs and cache bytes follow from the configs: V2 236B/21B, V3 671B/37B, and
#   V2-Lite 15.7B/2.4B (the 2.45B truncated), as published.
# * V3's USD 5.576M is 2.788M GPU-hours × an assumed USD 2; solving for the utilisation gives about 20%
#   of the FP8 peak or 40% of the BF16 peak, with the exact FLOPs at 4K context.
# * The 93.3% KV-cache reduction is a 6-bit V2 cache against a bf16 67B cache; 82.2% by
#   elements. V3's bf16 cache is 3.7–4.7× smaller than its dense GQA peers'.
# * V3's BF16 AdamW moments make its training state 14 bytes per parameter instead of 18.
# * At list prices (January 2025 / December 2024), o1 cost about 27x R1 per token; under stated
#   assumptions V3's compute per output token is under a fifth of R1's price.
# * E4M3 has 127 non-negative values up to 448; with one scale per 1×128 tile an outlier spoils
#   only its own tile, where a per-tensor scale flushes the rest of the tensor toward zero.
# * Training the tiny V3 with all linear-layer GEMMs in E4M3 (tiles of 32) stays within about 1%
#   per step of BF16 training, several times V3's 0.25%, but BF16 drifts as far from float32; the
#   emulation reproduces FP8's numbers, not its speed.

# %%
print(f"chapter ran in {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## Exercises
#
# The solutions are hidden under each exercise; they run when the book is built and assert their
# answers.
#
# 1. **What fits in a GPU.** With {eq}`eq-mla-cache`, compute how many tokens of bf16 KV cache fit
#    in 40 GiB for DeepSeek-V3, and compare with the Llama-3-70B-like model's GQA cache
#    ($2 H_k D_h L b$ bytes per token). Check both formulas against `kv_cache_bytes_per_token`.

# %% tags=["hide-cell"]
# Exercise 1
budget = 40 * 2**30
llama = CONFIGS["llama-3-70b-like"]
v3_per_token = (v3.kv_lora_rank + v3.qk_rope_head_dim) * v3.num_hidden_layers * 2
llama_per_token = 2 * llama.num_key_value_heads * (llama.hidden_size // llama.num_attention_heads) \
    * llama.num_hidden_layers * 2
assert v3_per_token == kv_cache_bytes_per_token(v3, "bf16") == 70_272
assert llama_per_token == kv_cache_bytes_per_token(llama, "bf16") == 327_680
fit = {"DeepSeek-V3": budget // v3_per_token, "Llama-3-70B-like": budget // llama_per_token}
print({k: f"{v:,} tokens" for k, v in fit.items()})
assert 4.6 < fit["DeepSeek-V3"] / fit["Llama-3-70B-like"] < 4.7

# %% [markdown]
# 2. **E5M2 and the outlier.** Repeat the per-tensor case of the outlier experiment with E5M2
#    instead of E4M3 (`quantize_activation(..., fmt="e5m2")`) at $A = 10^6$. Which format keeps
#    the ordinary entries, and what property of the format (its range, max / smallest normal)
#    explains it? Why does V3 still choose E4M3?

# %% tags=["hide-cell"]
# Exercise 2
x = base.copy()
x[:, outlier_channel] = 1e6 * np.sign(base[:, outlier_channel])
per_tensor_err = {}
for fmt in ("e4m3", "e5m2"):
    q, s = quantize_activation(x.reshape(1, -1), block=M * K, fmt=fmt)
    x_hat = dequantize_activation(q, s, block=M * K).reshape(x.shape)
    per_tensor_err[fmt] = np.linalg.norm((x_hat - x)[:, ordinary]) / np.linalg.norm(x[:, ordinary])
dynamic_range = {fmt: FP8_FORMATS[fmt].max / FP8_FORMATS[fmt].min_normal for fmt in ("e4m3", "e5m2")}
for fmt in ("e4m3", "e5m2"):
    print(f"{fmt}: per-tensor error of the ordinary entries at A = 1e6 {float(per_tensor_err[fmt]):.3f}, "
          f"range max / min_normal {float(dynamic_range[fmt]):,.0f}")
# E5M2's normal range spans ~9.4e8, so 1e6 : 1 still fits; E4M3's spans only 28,672
assert dynamic_range["e4m3"] < 1e6 < dynamic_range["e5m2"]
assert per_tensor_err["e5m2"] < 0.1 < 0.9 < per_tensor_err["e4m3"]
# ...but E5M2 rounds twice as coarsely, which is why V3 uses E4M3 everywhere and fine-grained scales for range
assert per_tensor_err["e5m2"] > errors["block-wise (1×128)"][0]

# %% [markdown]
# 3. **The straight-through gradient.** Under `fp8_autocast(backward=False)`, a linear layer's
#    backward should be the exact gradient of the surrogate $y = x\hat W_0^\top + \hat x_0 W^\top$,
#    whose quantised operands are frozen at the point $(x_0, W_0)$. Confirm it with
#    `refimpl.testing.check_grad`, then measure how far the FP8 Dgrad of `backward=True` departs
#    from that gradient.

# %% tags=["hide-cell"]
# Exercise 3
from refimpl.quant import quantize_blocks  # noqa: E402
from refimpl.testing import check_grad  # noqa: E402

x0, w0, t = rng.standard_normal((6, 12)), rng.standard_normal((10, 12)), 4
with fp8_autocast(tile=t, backward=False):
    _, c_ste = linear_forward(x0, w0)
with fp8_autocast(tile=t):
    _, c_fp8 = linear_forward(x0, w0)
qb, sb = quantize_blocks(w0, t)
w0_hat = dequantize_weight(qb.astype(np.float64), sb.astype(np.float64), t)[:10, :12]   # exact in float64
qr, sr = quantize_rows(x0, t)
x0_hat = dequantize_activation(qr.astype(np.float64), sr.astype(np.float64), t)[:, :12]
err = check_grad(lambda x_, w_: (x_ @ w0_hat.T + x0_hat @ w_.T, lambda g: linear_backward(g, c_ste)[:2]), [x0, w0])
print(f"STE backward vs finite differences of the surrogate: {err:.1e}")
assert err < 1e-6
g = rng.standard_normal((6, 10))
dx_ste, dx_fp8 = linear_backward(g, c_ste)[0], linear_backward(g, c_fp8)[0]
departure = np.linalg.norm(dx_fp8 - dx_ste) / np.linalg.norm(dx_ste)
print(f"FP8 Dgrad vs the exact STE gradient: {departure:.1%} (one E4M3 rounding of dy)")
assert 1e-3 < departure < 2.0**-4
