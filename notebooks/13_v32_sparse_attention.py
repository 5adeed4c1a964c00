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
# # After R1: DeepSeek-V3.2 — sparse attention
#
# DeepSeek did not stop at R1. DeepSeek-V3.2 {cite}`deepseekai2025v32` keeps V3's multi-head
# latent attention and DeepSeekMoE and changes exactly one thing in the architecture: **DeepSeek
# Sparse Attention (DSA)**. A small scorer, the *lightning indexer*, rates every earlier token for
# the current query, and the query then attends only to the best-rated `index_topk` of them.
# Core attention over a context of length $L$ then costs $O(Lk)$ instead of $O(L^2)$; the indexer
# itself is still $O(L^2)$ but far cheaper per key. DeepSeek did not train this from scratch: it
# *continued* pre-training V3.1-Terminus, first warming the indexer up against the dense attention,
# then switching sparsity on.
#
# This chapter builds DSA on top of the MLA of {doc}`03_mla`, derives the indexer's gradient, runs
# a miniature of the two-stage continued pre-training, prices long contexts with the cost
# accounting of {doc}`09_cost`, and shows one place where a popular implementation gets DSA
# subtly wrong: ties.

# %%
import os

# Small matrices: BLAS threads only add synchronisation cost (set before NumPy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile  # noqa: E402
import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refimpl.accounting import (  # noqa: E402
    INDEXER_FP8_ENTRY_BYTES,
    MLA_FP8_ENTRY_BYTES,
    V32_PRICE_AT_128K,
    dsa_attention_costs,
    get_config,
    indexer_parameters,
)
from refimpl.attention import (  # noqa: E402
    dsa_forward,
    dsa_infer,
    init_dsa_cache,
    init_dsa_params,
    mla_forward,
    select_topk,
)
from refimpl.attention.dsa import attention_target, split_params  # noqa: E402
from refimpl.attention.indexer import (  # noqa: E402
    index_scores,
    indexer_backward,
    indexer_kl_backward,
    indexer_kl_forward,
    indexer_qkw,
    query_latent,
)
from refimpl.config import ModelConfig  # noqa: E402
from refimpl.display import show_source  # noqa: E402
from refimpl.model import init_params, model_forward, save_pretrained  # noqa: E402
from refimpl.recipes.dsa_pretrain import dsa_pretrain_run  # noqa: E402
from refimpl.testing import check_grad  # noqa: E402

t_start = time.perf_counter()
v32 = get_config("deepseek-v32")
HI, DI, K = (v32.extra[n] for n in ("index_n_heads", "index_head_dim", "index_topk"))
assert (HI, DI, K) == (64, 128, 2048) and v32.extra["model_type"] == "deepseek_v32"

