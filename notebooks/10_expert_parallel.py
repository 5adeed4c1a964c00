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
# # Expert parallelism
#
# A DeepSeekMoE layer computes only $K$ of its $E$ routed experts for each token, but it must
# *hold* all $E$ of them. DeepSeek-V3 has 256 routed experts in each of its 58 MoE layers; it
# trains with 64-way expert parallelism spanning 8 nodes, so each GPU keeps 4 experts per layer,
# and every MoE layer sends each token to the GPUs holding its experts and brings the results back
# {cite}`deepseekai2024v3`. The idea of sharding experts over devices and moving tokens with an
# all-to-all goes back to GShard and the Switch Transformer {cite}`lepikhin2021gshard,fedus2022switch`;
# DeepSeek wrote its own all-to-all kernels for it, later released as DeepEP {cite}`zhao2025deepep`.
#
# This chapter runs the layer over real processes: `refimpl.parallel` uses MPI (`mpi4py` with
# the MPICH wheel) as the distributed engine, and the chapter launches `mpiexec` from its cells.
#
# 1. why experts are spread over devices (memory, not compute);
# 2. what dispatch and combine send, and the backward pass that mirrors them;
# 3. a real 8-process run on 4 simulated nodes: the bytes each all-to-all moved;
# 4. how node-limited routing, with a dispatch that crosses to each node once, caps the traffic
#    between nodes;
# 5. the same code on 1, 2 and 4 processes gives the single-process results, for the layer and
#    for data-parallel training;
# 6. what the processes spend their time on, on this machine.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * spread a layer's experts over processes and move tokens with the all-to-all dispatch and
#   combine;
# * explain how node-limited routing caps the traffic between nodes;
# * check that expert-parallel and data-parallel training give the single-process result.
# ```

# %%
import os

# One BLAS thread per process: the chapter starts up to 8 MPI ranks on a small machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from refimpl.config import ModelConfig  # noqa: E402
from refimpl.display import show_source  # noqa: E402
from refimpl.moe import all_to_all_stats, gate_forward, moe_backward, moe_forward  # noqa: E402
from refimpl.parallel import (  # noqa: E402
    cross_node_bytes,
    ep_moe_backward,
    ep_moe_forward,
    globalize_loss_cache,
    intra_node_bytes,
    mpi_available,
    run_mpi,
)
from refimpl.parallel.worker import make_layer_case  # noqa: E402

assert mpi_available(), "this chapter needs the 'mpi' extra: pip install -e '.[mpi]'"
WORK = Path(tempfile.mkdtemp(prefix="refimpl-ep-"))


