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
# # DeepSeekMoE
#
# DeepSeek-V3 stores 671 billion parameters, but each token is processed by only 37 billion of
# them. Most of the difference sits in the feed-forward layers. In 58 of V3's 61 blocks, the dense
# FFN is replaced by a *mixture of experts*: 256 small routed experts, of which each token uses 8,
# plus one shared expert that every token uses {cite}`deepseekai2024v3`. The design is
# DeepSeekMoE {cite}`dai2024deepseekmoe`, first used at scale in DeepSeek-V2
# {cite}`deepseekai2024v2`.
#
# This chapter builds the layer the way the released models compute it, with hand-written
# gradients, and then looks at the engineering that makes it work:
#
# 1. from a dense FFN to a coarse MoE, and then to fine-grained plus shared experts;
# 2. the two routers: V2's softmax and V3's sigmoid with a load-balancing bias;
# 3. sparse dispatch, the backward pass through the router, and checks against a dense reference;
# 4. device- and node-limited routing, and the all-to-all traffic they save;
# 5. load balancing: a small training run where routing collapses, then is fixed by an auxiliary
#    loss and by V3's bias update;
# 6. total and active parameters of V2-Lite, V2 and V3.
#
# Everything below calls `refimpl.moe`. Where code is shown, it is the library's real source.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * explain what fine-grained and shared experts buy, and count a model's total and active
#   parameters;
# * route tokens with V2's softmax gate and V3's sigmoid gate, with group- and node-limited
#   selection;
# * dispatch tokens to their experts and combine the results, forward and backward;
# * compare auxiliary-loss balancing with V3's bias-based balancing on a run you can repeat.
# ```

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from refimpl import ModelConfig
from refimpl.core import swiglu_mlp_forward
from refimpl.display import show_source, table
from refimpl.moe import (
    balance_backward,
    bias_update,
    comm_balance_forward,
    count_parameters,
    device_balance_forward,
    expert_balance_forward,
    gate_forward,
    init_moe_params,
    make_plan,
    mixtral_gate_forward,
    moe_backward,
    moe_forward,
    node_limited_comparison,
    seq_balance_forward,
    split_shared_experts,
)
from refimpl.moe.dispatch import combine, experts_forward
from refimpl.recipes.moe_balance import moe_balance_run
from refimpl.testing import check_grad, tol
from refimpl.testing.naive import moe_dense_reference

t_start = time.perf_counter()
rng = np.random.default_rng(0)


# %% tags=["remove-cell"]
# A diagram drawn by refimpl.diagrams from the config it shows; glued into the figure below.
from myst_nb import glue

from refimpl.diagrams import moe_diagram

glue("diagram-moe", moe_diagram("deepseek-v3"), display=False)
plt.close("all")

# %% [markdown]
# ## 1. Dense FFN → coarse MoE → fine-grained + shared experts
#
# ```{glue:figure} diagram-moe
# ---
# alt: >-
#   DeepSeekMoE routing with DeepSeek-V3's sizes: a router scores every routed expert, a per-expert
#   bias is added for the choice only, the best groups of experts are kept and the top experts
#   inside them chosen, while the shared expert sees every token.
# name: diagram-moe
# ---
# DeepSeekMoE as DeepSeek-V3 configures it (drawn by `refimpl.diagrams.moe_diagram` from the V3
# preset; the chosen groups and experts are a random example). The bias decides which experts run;
# the gate weights that mix their outputs come from the scores without it.
# ```
#
# A dense SwiGLU FFN ({eq}`eq-swiglu` in {doc}`02_backprop_by_hand`) of width $I$ costs $3DI$
# parameters, and every token uses all of them. A
# *coarse* MoE in the style of GShard, Switch and Mixtral
# {cite}`lepikhin2021gshard,fedus2022switch,jiang2024mixtral` keeps $N$ copies of that FFN and
# routes each token to $K = 2$ of them. Parameters grow $N$-fold, but the compute per token only
# doubles.
#
# DeepSeekMoE makes two changes to this recipe (DeepSeekMoE §3.1–3.2):
#
# * **Fine-grained experts.** Split every expert into $m$ narrower ones of width $I/m$, and
#   activate $mK$ of them. Parameters and FLOPs stay the same, but the number of ways to combine
#   experts grows from $\binom{N}{K}$ to $\binom{mN}{mK}$, which lets experts specialise more
#   narrowly.
# * **Shared experts.** Make $K_s$ of the fine experts always active and route only the rest
#   ($mN - K_s$ routed, $mK - K_s$ chosen). Knowledge that every token needs then lives in one
#   place instead of being relearnt by many routed experts.
#
# With $D = 64$ and $I = 256$, here are the four layers built as refimpl configs, with parameters
# counted from the arrays that `init_moe_params` allocates:

# %% tags=["hide-input"]
D, I_DENSE = 64, 256
variants = {
    "dense FFN": None,
    "coarse MoE (N=8, K=2)": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                                  n_shared_experts=0),
    "fine-grained (m=4: 32 experts, K=8)": dict(n_routed_experts=32, num_experts_per_tok=8,
                                                moe_intermediate_size=64, n_shared_experts=0),
    "fine-grained + shared (1 shared, 31 routed, K=7)": dict(n_routed_experts=31, num_experts_per_tok=7,
                                                             moe_intermediate_size=64, n_shared_experts=1),
}
base = ModelConfig.preset("tiny").replace(hidden_size=D, n_group=1, topk_group=1, topk_method="greedy",
                                          scoring_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.0)
rows, active = [], {}
for name, fields in variants.items():
    if fields is None:
        total = act = 3 * D * I_DENSE
        combos = 1
    else:
        cfg = base.replace(**fields)
        p = init_moe_params(cfg, 0)
        per_expert = sum(v[0].size for v in p["experts"].values())
        shared = sum(v.size for v in p.get("shared_experts", {}).values())
        total = per_expert * cfg.n_routed_experts + shared
        act = per_expert * cfg.num_experts_per_tok + shared
        combos = math.comb(cfg.n_routed_experts, cfg.num_experts_per_tok)
    active[name] = act
    rows.append((name, f"{total:,}", f"{act:,}", f"{combos:,}"))
table(["layer", "FFN parameters", "active per token", "expert combinations"], rows)
moe_active = [v for k, v in active.items() if k != "dense FFN"]
assert len(set(moe_active)) == 1 and moe_active[0] == 2 * active["dense FFN"]   # same compute in all MoEs

# %% [markdown]
# All three MoE layers activate exactly twice the dense FFN's parameters. The fine-grained layer can
# combine its experts in about ten million ways instead of 28.
#
# Two facts tie the MoE layer back to the dense one, and both are checked here. First, a layer with
# one routed expert, $K = 1$ and a gate value of 1 *is* a dense SwiGLU FFN. Second, the released
# code stores the $K_s$ shared experts as **one** MLP of width $K_s \cdot I$. Slicing its
# intermediate dimension gives back the $K_s$ separate experts, and their outputs sum to the wide
# MLP's output.

# %%
one = base.replace(n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=32, n_shared_experts=0)
p1 = init_moe_params(one, 1, std=0.2)
x = rng.standard_normal((4, 5, D))
y_moe, _, _ = moe_forward(x, p1, one)
y_ffn, _ = swiglu_mlp_forward(x, {k: v[0] for k, v in p1["experts"].items()})
np.testing.assert_allclose(y_moe, y_ffn, **tol("equiv64"))

wide = init_moe_params(base.replace(n_shared_experts=3, moe_intermediate_size=16), 2, std=0.2)["shared_experts"]
parts = split_shared_experts(wide, 3)
np.testing.assert_allclose(swiglu_mlp_forward(x, wide)[0], sum(swiglu_mlp_forward(x, q)[0] for q in parts),
                           **tol("equiv64"))
print("one expert, K=1  ==  dense SwiGLU FFN;   3 shared experts  ==  one MLP of width 3*I")

# %% [markdown]
# ## 2. Routers: V2's softmax and V3's sigmoid with a bias
#
# The router scores token $u_t$ against each expert's centroid $e_i$ (the rows of `gate.weight`).
#
# **V2** (§2.2) uses a softmax over all $E$ experts, keeps the top $K$, and multiplies the kept
# probabilities by `routed_scaling_factor` (16 in V2) *without* renormalising them. The weights
# therefore sum to less than the scale, by an amount that varies from token to token. Every
# expert's logit also affects every weight through the softmax denominator.
#
# **V3** (§2.1.2, eq. 12–16) gives each expert an independent affinity $s_{i,t} = \sigma(u_t^\top
# e_i)$. For *selection only* it adds a per-expert bias $b_i$ (`e_score_correction_bias`), which
# load balancing adjusts. The gate values are the *unbiased* affinities of the chosen experts,
# renormalised to sum to one and multiplied by $\gamma = 2.5$ (`routed_scaling_factor`):
#
# $$
# s_{i,t} = \sigma\bigl(u_t^\top e_i\bigr), \qquad
# \mathcal{T}_t = \operatorname{TopK}\bigl(\{s_{j,t} + b_j\}_{j=1}^{E}, K\bigr), \qquad
# g_{i,t} = \gamma\, \frac{s_{i,t}}{\sum_{j \in \mathcal{T}_t} s_{j,t}} \quad (i \in \mathcal{T}_t).
# $$ (eq-moe-v3-gate)
#
# Both routers can also restrict each token to a few expert groups (section 4). Here is the
# implementation:

# %%
show_source(gate_forward, checks=False)

# %% [markdown]
# The next cell checks three consequences on random tokens. First, V3's weights sum to exactly
# 2.5, while V2's sums vary. Second, changing the logit of an expert that was *not* chosen moves
# V2's weights but leaves V3's weights alone. Third, a large bias forces an expert into the
# selection, yet its gate value is still computed from the unbiased score.

# %% tags=["hide-input"]
E, K = 64, 6
v2 = base.replace(n_routed_experts=E, num_experts_per_tok=K, scoring_func="softmax", norm_topk_prob=False,
                  routed_scaling_factor=1.0)
v3 = base.replace(n_routed_experts=E, num_experts_per_tok=K, topk_method="noaux_tc", scoring_func="sigmoid",
                  norm_topk_prob=True, routed_scaling_factor=2.5)
w_gate = rng.standard_normal((E, D)) / np.sqrt(D) * 2
tokens = rng.standard_normal((2000, D))
r2, _ = gate_forward(tokens, {"weight": w_gate}, v2)
r3, _ = gate_forward(tokens, {"weight": w_gate, "e_score_correction_bias": np.zeros(E)}, v3)
np.testing.assert_allclose(r3.weights.sum(1), 2.5, rtol=1e-14)

# raise the centroid of an expert that token 0 did not choose: V2's weights for token 0 shift, V3's do not
loser = next(i for i in range(E) if i not in r2.idx[0] and i not in r3.idx[0])
w_bumped = w_gate.copy()
w_bumped[loser] += 0.3 * tokens[0] / np.linalg.norm(tokens[0])
r2b, _ = gate_forward(tokens[:1], {"weight": w_bumped}, v2)
r3b, _ = gate_forward(tokens[:1], {"weight": w_bumped, "e_score_correction_bias": np.zeros(E)}, v3)
assert loser not in r2b.idx[0] and loser not in r3b.idx[0]
print(f"V2 weights of token 0 moved by {np.abs(r2b.weights[0] - r2.weights[0]).max():.2e}; "
      f"V3 weights moved by {np.abs(r3b.weights[0] - r3.weights[0]).max():.1e}")
assert np.abs(r2b.weights[0] - r2.weights[0]).max() > 1e-4
np.testing.assert_allclose(r3b.weights[0], r3.weights[0], rtol=1e-14)       # equal up to GEMM rounding

# a huge bias forces expert 5 into every selection, but its weight is still from the unbiased score
bias = np.zeros(E)
bias[5] = 100.0
r3f, _ = gate_forward(tokens, {"weight": w_gate, "e_score_correction_bias": bias}, v3)
assert np.all(r3f.idx[:, 0] == 5)
sel = np.take_along_axis(r3f.scores, r3f.idx, 1)
np.testing.assert_allclose(r3f.weights[:, 0], 2.5 * r3f.scores[:, 5] / sel.sum(1), rtol=1e-14)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].hist(r2.weights.sum(1), bins=40, color="C0")
axes[0].set(title="V2 softmax: sum of the 6 gate values (scale 1)", xlabel="sum of weights")
axes[1].hist(r3.weights.sum(1), bins=41, range=(2.4, 2.6), color="C1")
axes[1].set(title="V3 sigmoid, renormalised: always 2.5", xlabel="sum of weights")
fig.tight_layout()
plt.show()

# %% [markdown]
# Mixtral's router {cite}`jiang2024mixtral` takes the top $K$ of the *logits* and applies a softmax
# over those $K$ only. That is the same as a softmax over all experts renormalised over the kept
# ones, so it is the DeepSeek router with `norm_topk_prob=True` and a scale of 1. V2 keeps the
# unnormalised probabilities and V3 renormalises sigmoids instead.

# %%
mix, _ = mixtral_gate_forward(tokens, w_gate, K)
renorm, _ = gate_forward(tokens, {"weight": w_gate}, v2.replace(norm_topk_prob=True))
np.testing.assert_array_equal(mix.idx, renorm.idx)
np.testing.assert_allclose(mix.weights, renorm.weights, **tol("equiv64"))

# %% [markdown]
# **A masking pitfall.** In group-limited routing, experts in excluded groups must lose the top-$K$
# comparison. DeepSeek's inference code masks them with $-\infty$. Older HF, vLLM and SGLang code
# filled them with `0.0` instead. When all *biased* scores are negative, which can happen because
# $b_i$ is unbounded, a `0.0` fill makes the excluded experts win. `mask_value=0.0` reproduces the
# bug:

# %%
grp = v3.replace(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1)
gate_neg = {"weight": np.eye(8, D) * 0.5, "e_score_correction_bias": np.full(8, -2.0)}
u = np.eye(8, D)[:3] + 0.1
good, _ = gate_forward(u, gate_neg, grp)
leaky, _ = gate_forward(u, gate_neg, grp, mask_value=0.0)
print("kept group per token:", (good.idx // 2)[:, 0], " -inf mask picks:", good.idx.tolist(),
      " 0.0 mask picks:", leaky.idx.tolist())
assert np.all(good.idx // 2 == (good.idx // 2)[:, :1]) and np.all(leaky.idx // 2 != (good.idx // 2)[:, :1])

# %% [markdown]
# ## 3. Sparse dispatch and the backward pass
#
# For token $t$ with router input $u_t$, the layer's output is the sum of its $K_s$ shared experts
# and of the $K$ routed experts chosen for it, each weighted by its gate value $g_{i,t}$
# ({eq}`eq-moe-v3-gate` for V3; DeepSeek-V2 eqs. 20-22, DeepSeek-V3 eq. 12):
#
# $$
# h'_t = u_t + \sum_{i=1}^{K_s} \mathrm{FFN}^{(s)}_i(u_t)
#       + \sum_{i \in \mathcal{T}_t} g_{i,t}\, \mathrm{FFN}^{(r)}_i(u_t),
# \qquad \mathcal{T}_t = \operatorname{TopK}\bigl(\{s_{j,t} + b_j\}_{j=1}^{E}, K\bigr),
# $$ (eq-moe-dispatch)
#
# where $\mathcal{T}_t$ is the set of chosen experts (with $b_j = 0$ for V2, which has no bias)
# and the residual $u_t$ is added by the block, not by `moe_forward`. Running all $E$ experts on
# every token and masking the unused outputs costs $E/K$ times too much. A real layer
# *dispatches* instead. It sorts the $NK$ (token, slot) copies by expert id, so each expert
# multiplies one contiguous block of rows with a single GEMM. It then *combines* the outputs back
# into token order, weighted by the gate values, which is the last sum of {eq}`eq-moe-dispatch`.
# The bookkeeping is a plan:
# `pos[n, k]` is the sorted row of token $n$'s $k$-th copy, and `offsets` delimits each expert's
# block. Both directions are gathers indexed by `pos`, which is what lets the Numba twins run over
# tokens in parallel without atomics.

# %%
show_source(make_plan, experts_forward, combine, checks=False)

# %%
tiny = ModelConfig.preset("tiny")            # V3-style: 8 experts in 4 groups, top-2 from 2 groups
params = init_moe_params(tiny, 3, std=0.3)
params["gate"]["weight"] = rng.standard_normal(params["gate"]["weight"].shape)
params["gate"]["e_score_correction_bias"] = 0.1 * rng.standard_normal(8)
x = rng.standard_normal((2, 6, tiny.hidden_size))
y, cache, info = moe_forward(x, params, tiny)
plan = cache.plan
print("expert of each (token, slot):\n", info["idx"].reshape(-1, 2).T)
print("sorted row of each copy:\n", plan.pos.T, "\nexpert blocks:", plan.offsets)
np.testing.assert_allclose(y, moe_dense_reference(x, params, tiny), **tol("equiv64"))
for backend in ("numpy", "numba"):
    np.testing.assert_allclose(moe_forward(x, params, tiny, backend=backend)[0], y, **tol("equiv64"))

# %% [markdown]
# The backward pass runs the forward steps in reverse: combine, the expert GEMMs, dispatch, and
# finally the router. The selection itself is a step function with zero gradient almost everywhere.
# Gradient therefore reaches the gate only through the values of the chosen scores, including the
# renormalisation $w_k = \gamma s_k / \sum_j s_j$, whose derivative is
# $\partial w_k / \partial s_j = \gamma(\delta_{kj} - w_k/\gamma) / \sum s$. The bias receives none.
# A balance loss adds a gradient on *all* scores (`dscores`), which joins at the same point.

# %%
show_source(moe_backward)


def layer(x, params):
    y, cache, info = moe_forward(x, params, tiny)
    loss, lc = seq_balance_forward(info["scores"], info["idx"], alpha=0.1)
    return (y, loss), lambda d: moe_backward(d[0], cache, dscores=balance_backward(d[1], lc))


err = check_grad(layer, [x, params], max_entries=40)
print(f"finite differences vs hand-written backward (x, gate, all experts, shared, + balance "
      f"loss): {err:.1e}")
assert err < tol("gradcheck")["rtol"]

# %% [markdown]
# ## 4. Device- and node-limited routing
#
# With expert parallelism, each GPU holds a slice of the experts. Every token is sent, in an
# all-to-all *dispatch*, to the GPUs that hold its experts, and the results come back in a
# *combine*. Between nodes this traffic crosses InfiniBand, which is about 3.2× slower than NVLink
# inside a node (V3 §3.2.2). V2 therefore limits each token to experts on at most 3 devices (§2.2.2).
# V3 limits each token to at most 4 of its 8 nodes, ranking the nodes by the sum of their two best
# biased affinities (§2.1.2). The dispatch then sends one copy per target node over IB and fans it
# out over NVLink inside the node.
#
# The simulation below uses V3's shape: 256 experts on 64 GPUs (8 nodes of 8), top-8, with nodes
# as routing groups. It counts, per token, the nodes it reaches and the copies that cross a node
# boundary, with and without the node limit.

# %% tags=["hide-input"]
ep = ModelConfig.preset("deepseek-v3").replace(hidden_size=D)
gate_ep = {"weight": rng.standard_normal((256, D)) / np.sqrt(D), "e_score_correction_bias": np.zeros(256)}
tok = rng.standard_normal((4096, D))
stats = node_limited_comparison(tok, gate_ep, ep, n_devices=64, devices_per_node=8)
rows = []
for name, s in stats.items():
    rows.append((name, f"{s['mean_nodes_per_token']:.2f}", s["max_nodes_per_token"],
                 f"{s['cross_node_tokens'] / len(tok):.2f}", f"{s['cross_node_tokens_per_device'] / len(tok):.2f}"))
table(["routing", "nodes per token (mean)", "max", "IB copies per token (one per node)",
       "IB copies per token (one per device)"], rows)
lim, free = stats["limited"], stats["unlimited"]
assert lim["max_nodes_per_token"] <= 4 < free["max_nodes_per_token"]
saving = 1 - lim["cross_node_tokens"] / free["cross_node_tokens"]
print(f"node-limited routing cuts cross-node dispatch traffic by {saving:.0%}; at d=7168 in FP8 that is "
      f"{(free['cross_node_tokens'] - lim['cross_node_tokens']) / len(tok) * 7168 / 1024:.1f} KiB per token "
      "per MoE layer, each way")
assert saving > 0.15

fig, ax = plt.subplots(figsize=(6, 3))
bins = np.arange(0.5, 9.5)
ax.hist([free["nodes_per_token"], lim["nodes_per_token"]], bins=bins, label=["unlimited", "≤ 4 nodes"])
ax.set(xlabel="distinct nodes holding a token's 8 experts", ylabel="tokens", title="Node-limited routing (V3)")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Per-device load (`device_load` in the stats) is a separate problem: node limits bound the traffic
# per token, but nothing here prevents a popular GPU from receiving far more tokens than the others.
# That is the job of load balancing.
#
# ## 5. Load balancing: collapse, auxiliary losses, and V3's bias
#
# If the router is left to itself, the experts that win the first few steps are the ones that get
# trained. They get better, so they win more often, and routing *collapses* onto a few experts.
# The rest are wasted. V2 counters this with auxiliary losses of the form $\alpha\sum_i f_i P_i$,
# where $f_i$ is the (non-differentiable) fraction of tokens sent to expert $i$ and $P_i$ is its
# mean score. There is one loss per level: expert, device and communication (V2 §2.2.3). Each loss
# equals its $\alpha$ when routing is exactly uniform:

# %%
t_tok, n_dev, per_dev = 16, 4, 4
uniform_idx = np.array([[((t + j) % n_dev) * per_dev + ((t // n_dev + j) % per_dev) for j in range(2)]
                        for t in range(t_tok)])                       # each expert twice, 2 devices/token
uniform_scores = np.full((t_tok, n_dev * per_dev), 1 / (n_dev * per_dev))
for name, (loss, _) in {"expert (α1=0.003)": expert_balance_forward(uniform_scores, uniform_idx, 0.003),
                        "device (α2=0.05)": device_balance_forward(uniform_scores, uniform_idx, n_dev, 0.05),
                        "comm (α3=0.02, M=2)": comm_balance_forward(uniform_scores, uniform_idx, n_dev, 2, 0.02),
                        "V3 sequence-wise (α=1e-4)": seq_balance_forward(uniform_scores, uniform_idx, 1e-4)}.items():
    print(f"{name:28s} = {float(loss):.6g}")
    assert np.isclose(float(loss), float(name.split("=")[1].split(",")[0].rstrip(")")))

# %% [markdown]
# An auxiliary loss trades model quality for balance, because its gradient pulls against the
# language-modelling loss. V3 drops it, apart from a tiny sequence-wise term ($\alpha = 10^{-4}$).
# Instead it nudges the selection bias after every step, outside the gradient: an overloaded expert
# has $b_i$ lowered by $\gamma$ and an underloaded one has it raised (§2.1.2).
#
# The recipe `refimpl.recipes.moe_balance` trains a 16-expert, top-2 layer on a toy regression
# problem three times, from the same initialisation on the same batches: with no balancing, with an
# auxiliary loss, and with the bias update. The tokens share a large common component, as real
# hidden states do, so on the first step they all prefer the same experts. The metric is MaxVio,
# $(\max_i \mathrm{load}_i - \overline{\mathrm{load}})/\overline{\mathrm{load}}$, which is 0 for
# perfect balance and 7 when two experts take every token.

# %%
show_source(moe_balance_run, checks=False)

# %% [markdown]
# **The verdict first** (the cell below asserts it): left to itself, routing collapses onto a
# handful of experts (MaxVio above 4); both the auxiliary loss and V3's bias keep every expert
# busy (MaxVio below 0.6), and both reach a lower training error than the collapsed run.

# %%
res = moe_balance_run(progress=False)
runs = res["runs"]
titles = {"none": "(a) no balancing", "aux": "(b) auxiliary loss", "bias": "(c) V3 bias update"}
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
for ax, (mode, h) in zip(axes, runs.items(), strict=False):
    frac = h["load"] / h["load"].sum(1, keepdims=True)
    im = ax.imshow(frac.T, aspect="auto", cmap="viridis", vmin=0, vmax=0.25, interpolation="nearest")
    ax.set(title=titles[mode], xlabel="step", ylabel="expert")
fig.colorbar(im, ax=axes[2], label="share of routed copies")
for mode, h in runs.items():
    axes[3].plot(h["maxvio"], label=titles[mode])
axes[3].set(xlabel="step", ylabel="MaxVio", title="load imbalance")
axes[3].legend()
fig.tight_layout()
plt.show()

final = {m: float(h["maxvio"][-50:].mean()) for m, h in runs.items()}
final_loss = {m: float(h["loss"][-50:].mean()) for m, h in runs.items()}
table(["run", "MaxVio (last 50 steps)", "training MSE (last 50 steps)"],
      [(titles[m], f"{final[m]:.2f}", f"{final_loss[m]:.3f}") for m in runs])
assert final["none"] > 4.0                                   # collapsed onto a handful of experts
assert final["aux"] < 0.6 and final["bias"] < 0.6            # both cures keep every expert busy
assert final_loss["bias"] < final_loss["none"] and final_loss["aux"] < final_loss["none"]

# %% [markdown]
# Without balancing, the load collapses onto two or three experts and the fit is the worst of the
# three. Both cures spread the load. The bias update does it without adding anything to the loss.
#
# The recipe's default router does not renormalise the chosen scores, because collapse is then
# quick and complete. With V3's exact router (renormalised, `norm_topk_prob=True`) and $K = 2$, the
# gate's gradient only moves weight *between* the two chosen experts. At this toy scale the load
# still becomes skewed, but more slowly:

# %%
res_v3 = moe_balance_run(progress=False, norm_topk_prob=True, modes=("none", "bias"))
vio_v3 = {m: float(h["maxvio"][-50:].mean()) for m, h in res_v3["runs"].items()}
print(f"renormalised V3 router: MaxVio {vio_v3['none']:.2f} without balancing, "
      f"{vio_v3['bias']:.2f} with the bias")
assert vio_v3["none"] > 2 * vio_v3["bias"]

# %% [markdown]
# **Token dropping.** V2 also caps the work per device during training. Each device computes at
# most a capacity-factor multiple of the average number of (token, expert) copies (factor 1.0 in
# V2). The copies with the lowest affinity beyond that are dropped, and the residual connection
# carries those tokens unchanged (§2.2.4). V3 never drops tokens. With 8 devices of 2 experts, a
# skewed router loses most of its work to the cap, while an unskewed one loses only the random
# fluctuation above the average:

# %%
for name, skew in (("router favouring experts 0-1", 1.0), ("unskewed router", 0.0)):
    cfgd = base.replace(n_routed_experts=16, num_experts_per_tok=2, n_group=8, topk_group=8)
    pd = init_moe_params(cfgd, 4, std=0.2)
    pd["gate"]["weight"] = rng.standard_normal((16, D)) / np.sqrt(D)
    # centroids aligned with the common offset
    pd["gate"]["weight"][:2] += skew
    xd = rng.standard_normal((512, D)) + skew * 0.5
    _, _, inf = moe_forward(xd, pd, cfgd, capacity_factor=1.0, n_devices=8)
    print(f"{name:30s} capacity {inf['capacity']} copies/device, dropped "
          f"{inf['drop_fraction']:5.1%} "
          f"of copies; tokens with no expert computed: {inf['tokens_fully_dropped']}")
    assert np.all(inf["device_load"] - inf["device_dropped"] <= inf["capacity"])
    assert inf["dropped"] == 2 * 512 - inf["load_kept"].sum()

# %% [markdown]
# ## 6. Total and active parameters
#
# `count_parameters` counts from the config fields alone. It includes MLA, the dense FFNs of the
# first layers, and each MoE layer's gate, routed and shared experts, plus norms, embedding and LM
# head. *Active* parameters are those one token's forward pass multiplies with: $K$ of the $E$
# routed experts, and the LM head, but not the embedding table, which is only a row lookup. With
# this convention the counts round to the published figures: V2-Lite 15.7B/2.4B, V2 236B/21B, and
# V3 671B/37B (V3 excludes its 14B multi-token-prediction module). V2-Lite's active count is 2.45B,
# which the paper writes as 2.4B.

# %% tags=["hide-input"]
rows = []
for name, published in (("deepseek-v2-lite", (15.7, 2.4)), ("deepseek-v2", (236, 21)), ("deepseek-v3", (671, 37))):
    c = count_parameters(ModelConfig.preset(name))
    moe_share = (c["moe_routed"] + c["moe_shared"] + c["moe_gate"]) / c["total"]
    rows.append((name, f"{c['total'] / 1e9:.2f}B", f"{c['active'] / 1e9:.2f}B", f"{published[0]}B / {published[1]}B",
                 f"{c['active'] / c['total']:.1%}", f"{moe_share:.1%}"))
    digits = 1 if name.endswith("lite") else 0
    assert round(c["total"] / 1e9, digits) == published[0]
    rounded = round(c["active"] / 1e9, digits) == published[1]
    truncated = math.floor(c["active"] / 1e8) / 10 == published[1]          # V2-Lite: 2.45B printed as 2.4B
    assert rounded or (name == "deepseek-v2-lite" and truncated)
table(["model", "total", "active", "published", "active share", "MoE share of total"], rows)
assert 0.975 < moe_share < 0.985 and 0.05 < c["active"] / c["total"] < 0.06      # V3, the last row

# %% [markdown]
# Almost 98% of V3's parameters sit in MoE layers, yet each token touches only about 5.5% of the
# model. That ratio is what makes a 671B model affordable to serve. Keeping it efficient depends
# on the engineering above: node-limited routing to bound the traffic, and balancing so that no GPU
# idles while another is swamped.
#
# The next chapter, {doc}`05_tiny_v3`, puts this layer and the MLA of {doc}`03_mla` into a whole
# model and trains it with the bias update of section 5; {doc}`09_cost` counts what the layer costs
# at full scale.

# %%
print(f"chapter executed in {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## Summary
#
# What this chapter measured (the numbers are computed by the cells above when the page is built):

# %% tags=["hide-input"]
v3_count = count_parameters(ModelConfig.preset("deepseek-v3"))
summary = [
    f"* Without balancing, the toy MoE collapsed onto a few experts (MaxVio {final['none']:.2f}, mean of the "
    f"last 50 steps); the auxiliary loss brought it to {final['aux']:.2f} and V3's bias update to "
    f"{final['bias']:.2f}, both with a lower training error than the collapsed run.",
    f"* With V3's renormalised sigmoid router the bias alone cut MaxVio from {vio_v3['none']:.2f} to "
    f"{vio_v3['bias']:.2f}.",
    f"* Limiting each token to 4 of V3's 8 nodes cut the cross-node dispatch traffic by {saving:.0%} on random tokens.",
    f"* DeepSeek-V3 holds {v3_count['total'] / 1e9:.0f}B parameters, of which {v3_count['active'] / 1e9:.0f}B "
    f"({v3_count['active'] / v3_count['total']:.1%}) are active for a token.",
]
display(Markdown("\n".join(summary)))
assert final["bias"] < final["none"] and vio_v3["bias"] < vio_v3["none"] and saving > 0

# %% [markdown]
# ## Exercises
#
# The solutions are hidden under each exercise; they run when the book is built and assert their
# answers.
#
# 1. **Combinations.** DeepSeekMoE's paper starts from 16 experts with top-2 routing and splits
#    each expert into 4. How many expert combinations can a token choose from before and after the
#    split? How many does DeepSeek-V3 have (256 routed experts, top-8), and how many if its routing
#    were restricted to 4 of 8 groups of 32 experts?

# %% tags=["hide-cell"]
# Exercise 1
before, after = math.comb(16, 2), math.comb(64, 8)
v3_all, v3_groups = math.comb(256, 8), math.comb(8, 4) * math.comb(4 * 32, 8)
print(f"16 experts, top-2: {before:,}; 64 fine-grained, top-8: {after:,}")
print(f"V3: {v3_all:.3e} combinations; an upper bound with 4 of 8 groups: {v3_groups:.3e}")
assert (before, after) == (120, 4_426_165_368)
assert v3_groups < v3_all          # group-limited routing only removes combinations

# %% [markdown]
# 2. **The bias only selects.** By {eq}`eq-moe-v3-gate`, V3's gate values depend on the bias $b$
#    only through the set of chosen experts. Show with `gate_forward` that adding a small random
#    bias changes no gate value of a token whose selection it does not change, and find a token
#    whose selection it does change.

# %% tags=["hide-cell"]
# Exercise 2
bias_small = 0.02 * rng.standard_normal(E)
r_plain, _ = gate_forward(tokens, {"weight": w_gate, "e_score_correction_bias": np.zeros(E)}, v3)
r_biased, _ = gate_forward(tokens, {"weight": w_gate, "e_score_correction_bias": bias_small}, v3)
same = np.all(np.sort(r_plain.idx, 1) == np.sort(r_biased.idx, 1), axis=1)
order = np.argsort(r_plain.idx, 1), np.argsort(r_biased.idx, 1)
w_plain = np.take_along_axis(r_plain.weights, order[0], 1)
w_biased = np.take_along_axis(r_biased.weights, order[1], 1)
np.testing.assert_allclose(w_biased[same], w_plain[same], rtol=1e-14)
print(f"{same.sum()} of {len(same)} tokens keep their experts and their gate values exactly; "
      f"{(~same).sum()} change experts")
assert 0 < (~same).sum() < len(same)

# %% [markdown]
# 3. **The combine, by hand.** Compute {eq}`eq-moe-dispatch` for one token of the section 3 layer
#    without the dispatch machinery: run each chosen expert (`swiglu_mlp_forward` on that expert's
#    slice of `params["experts"]`) and the shared expert on the token, weight the routed outputs by
#    the gate values, and compare with `moe_forward`.

# %% tags=["hide-cell"]
# Exercise 3
x3 = rng.standard_normal((3, tiny.hidden_size))
y3, _, info3 = moe_forward(x3, params, tiny)
t = 1
by_hand = swiglu_mlp_forward(x3[t], params["shared_experts"])[0] if tiny.n_shared_experts else 0.0
for e_id, g in zip(info3["idx"][t], info3["weights"][t], strict=True):
    expert = {name: w[e_id] for name, w in params["experts"].items()}
    by_hand = by_hand + g * swiglu_mlp_forward(x3[t], expert)[0]
np.testing.assert_allclose(by_hand, y3[t], **tol("equiv64"))
print(f"token {t}: experts {info3['idx'][t].tolist()}, gates {np.round(info3['weights'][t], 3).tolist()}; "
      "the sum by hand equals moe_forward")

# %% [markdown]
# 4. **The size of the bias step.** Route 4096 random tokens through a 16-expert, top-2 V3 router
#    whose first expert's centroid is aligned with the tokens' mean, so that every token picks it,
#    and apply `bias_update` for 12 steps (the router itself is frozen), once with $\gamma = 0.1$
#    and once with $\gamma = 0.01$. How does the favoured expert's load evolve in each case, and
#    why can a sign-based update not settle exactly?

# %% tags=["hide-cell"]
# Exercise 4
cfg4 = v3.replace(n_routed_experts=16, num_experts_per_tok=2, n_group=1, topk_group=1)
common = rng.standard_normal(D)
toks4 = rng.standard_normal((4096, D)) + common
w4 = rng.standard_normal((16, D)) / np.sqrt(D)
w4[0] = common / np.linalg.norm(common)
loads = {}
for gamma in (0.1, 0.01):
    b4, loads[gamma] = np.zeros(16), []
    for _ in range(12):
        r4, _ = gate_forward(toks4, {"weight": w4, "e_score_correction_bias": b4}, cfg4)
        load = np.bincount(r4.idx.ravel(), minlength=16)
        loads[gamma].append(int(load[0]))
        b4 = bias_update(b4, load, gamma)                  # b_i -= gamma * sign(load_i - mean)
    print(f"gamma = {gamma}: tokens on the favoured expert per step {loads[gamma]}")
# gamma = 0.1 removes the imbalance within a few steps, then overshoots: the bias moves by +-gamma whatever
# the size of the imbalance, so the expert's load swings between too few and too many tokens.
big, small = loads[0.1], loads[0.01]
assert min(big) < 0.05 * 4096 / 8 and any(b > a for a, b in zip(big, big[1:], strict=False))
# gamma = 0.01 moves steadily in the right direction, but after 12 steps is still far from balance;
# V3 uses gamma = 0.001 over many thousands of steps while the router's weights also learn.
assert all(b <= a for a, b in zip(small, small[1:], strict=False)) and small[-1] > 4096 / 8