# %% [markdown]
# One DSA layer, as a data flow: the indexer (left) reads the same inputs as MLA and decides which
# rows of MLA's latent cache the attention (right) may read.

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(9, 4.2))
ax.set_axis_off()
ax.set_xlim(0, 10)
ax.set_ylim(0, 6)
boxes = {
    "x": (5.0, 0.5, "layer input $\\mathbf{x}_t$ (after attn_norm)"),
    "cq": (6.6, 1.8, "query latent $c^Q_t$\n(q_a_proj, RMSNorm)"),
    "ik": (1.6, 1.8, "indexer key $\\mathbf{k}^I_t$\n(wk, LayerNorm, half RoPE)"),
    "iq": (4.0, 3.1, "indexer queries $\\mathbf{q}^I_{t,j}$ (wq_b)\nhead weights $w_{t,j}$ (weights_proj)"),
    "kc": (1.6, 3.1, "indexer key cache\n$d^I$ values / token"),
    "sc": (2.8, 4.4, "scores $I_{t,s}$, top-$k$ ∩ causal\n(ties: lower position)"),
    "lc": (8.2, 3.1, "MLA latent cache\n$[c^{KV}_s; k^R_s]$"),
    "mla": (7.2, 5.4, "MLA over the selected rows only\n(absorbed, all heads share $\\mathcal{S}_t$)"),
}
for name, (bx, by, text) in boxes.items():
    ax.text(bx, by, text, ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round", fc="#e8f0fe" if name in ("ik", "iq", "kc", "sc") else "#fdf1e3"))
arrows = [("x", "cq"), ("x", "ik"), ("x", "iq"), ("cq", "iq"), ("ik", "kc"), ("kc", "sc"), ("iq", "sc"),
          ("x", "lc"), ("cq", "mla"), ("lc", "mla"), ("sc", "mla")]
for a, b in arrows:
    (xa, ya, _), (xb, yb, _) = boxes[a], boxes[b]
    ax.annotate("", xy=(xb, yb - 0.3), xytext=(xa, ya + 0.3), arrowprops=dict(arrowstyle="->", color="grey"))
ax.set_title("DeepSeek Sparse Attention: lightning indexer (blue) + MLA (orange)")
plt.show()

# %% [markdown]
# ## The lightning indexer
#
# For query token $t$ and earlier token $s$ the indexer computes, with $H^I$ = `index_n_heads`
# heads of width $d^I$ = `index_head_dim` (64 and 128 in the released model, checked above),
#
# $$
# I_{t,s} = \frac{1}{\sqrt{d^I}}\sum_{j=1}^{H^I} w_{t,j}\,\mathrm{ReLU}\big(\mathbf q^I_{t,j}\cdot\mathbf k^I_s\big),
# \qquad w_{t,j} = \frac{(W^{IW}\mathbf x_t)_j}{\sqrt{H^I}}
# $$ (eq-dsa-index)
#
# (V3.2 §2.1, eq. 1; the two constants come from DeepSeek's inference code). Three details matter,
# and each is easy to get wrong:
#
# * the query heads $\mathbf q^I_{t,j}$ are read (`wq_b`) from MLA's **normalised query latent**
#   $c^Q_t$, the same vector MLA's own `q_b_proj` reads; the key $\mathbf k^I_s$ and the head
#   weights $w$ are read from the layer input $\mathbf x$, not from MLA's KV latent;
# * there is **one key per token** shared by all indexer heads, normalised by a LayerNorm *with a
#   bias*;
# * the first `qk_rope_head_dim` dimensions of each indexer head are rotated with **half-split**
#   RoPE (pairs $(i, i + d_r/2)$) — MLA rotates adjacent pairs and puts its rope slice last. The
#   first release of DeepSeek's code rotated the indexer the MLA way and was corrected on
#   2025-11-17.
#
# The weights $w_{t,j}$ can be negative, so a head can vote *against* a key. DeepSeek's kernels
# also rotate $\mathbf q$ and $\mathbf k$ by a Hadamard matrix and round them to FP8; an orthogonal
# rotation of both leaves every dot product unchanged, so refimpl, in float64, leaves both out.

# %%
show_source(indexer_qkw, index_scores)

# %% [markdown]
# Each query $t$ then keeps the `index_topk` keys of highest score among $s \le t$, and MLA attends
# to those alone, all heads sharing one selected set $\mathcal S_t$ (MLA's latent is shared by the
# heads, so a per-head selection would read more rows, not fewer):
#
# $$
# \mathbf o_{t,h} = \sum_{s\in\mathcal S_t,\ s\le t}
#   \mathrm{softmax}_s\big(\sigma\,\mathbf q_{t,h}\cdot\mathbf k_{s,h}\big)\,\mathbf v_{s,h}
# $$ (eq-dsa-attn)
#
# The "$s \le t$" is not redundant. When a row has fewer than $k$ earlier tokens, a top-$k$ over the
# whole row also returns future positions (score $-\infty$), and only re-applying the causal mask
# removes them — DeepSeek's code masks twice for this reason. `select_topk` returns selected ∩
# causal directly.

# %%
show_source(select_topk)

# %% [markdown]
# ### Ties, and the rule refimpl uses
#
# A ReLU makes a score **exactly** zero whenever every indexer head's dot product is $\le 0$. With
# few indexer heads this is common, and then several keys tie at the $k$-th place. `torch.topk`
# (and NumPy's default sort) break such ties in an unspecified way that can depend on the row's
# length. refimpl fixes a rule keyed only on (score, position): **among equal scores the lower
# position wins**. A row's selection is then the same whether the sequence has 10 tokens or 10,000,
# which is what causality, prefix consistency and cached decoding need. A tiny V3.2 with two
# indexer heads shows how common exact ties are:

# %%
tiny = ModelConfig.preset("tiny-v32").replace(initializer_range=0.3, max_position_embeddings=64)
tiny.extra.update(index_n_heads=2, index_topk=4)
rng = np.random.default_rng(0)
layer = init_dsa_params(tiny, rng)
x = rng.standard_normal((1, 16, tiny.hidden_size))
y_sparse, cache, info = dsa_forward(x, layer, tiny)
causal = np.tril(np.ones((16, 16), bool))
zeros = int((info["scores"][0][causal] == 0).sum())
n_causal = int(causal.sum())
print(f"{zeros} of {n_causal} causal index scores are exactly 0")
assert zeros > n_causal // 10

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
axes[0].imshow(np.where(causal, info["scores"][0], np.nan), cmap="viridis")
axes[0].set_title("index scores $I_{t,s}$ (causal part)")
axes[1].imshow(info["selected"][0], cmap="Greys")
axes[1].set_title(f"selected ∩ causal, k = {tiny.extra['index_topk']}")
for a in axes:
    a.set_xlabel("key position s")
    a.set_ylabel("query position t")
plt.tight_layout()
plt.show()

# %% [markdown]
# With this rule the invariants of DSA hold exactly, even on this tied input: `index_topk` $\ge T$
# is dense MLA bit for bit, the first $k$ rows (which have at most $k$ keys) are dense, every row
# attends to exactly $\min(k, t+1)$ keys, and decoding token by token from the latent cache plus
# the indexer's own key cache reproduces the full forward.

# %%
mla_p, _ = split_params(layer)
dense = mla_forward(x, mla_p, tiny)[0]
wide = tiny.replace()
wide.extra["index_topk"] = 16
assert np.array_equal(dsa_forward(x, layer, wide)[0], dense)
assert np.array_equal(y_sparse[:, :4], dense[:, :4])
assert np.array_equal(info["selected"][0].sum(-1), np.minimum(4, np.arange(16) + 1))
kv = init_dsa_cache(tiny, 1, 16)
steps = [dsa_infer(x[:, :5], layer, tiny, kv, 0)] + [dsa_infer(x[:, i:i + 1], layer, tiny, kv, i) for i in range(5, 16)]
decode_gap = float(np.abs(np.concatenate(steps, axis=1) - y_sparse).max())
prefix_gap = max(float(np.abs(dsa_forward(x[:, :n], layer, tiny)[0] - y_sparse[:, :n]).max()) for n in range(1, 16))
print(f"cached decode vs full forward: {decode_gap:.1e}; prefix vs full: {prefix_gap:.1e}")
assert decode_gap < 1e-12 and prefix_gap < 1e-12

# %% [markdown]
# ## Training the indexer
#
# The top-$k$ selection is a step function of the scores, so the language-modelling loss gives the
# indexer **exactly zero** gradient. V3.2 trains it with its own loss instead (§2.1.1). Let $A_{t,h,s}$
# be the main attention probabilities and $p_{t,s} = \frac1H\sum_h A_{t,h,s}$ their head-mean
# (already normalised). The indexer learns to match it:
#
# $$
# \mathcal L^I = \sum_t \mathrm{KL}\big(p_{t,:}\,\big\|\,\pi_{t,:}\big), \qquad \pi_{t,:} = \mathrm{Softmax}(I_{t,:}),
# $$ (eq-indexer-kl)
#
# over all causal keys in the **dense warm-up** (V3.2 eq. 3: attention stays dense, everything
# but the indexer is frozen) and over the selected keys $\mathcal S_t$ in **sparse training**
# (eq. 4: the main model learns from the LM loss, the indexer from $\mathcal L^I$ with its inputs
# detached). In the sparse stage refimpl takes $p$ from the sparse attention itself, which already
# sums to 1 on $\mathcal S_t$ (the papers do not say which; this is the natural reading).
#
# The backward is short. The softmax-KL pair gives
# $\partial\mathcal L^I/\partial I_{t,s} = \pi_{t,s} - p_{t,s} \equiv G_{t,s}$
# on the allowed keys (each row sums to 0). Through
# {eq}`eq-dsa-index`, with $z_{t,j,s} = \mathbf q_{t,j}\cdot\mathbf k_s$,
#
# $$
# \frac{\partial\mathcal L}{\partial w_{t,j}} = \frac{1}{\sqrt{d^I}}\sum_s G_{t,s}\,\mathrm{ReLU}(z_{t,j,s}),\qquad
# \frac{\partial\mathcal L}{\partial z_{t,j,s}} = \frac{G_{t,s}\,w_{t,j}}{\sqrt{d^I}}\,\mathbb 1[z_{t,j,s} > 0],
# $$
#
# then $\partial\mathbf q_{t,j} = \sum_s (\partial z_{t,j,s})\,\mathbf k_s$ and
# $\partial\mathbf k_s = \sum_{t,j}(\partial z_{t,j,s})\,\mathbf q_{t,j}$, un-rotate (RoPE is
# orthogonal), back through the LayerNorm and the three projections. Finite differences agree:

# %%
show_source(indexer_backward)

# %%
pos = np.broadcast_to(np.arange(16), (1, 16))
cq = query_latent(x, mla_p)
target, support = attention_target(cache), cache.allowed


def indexer_loss(ip):
    q, k, w, ic = indexer_qkw(x, cq, ip, tiny, pos)
    loss, c = indexer_kl_forward(index_scores(q, k, w), target, support)
    return loss, lambda d: (indexer_backward(indexer_kl_backward(d, c), ic),)


fd_err = check_grad(indexer_loss, [layer["indexer"]], max_entries=30)
print(f"indexer gradient vs central differences: max relative error {fd_err:.1e}")
assert fd_err < 1e-6

# %% [markdown]
# ## A miniature of V3.2's continued pre-training
#
# `refimpl.recipes.dsa_pretrain` (CLI `python -m refimpl dsa-pretrain`) replays the recipe on a
# toy whose answer sits far back in the context. Each sequence of 64 random "filler" tokens holds
# exactly one *marked* token; the last 8 positions must output the marked token's id. A tiny V3
# (two layers, MoE in the second) is first trained densely (standing in for V3.1-Terminus), then an
# indexer is added to both layers, warmed up with the dense KL, and finally sparse training runs
# with `index_topk` = 8: each query row reads 8 of its 56-63 earlier tokens.

# %%
run = dsa_pretrain_run(progress=False, cache_dir="_cache")
acc, recall = run["accuracy"], run["recall"]
assert run["config"].max_position_embeddings == 64 and run["config"].extra["index_topk"] == 8
assert (64 - 8 - 1, 64 - 2 + 1) == (55, 63)                      # query rows t = 55..62 see 56..63 keys
print({k: round(v, 3) for k, v in acc.items()}, f"attended fraction {run['attended_fraction']:.3f}")
assert acc["dense"] >= 0.8                                       # the dense model solves the task
assert acc["sparse_untrained"] < acc["dense"] - 0.3              # a random indexer loses the answer
assert acc["sparse_after_warmup"] >= acc["dense"] - 0.05         # warm-up alone restores it
assert acc["sparse_final"] >= acc["dense_final"] - 0.05          # sparse keeps the dense accuracy
assert run["attended_fraction"] < 0.2
assert recall[-1][1] > 2 * recall[0][1]

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
steps_, rec = zip(*recall, strict=True)
axes[0].plot(steps_, rec, marker="o")
axes[0].axvline(run["stages"]["warmup"], color="grey", ls="--", label="warm-up → sparse")
axes[0].set_ylim(0, 1)
axes[0].set_xlim(0, None)
axes[0].set_xlabel("indexer training step")
axes[0].set_ylabel("recall of dense attention's top-k")
axes[0].legend()
names = ["dense", "sparse_untrained", "sparse_after_warmup", "sparse_final"]
axes[1].bar(range(4), [acc[n] for n in names])
axes[1].set_xticks(range(4), ["dense", "sparse,\nrandom indexer", "sparse,\nafter warm-up", "sparse,\nfinal"])
axes[1].set_ylim(0, 1)
axes[1].set_ylabel("answer accuracy")
plt.tight_layout()
plt.show()

# %% [markdown]
# The random indexer picks keys unrelated to the answer and the sparse model fails; after the
# warm-up alone, with every main weight frozen, the indexer has learned where the dense attention
# looks and the sparse model is as accurate as the dense one. Sparse training then tunes both.
# Recall of the dense attention's top-$k$ keys need not reach 1: on this task only one key
# matters, and the others in the dense top-$k$ carry little probability.

# %% [markdown]
# ## What DSA saves at long context
#
# Per layer and (query, key) pair, absorbed MLA (the decoding form of {doc}`03_mla`) costs
# $2H(2d_c + d_r)$ FLOPs, the indexer $2H^Id^I$. Decoding is memory-bound, so bytes matter too: a
# FlashMLA FP8 latent entry is 656 bytes per token and layer, an indexer key 132. These are
# textbook estimates from the configuration, not DeepSeek's measurements; beside them are the
# service prices DeepSeek plotted for token position 128K (V3.2 Fig. 3, read off the figure, so
# approximate).

# %%
ctx = np.linspace(0, 131072, 65)
costs = [dsa_attention_costs(v32, c) for c in ctx]
at128 = dsa_attention_costs(v32, 131072)
flop_ratio = at128["dense_flops"] / at128["dsa_flops"]
byte_ratio = at128["dense_bytes"] / at128["dsa_bytes"]
price = {ph: V32_PRICE_AT_128K[ph]["v3.1-terminus"] / V32_PRICE_AT_128K[ph]["v3.2"] for ph in V32_PRICE_AT_128K}
print(f"decode at 128K, all 61 layers: dense {at128['dense_flops'] / 1e12:.2f} TFLOP, "
      f"DSA {at128['dsa_flops'] / 1e12:.3f} TFLOP ({flop_ratio:.1f}x); cache read "
      f"{at128['dense_bytes'] / 1e9:.2f} GB vs {at128['dsa_bytes'] / 1e9:.2f} GB ({byte_ratio:.1f}x)")
print(f"price ratio V3.1-Terminus / V3.2 at 128K (Fig. 3): decode {price['decode']:.1f}x, "
      f"prefill {price['prefill']:.1f}x")
print(f"indexer parameters: {indexer_parameters(v32) / 1e9:.2f}B over {v32.num_hidden_layers} layers")
assert (MLA_FP8_ENTRY_BYTES, INDEXER_FP8_ENTRY_BYTES) == (656, 132)
assert round(at128["dense_flops"] / 1e12, 2) == 2.23 and round(at128["dsa_flops"] / 1e12, 3) == 0.166
assert byte_ratio < price["decode"] < flop_ratio                 # the price falls between the two
assert round(indexer_parameters(v32) / 1e9, 2) == 0.85

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
kk = ctx / 1024
axes[0].plot(kk, [c["dense_flops"] / 1e12 for c in costs], label="dense MLA")
axes[0].plot(kk, [c["dsa_flops"] / 1e12 for c in costs], label="DSA (top-2048 + indexer)")
axes[0].plot(kk, [c["indexer_flops"] / 1e12 for c in costs], ls=":", label="of which indexer")
axes[0].set_ylabel("attention TFLOP per decoded token")
axes[1].plot(kk, [c["dense_bytes"] / 1e9 for c in costs], label="dense: latent cache")
axes[1].plot(kk, [c["dsa_bytes"] / 1e9 for c in costs], label="DSA: 2048 latents + indexer cache")
axes[1].set_ylabel("cache GB read per decoded token")
for a in axes:
    a.set_xlabel("context length (K tokens)")
    a.set_xlim(0, None)
    a.set_ylim(0, None)
    a.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# DeepSeek's decode price fell by a factor between the byte ratio and the FLOP ratio computed
# above, as one would expect of a memory-bound phase that also does real arithmetic. Below 2,048
# tokens DSA cannot save anything: it reads every latent anyway, plus the indexer cache.

# %% [markdown]
# ## Where transformers differs: ties
#
# transformers (5.x) ships a `deepseek_v32` model. Its indexer runs without gradient and in
# float32, which only changes precision; its selection uses `torch.topk` on the raw scores, whose
# tie-breaking is not length-independent. On a tiny checkpoint with two indexer heads, written by
# refimpl's `save_pretrained` in the hub layout, its logits for a prefix change when the sequence
# grows, and its cached decoding disagrees with its own full forward; refimpl's do not. With
# `index_topk` $\ge T$, or enough indexer heads that ties vanish, the two agree (refimpl's tests
# compare only there). The cell skips if the installed transformers has no `deepseek_v32`.

# %%
import warnings  # noqa: E402

try:
    from tqdm import TqdmWarning
    warnings.filterwarnings("ignore", category=TqdmWarning)   # transformers imports tqdm.auto (no widgets here)
    import torch
    import transformers
    has_v32 = hasattr(transformers, "DeepseekV32ForCausalLM")
except ImportError:
    has_v32 = False
cfg_hf = ModelConfig.preset("tiny-v32").replace(initializer_range=0.3, max_position_embeddings=64)
cfg_hf.extra.update(index_topk=4, index_n_heads=2)
params_hf = init_params(cfg_hf, np.random.default_rng(0))
ids = np.random.default_rng(0).integers(0, cfg_hf.vocab_size, (1, 17))
full_ours = model_forward(ids, params_hf, cfg_hf)[0]
ours_gap = max(float(np.abs(model_forward(ids[:, :n], params_hf, cfg_hf)[0] - full_ours[:, :n]).max())
               for n in range(5, 17))
assert ours_gap < 1e-12
if has_v32:
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(d, params_hf, cfg_hf)
        hf = transformers.DeepseekV32ForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager",
                                                                 experts_implementation="eager").eval()
    with torch.no_grad():
        full_hf = hf(torch.from_numpy(ids)).logits.numpy()
        hf_gap = max(float(np.abs(hf(torch.from_numpy(ids[:, :n])).logits.numpy() - full_hf[:, :n]).max())
                     for n in range(5, 17))
    print(f"prefix logits vs full-sequence logits, max |diff|: transformers {hf_gap:.2f}, refimpl {ours_gap:.1e}")
    assert hf_gap > 1e-3