def launch(n, *args):
    """Run ``mpiexec -n n python -m refimpl.parallel.worker *args`` and return rank 0's results."""
    out = WORK / f"run{len(list(WORK.iterdir()))}.npz"
    res = run_mpi(n, ["-m", "refimpl.parallel.worker", *map(str, args), "--out", out], timeout=300)
    assert res.returncode == 0, res.stderr
    with np.load(out, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# %% [markdown]
# ## 1. Why spread the experts
#
# Count the routed-expert parameters of DeepSeek-V3 from its configuration: each expert is a
# SwiGLU FFN with three $D \times I$ matrices.

# %%
v3 = ModelConfig.preset("deepseek-v3")
per_expert = 3 * v3.hidden_size * v3.moe_intermediate_size
moe_layers = v3.num_hidden_layers - v3.first_k_dense_replace
routed = per_expert * v3.n_routed_experts * moe_layers
print(f"one expert: {per_expert / 1e6:.1f}M parameters; {v3.n_routed_experts} experts x "
      f"{moe_layers} MoE layers "
      f"= {routed / 1e9:.0f}B parameters = {2 * routed / 1e12:.2f} TB in BF16")
print(f"per token: {v3.num_experts_per_tok} of {v3.n_routed_experts} experts = "
      f"{v3.num_experts_per_tok / v3.n_routed_experts:.1%} of the routed compute")
print(f"64-way expert parallelism: {v3.n_routed_experts // 64} experts per GPU per layer, "
      f"{2 * routed / 64 / 1e9:.1f} GB of BF16 expert weights per GPU")
assert 650e9 < routed < 660e9 and v3.n_routed_experts % 64 == 0

# %% [markdown]
# Almost all of V3's 671B parameters are routed experts, and each token touches 3% of them. No
# accelerator holds 1.3 TB, but the work per token is small. So the experts are *sharded*: device
# $r$ of $R$ holds a contiguous block $\mathcal{E}_r$ of $E/R$ experts of every MoE layer. Attention
# and the router stay data-parallel, so every device keeps its own tokens. The price is
# communication: in each MoE layer, each token travels to the devices that hold its experts.

# %% tags=["remove-cell"]
# A diagram drawn by refimpl.diagrams from the config it shows; glued into the figure below.
from myst_nb import glue

from refimpl.diagrams import expert_parallel_diagram

glue("diagram-expert-parallel", expert_parallel_diagram("deepseek-v3", n_ranks=4), display=False)
plt.close("all")

# %% [markdown]
# ## 2. Dispatch and combine
#
# ```{glue:figure} diagram-expert-parallel
# ---
# alt: >-
#   Expert parallelism over four ranks: each rank holds a quarter of DeepSeek-V3's routed experts;
#   an all-to-all sends every token to the ranks of its chosen experts and a second all-to-all
#   brings the weighted outputs back.
# name: diagram-expert-parallel
# ---
# Expert-parallel dispatch and combine with DeepSeek-V3's routed experts split over four ranks
# (drawn by `refimpl.diagrams.expert_parallel_diagram`; two of each token's experts are drawn).
# ```
#
# Split the routed sum of {eq}`eq-moe-dispatch` by the device that holds each expert:
#
# $$
# y_t = \sum_{i=1}^{K_s} \mathrm{FFN}^{(s)}_i(u_t)
#     + \sum_{r=0}^{R-1} \underbrace{\sum_{i \in \mathcal{T}_t \cap \mathcal{E}_r}
#       g_{i,t}\, \mathrm{FFN}^{(r)}_i(u_t)}_{\text{computed on device } r}.
# $$ (eq-ep-combine)
#
# Device $r$ computes its inner sum only if $\mathcal{T}_t \cap \mathcal{E}_r$ is non-empty. In
# `ep_moe_forward`, the token's home rank therefore does the following:
#
# * **dispatch**: send one copy of $u_t$ ($D$ values) to each rank in
#   $\{r : \mathcal{T}_t \cap \mathcal{E}_r \neq \emptyset\}$, whatever the number of its experts
#   there. With the copy go $K$ slot ids and $K$ gate values, so the receiver knows which of its
#   experts to apply and with what weight. MPI does this with an `Alltoall` of the row counts
#   followed by one `Alltoallv` per payload.
# * The receiving rank runs the single-process machinery (`make_plan`, one GEMM per local expert)
#   on the rows it received, and forms the inner sum of {eq}`eq-ep-combine` for each row.
# * **combine**: the reverse `Alltoallv` returns one partial sum ($D$ values) per row, and the home
#   rank adds them up. Routing is the single-process router, so V2's device-limited and V3's
#   node-limited top-$k$ work unchanged.
#
# With `two_hop=True` the dispatch takes two steps, as V3's kernels do (§3.2.2). First a token
# goes **once** to each remote node that holds one of its experts: it goes to the rank with the
# same index inside that node (labels `inter/...`). That rank then forwards it inside its node to
# the ranks holding the experts (labels `intra/...`). The combine comes back the same two steps,
# and each rank adds up the partial sums of the rows it forwarded.
#
# The backward pass mirrors this. The output gradient $\partial L/\partial y_t$ travels like a
# dispatch, since the adjoint of "send back and add" is "send out". Each rank back-propagates
# through its experts and its weighted sums. Then $\partial L/\partial u_t$ and
# $\partial L/\partial g_{i,t}$ travel home like a combine. The expert weights' gradients stay
# where the experts are. The router and shared-expert gradients are per-rank partial sums, which
# data parallelism all-reduces.

# %%
show_source(ep_moe_forward, ep_moe_backward, checks=False)

# %% [markdown]
# ## 3. A real run: 8 processes on 4 simulated nodes
#
# Eight MPI ranks play the GPUs, two per simulated node. This is V3's shape at half scale: 32
# experts (4 per rank), $K = 8$, and node-limited routing to $M = 2$ of the 4 nodes, the groups of
# the router being the nodes. Each rank holds 64 tokens. The same tokens are also routed with the
# limit lifted ($M = 4$), and each routing runs with the one-hop and the two-hop dispatch. `Comm`
# records the bytes handed to every all-to-all, read from the very counts and datatype given to MPI.

# %% tags=["hide-input"]
NODE = dict(experts=32, k=8, n_group=4, hidden=64, inter=16, tokens=[64] * 8)
PER_NODE = 2
runs, runs2 = {}, {}     # one-hop and two-hop dispatch, by node limit M
for routing, m in (("v3", 2), ("v3-unlimited", 4)):
    for out, hops in ((runs, []), (runs2, ["--two-hop"])):
        out[m] = launch(8, "layer", "--routing", routing, "--experts", NODE["experts"], "--k", NODE["k"],
                        "--n-group", NODE["n_group"], "--topk-group", 2, "--hidden", NODE["hidden"],
                        "--inter", NODE["inter"], "--tokens", 64, "--devices-per-node", PER_NODE, *hops)
labels = [k.removeprefix("traffic.") for k in runs[2] if k.startswith("traffic.")]
rows = [f"| `{lab}` | " + " | ".join(f"{int(runs[m][f'traffic.{lab}'].sum()):,}" for m in (2, 4)) + " |"
        for lab in labels]
display(Markdown("| all-to-all | bytes, $M=2$ | bytes, $M=4$ (no limit) |\n|---|---|---|\n" + "\n".join(rows)))

# %% [markdown]
# The table lists every all-to-all of one forward and backward pass, summed over the ranks. The
# hidden rows dominate: `dispatch/x`, `combine/y` and their mirrors in the backward carry $D$
# values per row, while slot ids and weights carry $K$. `dispatch/counts` is the small `Alltoall`
# that tells each rank how many rows to expect. The four hidden-row exchanges have equal totals.
# The backward sends the same rows as the forward, in the opposite direction.
#
# Below, the dispatch matrix: bytes from each source rank (row) to each destination rank
# (column). The dashed lines are node boundaries. The diagonal blocks never leave the rank.

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
vmax = max(runs[m]["traffic.dispatch/x"].max() for m in runs)
for ax, m in zip(axes, (2, 4), strict=True):
    mat = runs[m]["traffic.dispatch/x"] / 1e3
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=vmax / 1e3)
    for b in np.arange(PER_NODE, 8, PER_NODE) - 0.5:
        ax.axhline(b, color="w", ls="--", lw=1)
        ax.axvline(b, color="w", ls="--", lw=1)
    ax.set_title(f"one-hop dispatch, M={m}" + (" (no limit)" if m == 4 else " (node-limited)"))
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
fig.colorbar(im, ax=axes, label="kB")
plt.show()

# %% [markdown]
# The measured bytes must equal the prediction of the single-process simulation
# (`refimpl.moe.traffic.all_to_all_stats`) *exactly*. The simulation never runs MPI. It only
# counts, from the routed expert ids, the distinct ranks that each token must visit (one-hop) and
# the distinct remote nodes (two-hop).

# %%
d, k = NODE["hidden"], NODE["k"]
home = np.repeat(np.arange(8), NODE["tokens"])
sims = {}
for m in (2, 4):
    r = runs[m]
    sim = all_to_all_stats(r["idx"], NODE["experts"], 8, PER_NODE, token_device=home, hidden_size=d,
                           bytes_per_value=8)
    sims[m] = sim
    # float64 rows
    np.testing.assert_array_equal(r["traffic.dispatch/x"], sim["a2a_tokens"] * d * 8)
    np.testing.assert_array_equal(r["traffic.combine/y"], sim["a2a_tokens"].T * d * 8)
    np.testing.assert_array_equal(r["traffic.dispatch/slots"], sim["a2a_tokens"] * k * 8)
    assert cross_node_bytes(r["traffic.dispatch/x"], PER_NODE) == sim["cross_node_tokens_per_device"] * d * 8
    assert intra_node_bytes(r["traffic.dispatch/x"], PER_NODE) == sim["intra_node_tokens"] * d * 8
    two = cross_node_bytes(runs2[m]["traffic.inter/dispatch/x"], PER_NODE)
    # = cross_node_tokens x D x 8 B
    assert two == sim["cross_node_bytes"]
    assert cross_node_bytes(runs2[m]["traffic.intra/dispatch/x"], PER_NODE) == 0
    # same layer, other route
    np.testing.assert_allclose(runs2[m]["y"], r["y"], rtol=1e-12, atol=1e-14)
    print(f"M={m}: cross-node dispatch bytes, one-hop "
          f"{cross_node_bytes(r['traffic.dispatch/x'], PER_NODE):,} "
          f"(= {sim['cross_node_tokens_per_device']} rows x {d} x 8 B simulated), two-hop {two:,} "
          f"(= {sim['cross_node_tokens']} rows); at most {sim['max_nodes_per_token']} nodes per token")