else:
    print("transformers with deepseek_v32 is not installed: skipped (refimpl's own gap is "
          f"{ours_gap:.1e})")

# %% [markdown]
# ## Exercises
#
# 1. **Positive rescaling.** Multiply the indexer's `weights_proj` by $c = 3$. Show that the
#    selection of the tiny layer above does not change but the KL loss {eq}`eq-indexer-kl` does,
#    and that $c = -1$ changes the selection. Why must the constants $(H^Id^I)^{-1/2}$ be kept?

# %% tags=["hide-cell"]
# Exercise 1
def scaled(c):
    lay = {**layer, "indexer": {**layer["indexer"], "weights_proj": c * layer["indexer"]["weights_proj"]}}
    _, cch, inf = dsa_forward(x, lay, tiny, sparse=False)
    lss, _ = indexer_kl_forward(cch.scores, attention_target(cch), cch.allowed)
    return inf["selected"], lss


(s1, l1), (s3, l3), (sm, _) = scaled(1.0), scaled(3.0), scaled(-1.0)
assert np.array_equal(s1, s3) and not np.array_equal(s1, sm)
assert abs(l1 - l3) > 1e-3          # the softmax sharpens: the loss, hence training, depends on the scale
print(f"KL loss at c=1: {l1:.4f}, at c=3: {l3:.4f}")