assert sims[2]["max_nodes_per_token"] <= 2 < sims[4]["max_nodes_per_token"]

# %% [markdown]
# ## 4. How node-limited routing caps cross-node traffic
#
# Inside a node, GPUs talk over NVLink. Between nodes they use InfiniBand, about 3.2 times slower
# in V3's cluster (160 vs 50 GB/s, V3 §3.2.2). V3 therefore restricts each token to the experts of
# at most $M = 4$ of the 8 nodes. The nodes are picked by the sum of the 2 best affinities on each
# node (§2.1.2; the router's group step with groups = nodes, {doc}`04_moe`). A token then crosses
# the node boundary at most $M$ times, whatever $K$ is, provided it crosses to a remote node only
# **once** and is forwarded inside that node over NVLink: that is the two-hop dispatch. The
# one-hop dispatch sends one copy per remote *rank* and can cross more often.
#
# The sweep below routes the same 512 tokens with $M = 1, \dots, 4$. It is simulated in-process,
# and the four MPI runs above are overlaid as measured points.

# %% tags=["hide-input"]
cfg, params, x, _ = make_layer_case("v3", tokens=NODE["tokens"], experts=NODE["experts"], k=k,
                                    n_group=NODE["n_group"], topk_group=2, hidden=d, inter=NODE["inter"])
n_tok = x.shape[0]
sweep = {}
for m in range(1, 5):
    routing, _ = gate_forward(x, params["gate"], cfg.replace(topk_group=m))
    sweep[m] = all_to_all_stats(routing.idx, NODE["experts"], 8, PER_NODE, token_device=home)
    assert sweep[m]["max_nodes_per_token"] <= m
np.testing.assert_array_equal(sweep[2]["a2a_tokens"], sims[2]["a2a_tokens"])   # the sweep reproduces the runs
ms = np.arange(1, 5)
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(ms, [sweep[m]["cross_node_tokens_per_device"] / n_tok for m in ms], "o-", label="one-hop (per remote rank)")
ax.plot(ms, [sweep[m]["cross_node_tokens"] / n_tok for m in ms], "s-", label="two-hop (per remote node)")
ax.plot(ms, ms, "k:", label="bound: M remote nodes")
ax.plot([2, 4], [cross_node_bytes(runs[m]["traffic.dispatch/x"], PER_NODE) / (d * 8) / n_tok for m in (2, 4)],
        "r*", ms=14, label="measured over MPI, one-hop")
ax.plot([2, 4], [cross_node_bytes(runs2[m]["traffic.inter/dispatch/x"], PER_NODE) / (d * 8) / n_tok for m in (2, 4)],
        "kP", ms=10, label="measured over MPI, two-hop")
ax.set_xlabel("node limit M (of 4 nodes)")
ax.set_ylabel("cross-node copies per token (dispatch)")
ax.set_ylim(0, None)
ax.set_xticks(ms)
ax.legend(fontsize=8)
ax.set_title(f"{NODE['experts']} experts on 8 ranks / 4 nodes, K={k}")
plt.show()

# %% [markdown]
# The two-hop count never exceeds $M$. It is smaller than the one-hop count because several of a
# token's experts often sit on the two ranks of one node. The two-hop dispatch pays for this with
# a second, intra-node step: the forwarded copies cross NVLink instead. Without the limit, a token
# with $K = 8$ experts can reach every node. What the limit buys is a *guarantee*: however many
# experts a token selects, its InfiniBand traffic is capped at $M$ copies.

# %% [markdown]
# ## 5. The same code on 1, 2, 4 processes
#
# The expert-parallel layer must compute the single-process layer, only spread out. Here the same
# 16 tokens go through the layer on 1, 2 and 4 ranks, and each result is compared with
# `moe_forward` / `moe_backward` run here on all the tokens. Rank 1 holds no tokens in the 4-rank
# run, and the last quarter of the experts is never chosen, so rank 3 receives nothing.

# %% tags=["hide-input"]
split = [(1, "16", []), (2, "9,7", []), (4, "6,0,7,3", []),
         (4, "6,0,7,3", ["--two-hop", "--devices-per-node", 2])]