# %% [markdown]
# 2. **The second causal mask.** Select the top-$k$ of the raw scores without the causal mask
#    (what a mask built from the top-$k$ indices alone would do) and count, for the tiny layer, how
#    many selected keys lie in the future of their query.

# %% tags=["hide-cell"]
# Exercise 2
raw = info["scores"][0]
order = np.argsort(-raw, axis=-1, kind="stable")[:, :4]
future = int((order > np.arange(16)[:, None]).sum())
print(f"{future} future keys would leak into the selection")
assert future > 0
assert not (select_topk(info["scores"], 4)[0] & ~causal).any()

# %% [markdown]
# 3. **Break-even context.** With the byte counts above (656 per latent, 132 per indexer key,
#    $k = 2048$), at which context length does a DSA decode step read as many bytes as a dense one?
#    Check your answer with `dsa_attention_costs`.

# %% tags=["hide-cell"]
# Exercise 3
# k * 656 + L * 132 = L * 656  ->  L = k * 656 / (656 - 132)
breakeven = K * MLA_FP8_ENTRY_BYTES / (MLA_FP8_ENTRY_BYTES - INDEXER_FP8_ENTRY_BYTES)
c_at = dsa_attention_costs(v32, breakeven)
print(f"break-even at about {breakeven:,.0f} tokens")
assert 2560 < breakeven < 2570
np.testing.assert_allclose(c_at["dense_bytes"], c_at["dsa_bytes"], rtol=1e-12)

# %%
print(f"chapter run time: {time.perf_counter() - t_start:.0f} s")