cfg, params, x, dy = make_layer_case("v3", tokens=[16], idle=True)
y, cache, info = moe_forward(x, params, cfg)
dx, grads = moe_backward(dy, cache)
table = ["| ranks | tokens per rank | dispatch | max abs diff y | max abs diff dx | max abs diff dW (all) |",
         "|---|---|---|---|---|---|"]
for n, tokens, extra in split:
    r = launch(n, "layer", "--routing", "v3", "--tokens", tokens, "--idle", *extra)
    dw = max(np.max(np.abs(r[f"d.{p}.{nm}"] - g)) for p, tree in grads.items() for nm, g in tree.items())
    diffs = np.max(np.abs(r["y"] - y)), np.max(np.abs(r["dx"] - dx)), dw
    how = "two-hop, 2 nodes" if extra else "one-hop"
    table.append(f"| {n} | {tokens} | {how} | " + " | ".join(f"{v:.1e}" for v in diffs) + " |")
    assert max(diffs) < 1e-12
    if n == 4 and not extra:
        assert r["traffic.dispatch/x"][:, 3].sum() == 0     # rank 3's experts received no token
display(Markdown("\n".join(table)))

# %% [markdown]
# The differences are float64 round-off. The partial sums are added in a different order than in
# one process, so the results are not bitwise identical.
#
# **Data parallelism.** Training the tiny V3 of {doc}`05_tiny_v3` on 2 ranks, each with half of
# every batch, must give the parameters of one process on the whole batch. Two things need care.
# First, the loss is a mean over the non-ignored targets of the *global* batch. The ranks hold
# different numbers of targets (prompts and padding are masked), so averaging the ranks' own means
# would be wrong. `globalize_loss_cache` gives each rank's backward pass the global counts, and
# the all-reduced *sum* is then the global gradient. Second, V3's bias update uses the expert load
# of the global batch, so each layer's load is all-reduced before the update.

# %%
show_source(globalize_loss_cache)

# %%
from refimpl.model.train import train  # noqa: E402
from refimpl.parallel.worker import train_start  # noqa: E402
from refimpl.tree import tree_flatten, tree_paths  # noqa: E402

r = launch(2, "train", "--steps", 3, "--batch", 4, "--length", 32)
ref = train(*train_start(3, 4, 32), progress=False)    # the same start and settings, in one process
worst = max(float(np.max(np.abs(r[f"p.{p}"] - a)))
            for p, a in zip(tree_paths(ref.params), tree_flatten(ref.params)[0], strict=True))
hist = json.loads(bytes(r["history"]).decode())
print("losses, 2 ranks:", np.round(hist["loss"], 6), " one process:", np.round(ref.history["loss"], 6))
print(f"largest parameter difference after 3 steps: {worst:.1e}; replicas identical across ranks: "
      f"{float(r['replica_spread']) == 0.0}")
assert worst < 1e-10 and float(r["replica_spread"]) == 0.0

# %% [markdown]
# ## 6. Time, on this machine
#
# A strong-scaling run of the layer's forward and backward (`python -m benchmarks.bench_parallel`)
# passes the same global batch through 1, 2 and 4 ranks. The build machine has few cores, so
# 4 ranks are oversubscribed: they share cores and measure contention, not scaling. The numbers
# below come from the machine that built this page, so read the ratios, not the absolute times.
# "Waiting" is the time spent at a barrier before each all-to-all, for the slowest rank. It
# measures load imbalance and time-slicing, not communication.

# %% tags=["hide-input"]
import refimpl  # noqa: E402

sys.path.insert(0, str(Path(refimpl.__file__).resolve().parents[1]))   # the repository, for benchmarks/
import benchmarks.bench_parallel as bench_parallel  # noqa: E402

timing = bench_parallel.run(tokens=1024, ranks=(1, 2, 4), repeats=3, log=lambda line: None)
display(Markdown(bench_parallel.table(timing)))
shutil.rmtree(WORK)          # the runs' .npz files

# %% [markdown]
# In a real cluster, each rank is a GPU that computes its experts' GEMMs in microseconds, so the
# all-to-all becomes the larger share. That is why V3 overlaps it with computation (DualPipe,
# §3.2.1), sends it in FP8 (§3.3), and caps it with node-limited routing.

# %% [markdown]
# ## Summary
#
# What this chapter measured (the numbers are computed by the cells above when the page is built):

# %% tags=["hide-input"]
summary = [
    f"* DeepSeek-V3's routed experts hold {routed / 1e9:.0f}B parameters; 64-way expert parallelism leaves "
    f"{v3.n_routed_experts // 64} experts per GPU in each MoE layer.",
    f"* Over 8 MPI processes on 4 simulated nodes, the bytes each all-to-all moved equal the in-process "
    f"simulation; with the node limit M = 2 a token reached at most {sims[2]['max_nodes_per_token']} nodes, "
    f"with M = 4 up to {sims[4]['max_nodes_per_token']}.",
    f"* Data-parallel training on 2 ranks matched one process to {worst:.1e} in every parameter after 3 steps.",
]
display(Markdown("\n".join(summary)))
assert sims[2]["max_nodes_per_token"] <= 2 and worst < 1e-10

# %% [markdown]
# ## Exercises
#
# 1. A V3 token ($D = 7168$, dispatched in FP8, 1 byte per value) has its 8 experts on 3 nodes
#    other than its own, 5 ranks in all. How many bytes cross InfiniBand with V3's once-per-node
#    dispatch, and how many with a once-per-rank dispatch like this chapter's? Check with
#    `all_to_all_stats` (64 ranks, 8 per node).

# %% tags=["hide-cell"]
# experts 0..255 on 64 ranks (4 each), 8 ranks per node; the token lives on rank 0 (node 0)
idx = np.array([[32, 36, 37, 64, 68, 100, 101, 102]])   # ranks 8, 9 (node 1); 16, 17 (node 2); 25 (node 3)
s = all_to_all_stats(idx, 256, 64, 8, token_device=np.array([0]), hidden_size=7168, bytes_per_value=1)
print(s["cross_node_tokens"] * 7168, "B per node vs", s["cross_node_tokens_per_device"] * 7168, "B per rank")
assert s["cross_node_tokens"] == 3 and s["cross_node_tokens_per_device"] == 5
assert s["cross_node_bytes"] == 3 * 7168

# %% [markdown]
# 2. Two data-parallel ranks hold 3 and 1 valid targets, with per-target losses $[1, 2, 3]$ and
#    $[10]$. Compute the global mean loss and the mean of the two ranks' means. What weight must
#    rank 1 put on the gradient of its own mean so that the all-reduced sum is the gradient of the
#    global mean?

# %% tags=["hide-cell"]
a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0])
global_mean = np.concatenate([a, b]).mean()               # 4.0
mean_of_means = (a.mean() + b.mean()) / 2                 # 6.0
w1 = len(b) / (len(a) + len(b))                           # 1/4: the rank's share of the targets
assert global_mean == 4.0 and mean_of_means == 6.0
assert np.isclose(len(a) / 4 * a.mean() + w1 * b.mean(), global_mean)
print(f"global {global_mean}, mean of means {mean_of_means}, rank 1's weight {w1}")

# %% [markdown]
# 3. With node-limited routing to $M$ of the nodes, show that no token crosses to more than $M$
#    remote nodes. Route 2000 random tokens through V3's router on 8 nodes with $M = 4$ and
#    $M = 8$ (no limit), and compare the largest number of remote nodes per token.

# %% tags=["hide-cell"]
rng = np.random.default_rng(3)
cfg8 = ModelConfig.preset("tiny").replace(hidden_size=16, n_routed_experts=64, num_experts_per_tok=8, n_group=8,
                                          topk_group=4)
gate = {"weight": rng.standard_normal((64, 16)), "e_score_correction_bias": np.zeros(64)}
xt = rng.standard_normal((2000, 16))
worst_remote = {}
for m in (4, 8):
    routing, _ = gate_forward(xt, gate, cfg8.replace(topk_group=m))
    s = all_to_all_stats(routing.idx, 64, 16, 2)            # 16 ranks, 2 per node: 8 nodes
    home_node = (np.arange(2000) * 16 // 2000) // 2
    nodes = np.zeros((2000, 8), bool)
    np.put_along_axis(nodes, routing.idx // 8, True, axis=1)
    nodes[np.arange(2000), home_node] = False
    worst_remote[m] = int(nodes.sum(1).max())
    assert nodes.sum() == s["cross_node_tokens"]
print("largest number of remote nodes per token:", worst_remote)
assert worst_remote[4] <= 4 < worst_remote[8]
