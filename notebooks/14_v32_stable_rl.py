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
# # After R1: DeepSeek-V3.2 — stable RL for MoE policies
#
# DeepSeek-V3.2 {cite}`deepseekai2025v32` spent more than a tenth of its pre-training compute on
# reinforcement learning (§1, §4.1), in one mixed RL stage over reasoning, agent and alignment
# tasks (§3). At that scale GRPO ({doc}`06_grpo`) on a mixture-of-experts policy ({doc}`04_moe`) was
# not stable as written, and §3.1 of the paper lists four changes that made it so:
#
# 1. an **unbiased KL estimate** (eq. 7), which corrects GRPO's k3 estimator by the importance ratio;
# 2. **off-policy sequence masking** (eq. 8–9), which drops the surrogate of sequences that are both
#    bad (negative advantage) and stale (far from the policy that sampled them);
# 3. **Keep Routing**: the training forward uses the experts the inference engine chose at sampling time;
# 4. **Keep Sampling Mask**: the top-p truncation of the sampler is applied to π_θ in training too.
#
# This chapter derives each one, checks the unbiased KL by exact enumeration, and then measures, in
# the R1-Zero miniature of {doc}`06_grpo` (whose policy has an MoE layer), how much the routing
# actually drifts during off-policy updates and what the four changes do to the importance ratio
# and to training. All four are options of refimpl's GRPO trainer
# (`refimpl.rl.GRPOConfig`: `use_bias_correction_kl` and `off_policy_mask_threshold` with TRL's
# names, `keep_routing` and `keep_sampling_mask`), implemented in `refimpl.rl.stable` with
# hand-written gradients.

# %%
import os

# The arrays here are small: BLAS threads only add synchronisation cost (set before NumPy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import inspect  # noqa: E402
import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from refimpl.config import ModelConfig  # noqa: E402
from refimpl.core import log_softmax_forward  # noqa: E402
from refimpl.display import show_source, table  # noqa: E402
from refimpl.model.generate import top_p_mask  # noqa: E402
from refimpl.recipes.moe_rl_stability import moe_rl_stability_run  # noqa: E402
from refimpl.rl import grpo_loss  # noqa: E402
from refimpl.rl.stable import (  # noqa: E402
    masked_logps_entropy_forward,
    off_policy_sequence_mask,
    unbiased_kl,
    v32_grpo_loss,
)

t_start = time.perf_counter()


def log_softmax(z):
    return log_softmax_forward(z)[0]                 # refimpl.core's log-softmax, without its cache


# %% [markdown]
# ## 1. The V3.2 objective
#
# V3.2 keeps GRPO's clipped surrogate, per-sequence token mean and group mean, but its advantage
# is only centred, $\hat A_{i,t} = R_i - \mathrm{mean}(\mathbf R)$, with no division by the group's
# standard deviation (TRL: `scale_rewards="none"`). With a mask $M_{i,t}$ on the surrogate and the
# new KL estimate $\mathbb D_{i,t}$ (V3.2 §3.1, eq. 5 and 8):
#
# $$
# \mathcal J(\theta)=\mathbb E\Big[\frac1G\sum_{i=1}^G\frac1{|o_i|}\sum_{t=1}^{|o_i|}\Big(
# \min\big(r_{i,t}\hat A_{i,t},\ \mathrm{clip}(r_{i,t},1-\varepsilon,1+\varepsilon)\hat A_{i,t}\big)M_{i,t}
# -\beta\,\mathbb D_{i,t}\Big)\Big],\qquad
# r_{i,t}=\frac{\pi_\theta(o_{i,t}\mid q,o_{i,<t})}{\pi_{old}(o_{i,t}\mid q,o_{i,<t})}.
# $$ (eq-v32-objective)
#
# $M$ multiplies the surrogate only; the KL term always stays. Every surrogate refimpl implements
# vanishes, with its gradient, when $\hat A = 0$, so masking a sequence is exactly zeroing its
# advantage; `v32_grpo_loss` does that and adds $\beta\sum W\,\mathbb D$ with the same aggregation
# weights $W$ as {eq}`eq-grpo-loss`.
#
# ## 2. The unbiased KL estimate
#
# GRPO's penalty uses Schulman's k3 at the sampled token, $k_3 = e^{x}-x-1$ with
# $x=\ell^{ref}-\ell=\log(\pi_{ref}/\pi_\theta)$. Its expectation is $\mathrm{KL}(\pi_\theta\|\pi_{ref})$ only
# if the token was drawn from $\pi_\theta$; but the tokens come from $\pi_{old}$, and the gradient of
# k3, $1-\pi_{ref}/\pi_\theta$, is biased even on-policy (its expectation is the gradient of the
# *reverse* KL, {doc}`06_grpo`). It is also unbounded where $\pi_\theta\ll\pi_{ref}$: V3.2 §3.1 says
# these tokens receive huge weights and the noise accumulates. V3.2's fix (eq. 7) weights k3 by
# the importance ratio $\rho=\pi_\theta/\pi_{old}$, *not detached*:
#
# $$
# \mathbb D=\rho\,(e^{x}-x-1),\qquad
# \frac{\partial\mathbb D}{\partial\ell}=\rho\,k_3+\rho\,(1-e^{x})=\rho\,(\ell-\ell^{ref}).
# $$ (eq-v32-unbiased-kl)
#
# For a token drawn from $\pi_{old}$ both are unbiased, per position:
# $\mathbb E_{\pi_{old}}[\mathbb D]=\sum_o\pi_\theta\,(\pi_{ref}/\pi_\theta-\log(\pi_{ref}/\pi_\theta)-1)
# =\mathrm{KL}(\pi_\theta\|\pi_{ref})$, and
# $\mathbb E_{\pi_{old}}[\rho(\ell-\ell^{ref})\nabla\ell]=\sum_o\pi_\theta(\ell-\ell^{ref})\nabla\ell
# =\nabla\mathrm{KL}(\pi_\theta\|\pi_{ref})$
# because $\sum_o\pi_\theta\nabla\ell=0$. The gradient weight $\rho(\ell-\ell^{ref})$ has the form
# $x\log x$ and goes to 0 as $\pi_\theta\to0$ where k3's blows up. The library function:

# %%
show_source(unbiased_kl)

# %% [markdown]
# Exact enumeration on a 6-token vocabulary: the expectation over every token $o$, weighted by
# $\pi_{old}(o)$, of the estimate and of its gradient with respect to the logits $z$
# ($\nabla_z\ell(o)=e_o-\pi_\theta$), against the true KL and its gradient
# $\nabla_z\mathrm{KL}=\pi_\theta\odot(\log\pi_\theta-\log\pi_{ref}-\mathrm{KL})$.

# %%
rng = np.random.default_rng(0)
V = 6
z, z_old, z_ref = rng.standard_normal((3, V))
lp, lo, lr = log_softmax(z), log_softmax(z_old), log_softmax(z_ref)
p, p_old, p_ref = np.exp(lp), np.exp(lo), np.exp(lr)
kl_true = float(np.sum(p * (lp - lr)))
grad_true = p * (lp - lr - kl_true)                                   # dKL(pi || pi_ref)/dz
jac = np.eye(V) - p[None, :]                                          # row o: d l(o)/dz
D, dD = unbiased_kl(lp, lo, lr)                                       # one entry per token o
k3 = np.expm1(lr - lp) - (lr - lp)
dk3 = 1 - np.exp(lr - lp)
estimates = {
    "V3.2, ρ·k3 (eq. 7)": (np.sum(p_old * D), (p_old * dD) @ jac),
    "k3 on π_old samples": (np.sum(p_old * k3), (p_old * dk3) @ jac),
    "k3, ρ detached": (np.sum(p_old * D), (p_old * np.exp(lp - lo) * dk3) @ jac),
}
table(["estimator", "E[value]", "KL", "largest error of E[∇z] against ∇z KL"],
      [(k, f"{v:.6f}", f"{kl_true:.6f}", f"{np.abs(g - grad_true).max():.2e}") for k, (v, g) in estimates.items()])
v32_value, v32_grad = estimates["V3.2, ρ·k3 (eq. 7)"]
assert abs(v32_value - kl_true) < 1e-14 and np.abs(v32_grad - grad_true).max() < 1e-14
assert abs(estimates["k3 on π_old samples"][0] - kl_true) > 1e-3       # off-policy k3: biased value
assert np.abs(estimates["k3, ρ detached"][1] - grad_true).max() > 1e-3  # detaching rho: biased gradient
err_detached = np.abs(estimates["k3, ρ detached"][1] - grad_true).max()

# %% [markdown]
# The gradient weight each estimator puts on one token, as a function of how much less likely the
# policy makes it than the reference (on-policy, $\rho=1$):

# %% tags=["hide-input"]
ratio = np.linspace(0.02, 3.0, 300)                                   # pi_theta / pi_ref
w_k3 = np.abs(1 - 1 / ratio)                                          # |1 - pi_ref / pi_theta|
w_v32 = np.abs(np.log(ratio))                                         # |l - l_ref| at rho = 1
fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.plot(ratio, w_k3, label=r"k3: $|1-\pi_{ref}/\pi_\theta|$")
ax.plot(ratio, w_v32, label=r"V3.2 at $\rho=1$: $|\ell-\ell^{ref}|$")
ax.set_xlim(0, 3), ax.set_ylim(0, 10)
ax.set_xlabel(r"$\pi_\theta/\pi_{ref}$ at the sampled token"), ax.set_ylabel("|gradient weight| (per unit β)")
ax.legend(), ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()
assert w_k3[0] > 40 and w_v32[0] < 4

# %% [markdown]
# ## 3. Off-policy sequence masking
#
# Updates reuse a rollout batch several times (TRL's `num_iterations`, μ), and the inference
# engine's probabilities differ from the trainer's, so the data is always somewhat off-policy.
# V3.2 measures the staleness of sequence $i$ by the mean log-ratio of the *sampling* policy to the
# current one, a k1 estimate of $\mathrm{KL}(\pi_{old}\|\pi_\theta)$, and masks the sequence when it is
# both stale and bad (eq. 9):
#
# $$
# M_{i,t}=\begin{cases}0&\hat A_{i,t}<0\ \text{ and }\
# \frac1{|o_i|}\sum_{t'}\log\frac{\pi_{old}(o_{i,t'}\mid\cdot)}{\pi_\theta(o_{i,t'}\mid\cdot)}>\delta\\
# 1&\text{otherwise.}\end{cases}
# $$ (eq-v32-opsm)
#
# The paper's argument: the model learns most from its own mistakes, but mistakes sampled by a
# policy it has moved far away from can mislead the update. Positive-advantage sequences are kept
# however stale. $\pi_{old}$ is the engine's sampling probability, so the mask also covers the
# engine/trainer mismatch; $\delta$ is unpublished (TRL suggests starting at 0.5). M is a step
# function of θ, recomputed at every update with the current log-probs held constant. Four
# sequences, δ = 0.1:

# %%
adv = np.array([0.5, -0.5, -0.5, 0.5])
div = np.array([0.2, 0.05, 0.3, 0.4])                                  # mean log(pi_old / pi_theta) per sequence
lp_now = np.full((4, 5), -1.0)
mask = np.ones((4, 5), bool)
keep, d = off_policy_sequence_mask(adv, lp_now, lp_now + div[:, None], mask, 0.1)
_, grad, info = v32_grpo_loss(lp_now, lp_now + div[:, None], None, adv, mask, off_policy_mask_threshold=0.1,
                              loss_type="grpo")
table(["sequence", "advantage", "divergence", "M", "surrogate gradient"],
      [(i, a, f"{x:.2f}", int(k), "zero" if np.all(g == 0) else "non-zero")
       for i, (a, x, k, g) in enumerate(zip(adv, d, keep[:, 0], grad, strict=True))])
assert keep[:, 0].tolist() == [True, True, False, True] and np.all(grad[2] == 0) and np.all(grad[[0, 1, 3]] != 0)
plain = grpo_loss(lp_now, lp_now + div[:, None], None, adv, mask, loss_type="grpo")[1]
assert np.array_equal(v32_grpo_loss(lp_now, lp_now + div[:, None], None, adv, mask, off_policy_mask_threshold=1e9,
                                    loss_type="grpo")[1], plain)      # delta -> infinity: plain GRPO

# %% [markdown]
# ## 4. Keep Sampling Mask
#
# With top-p (or top-k) sampling the engine draws from a truncated, renormalised distribution
# $\pi^{\mathcal V}_{old}$ over the nucleus $\mathcal V$; the trainer's $\pi_\theta$ covers the whole
# vocabulary. Even before any update the two disagree: every sampled token gets the ratio
# $\pi_\theta/\pi^{\mathcal V}_{old}=\sum_{u\in\mathcal V}\pi_\theta(u)<1$, and tokens outside
# $\mathcal V$ keep probability that no sample can ever correct. V3.2 records $\mathcal V$ at sampling
# and applies it to $\pi_\theta$ in training (§3.1). refimpl reads "apply" as renormalising over the
# kept set, and restricts $\pi_{ref}$ the same way (the paper does not say); the gradient is the
# log-softmax VJP restricted to $\mathcal V$:
#
# $$
# \ell^{\mathcal V}=\frac{z_o}{\tau}-\log\sum_{u\in\mathcal V}e^{z_u/\tau},\qquad
# \frac{\partial\ell^{\mathcal V}}{\partial z_v}
# =\frac{\mathbb 1[v=o]-\pi^{\mathcal V}_\theta(v)}{\tau}\,\mathbb 1[v\in\mathcal V].
# $$ (eq-v32-sampling-mask)

# %%
z = np.array([[3.0, 2.2, 1.5, 0.4, -0.5, -1.0, -2.0]])
nucleus = top_p_mask(z, temperature=1.0, top_p=0.9)                   # what the sampler may draw
o = np.array([1])                                                     # a sampled token
l_full = log_softmax(z)[0, o[0]]
l_kept, _, _ = masked_logps_entropy_forward(z, o, nucleus)
mass = float(np.exp(log_softmax(z))[nucleus].sum())
print(f"nucleus: {int(nucleus.sum())} of {z.shape[1]} tokens, holding {mass:.3f} of the mass")
print(f"on-policy ratio without the mask: {np.exp(l_full - l_kept[0]):.3f}; with it: 1")
assert np.isclose(np.exp(l_full - l_kept[0]), mass)

# %% [markdown]
# ## 5. Keep Routing
#
# In an MoE policy, a small change of the router's input or weights can swap an expert out of a
# token's top-K set, a discontinuous change of the function. Between sampling and an off-policy
# update the parameters move, and the engine's kernels round differently from the trainer's, so
# the trainer may route a token to other experts than the engine did: "the same" π_old and π_θ
# then run partly different networks, and the importance ratio measures that too. V3.2 records each
# token's experts at sampling time in every MoE layer and forces them in the training forward; the
# paper calls this crucial for MoE RL stability and says it has been used since DeepSeek-V3-0324.
#
# refimpl's MoE layer takes the recorded experts as `routes=`; the gate values are recomputed from
# the *current* router on those experts (the paper does not say; this keeps the router learning),
# $g_{t,e}=\gamma\,s_{t,e}/\sum_{e'\in\mathcal E_t}s_{t,e'}$ for $e\in\mathcal E_t$, so the gradient still
# reaches the gate weights of the kept experts. With the router's own routes it is the plain layer,
# bit for bit (tested in `tests/moe/test_keep_routing.py`):

# %%
from refimpl.moe import gating  # noqa: E402

show_source(gating.check_routes)

# %% [markdown]
# ## 6. The experiment
#
# `refimpl.recipes.moe_rl_stability` (CLI `python -m refimpl moe-rl-stability`) starts from the
# pretrained base of the R1-Zero miniature ({doc}`06_grpo`: one dense and one MoE layer, 8 routed
# experts, top-2 with V3's group-limited sigmoid router) and the same addition
# task and GRPO settings. Three parts:
#
# * **engine/trainer mismatch**: a sampling engine whose weights are rounded to bfloat16 or to FP8
#   (e4m3, one scale per tensor; V3's deployed inference runs in FP8) samples and records a batch,
#   and the float32 trainer scores it before any update (μ = 1), with its own routing and with the
#   engine's;
# * **the mechanism**: one recorded rollout batch, then plain GRPO updates on it; after each, the
#   batch is scored twice at the same parameters, with the router's own experts and with the
#   recorded ones;
# * **training**: for several μ, the unmodified recipe against the V3.2 recipe (all four changes;
#   δ = 0.05 and β = 0.01 are this miniature's choices), with nucleus sampling at top-p 0.95,
#   and a stressed run with a larger learning rate and more updates per batch.

# %%
res = moe_rl_stability_run(cache_dir="_cache", progress=False)
mech, sweep, stress = res["mechanism"], res["sweep"], res["stress"]
mus = sorted(sweep)
cfg, defaults = res["config"], inspect.signature(moe_rl_stability_run).parameters
assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (8, 2, 2, 1)
assert (defaults["delta"].default, defaults["beta"].default, defaults["top_p"].default) == (0.05, 0.01, 0.95)
v3 = ModelConfig.preset("deepseek-v3")
assert (v3.num_hidden_layers - v3.first_k_dense_replace, v3.n_routed_experts) == (58, 256)  # quoted in section 7
print(f"recipe: {res['seconds']:.0f} s; base model: greedy held-out accuracy {res['base_eval']:.3f}")

# %% [markdown]
# First the engine/trainer mismatch, before any update:

# %%
mm = res["mismatch"]
fmt4 = lambda x: f"{x:.4f}" if np.isfinite(x) else "(no such token)"  # noqa: E731
table(["engine weights", "tokens routed differently (%)", "mean abs log ρ, those tokens, own routing",
       "… with Keep Routing", "mean abs log ρ, other tokens", "std ρ, own routing", "std ρ, Keep Routing"],
      [(p, f"{100 * m['drift']:.1f}", fmt4(m['abs_log_ratio']['own']['changed']),
        fmt4(m['abs_log_ratio']['kept']['changed']), fmt4(m['abs_log_ratio']['own']['unchanged']),
        f"{m['ratio_std']['own']:.4f}", f"{m['ratio_std']['kept']:.4f}") for p, m in mm.items()])
f8 = mm["fp8"]
assert f8["drift"] > 0.01                                                   # FP8 rounding moves routes
assert f8["abs_log_ratio"]["kept"]["changed"] < 0.5 * f8["abs_log_ratio"]["own"]["changed"]
assert f8["ratio_std"]["kept"] < f8["ratio_std"]["own"]
assert mm["bf16"]["drift"] < f8["drift"]
display(Markdown(
    f"With FP8 engine weights the trainer routes {100 * f8['drift']:.1f}% of the loss's tokens to another "
    f"top-2 set than the engine did, *before any update*. Their mean $|\\log\\rho|$ is "
    f"{f8['abs_log_ratio']['own']['changed']:.4f}, against {f8['abs_log_ratio']['own']['unchanged']:.4f} for "
    f"the other tokens; with Keep Routing it drops to {f8['abs_log_ratio']['kept']['changed']:.4f}, and the "
    f"spread of ρ over all tokens from {f8['ratio_std']['own']:.4f} to {f8['ratio_std']['kept']:.4f}. With "
    f"bfloat16 weights {100 * mm['bf16']['drift']:.1f}% of the tokens are routed differently. This is "
    f"the case V3.2 describes: π_old and π_θ disagree from the start because the engine and the trainer "
    f"pick different experts, and Keep Routing removes most of that disagreement."))

# %% [markdown]
# Then the mechanism, with the engine and the trainer computing identically, during off-policy updates:

# %% tags=["hide-input"]
k = np.array(mech["updates"])
fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
ax[0].plot(k, 100 * np.array(mech["drift"]), "o-")
ax[0].set_xlabel("updates on the recorded batch"), ax[0].set_ylabel("tokens whose top-2 set changed (%)")
ax[0].set_ylim(0, None), ax[0].set_xlim(0, k[-1]), ax[0].set_title("routing drift")
for mode, style in (("own", "-"), ("kept", "--")):
    for group, color in (("changed", "C3"), ("unchanged", "C0")):
        ax[1].plot(k[1:], mech["abs_log_ratio"][mode][group][1:], style, color=color,
                   label=f"{group} experts, {'router' if mode == 'own' else 'Keep Routing'}")
ax[1].plot(k[1:], mech["swap_effect"][1:], ":", color="k", label=r"$|\ell_{own}-\ell_{kept}|$ on changed tokens")
ax[1].set_xlabel("updates on the recorded batch"), ax[1].set_ylabel(r"mean $|\log\rho|$ (nats)")
ax[1].set_ylim(0, None), ax[1].set_xlim(0, k[-1]), ax[1].set_title("importance ratio of the loss's tokens")
ax[1].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %%
ch, un = np.array(mech["abs_log_ratio"]["own"]["changed"][1:]), np.array(mech["abs_log_ratio"]["own"]["unchanged"][1:])
ch_kept = np.array(mech["abs_log_ratio"]["kept"]["changed"][1:])
swap = np.array(mech["swap_effect"][1:])
drift = np.array(mech["drift"])
assert drift[0] == 0.0 and np.all(drift[1:] > 0) and drift[-1] > drift[1]
assert np.mean(ch / un) > 1                  # tokens whose experts moved have larger log-ratios, on average
assert np.mean(swap) < np.mean(ch)           # the swap itself explains only part of it
display(Markdown(
    f"After one update {100 * drift[1]:.1f}% of the loss's tokens already route to a different top-2 set, "
    f"after {k[-1]} updates {100 * drift[-1]:.1f}%. Those tokens have {np.mean(ch / un):.1f}× the mean "
    f"$|\\log\\rho|$ of the others (averaged over the updates). Keep Routing changes their log-probs by "
    f"{np.mean(swap):.3f} nats on average (the dotted line), against a mean $|\\log\\rho|$ of "
    f"{np.mean(ch):.3f} without it and {np.mean(ch_kept):.3f} with it: in this miniature a changed route is "
    f"mostly a *symptom* of a token whose hidden state moved a lot, and swapping one of two experts "
    f"back moves its probability {'less' if np.mean(swap) < np.mean(ch) else 'more'} than the update itself did."))

# %% [markdown]
# Now the training runs: per update, the routing drift and the spread of the importance ratio
# (standard deviation over the loss's tokens); per step, the sampled reward.

# %% tags=["hide-input"]
fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
for j, mu in enumerate(mus):
    for name, style in (("grpo", "-"), ("v32", "--")):
        r = sweep[mu][name]
        x = np.arange(1, len(r["drift"]) + 1) / mu                    # in steps
        lbl = f"μ={mu}, {'unmodified' if name == 'grpo' else 'V3.2'}"
        ax[0].plot(x, 100 * np.array(r["drift"]), style, color=f"C{j}", label=lbl)
        ax[1].plot(x, r["ratio_std"], style, color=f"C{j}", label=lbl)
        ax[2].plot(np.arange(1, len(r["reward"]) + 1), r["reward"], style, color=f"C{j}", label=lbl)
ax[0].set_ylabel("routing drift (% of tokens)"), ax[1].set_ylabel("std of ρ over tokens")
ax[2].set_ylabel("mean sampled reward")
for a, xl in zip(ax, ("GRPO step", "GRPO step", "GRPO step"), strict=True):
    a.set_xlabel(xl), a.set_ylim(0, None), a.set_xlim(0, None), a.grid(alpha=0.3)
ax[2].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %%
rows = []
for label, runs in [(f"{res['grpo_config'].lr:g}", sweep), (f"{res['stress_lr']:g} (stressed)", stress)]:
    for mu in sorted(runs):
        for name in ("grpo", "v32"):
            r = runs[mu][name]
            rows.append((label, mu, "unmodified" if name == "grpo" else "V3.2", f"{100 * np.mean(r['drift']):.1f}",
                         f"{np.max(r['ratio_std']):.3f}", f"{np.max(r['ratio_max']):.2f}",
                         f"{100 * np.mean(r['masked']):.1f}", f"{r['eval_before']:.3f} → {r['eval_after']:.3f}"))
table(["learning rate", "μ", "recipe", "mean drift (%)", "max std ρ", "max ρ", "masked seqs (%)",
       "held-out accuracy"], rows)
g1 = sweep[1]["grpo"]
assert g1["drift"] == [0.0] * len(g1["drift"]) and max(g1["ratio_std"]) == 0.0   # on-policy: nothing drifts
d_mu = [np.mean(sweep[mu]["grpo"]["drift"]) for mu in mus]
assert all(a < b for a, b in zip(d_mu, d_mu[1:], strict=False))                   # drift grows with mu
s_mu = [np.mean(sweep[mu]["grpo"]["ratio_std"]) for mu in mus]
assert all(a < b for a, b in zip(s_mu, s_mu[1:], strict=False))                   # and so does the ratio spread
st = stress[max(stress)]
collapsed = {n: st[n]["eval_after"] < 0.5 * st[n]["eval_before"] for n in ("grpo", "v32")}
v32_better = {mu: sweep[mu]["v32"]["eval_after"] > sweep[mu]["grpo"]["eval_after"] for mu in mus if mu > 1}
unstable = {(mu, n): r["eval_after"] < 0.5 * r["eval_before"] for mu in mus for n, r in sweep[mu].items()}

# %% [markdown]
# ## 7. What the miniature shows, and what it does not

# %%
def says(flag, yes, no):
    return yes if flag else no


mu_hi = max(stress)
display(Markdown(
    f"* **Routing drift is real and grows with off-policy updates.** On-policy (μ = 1) nothing drifts and "
    f"ρ ≡ 1. The mean drift rises from {100 * d_mu[1]:.1f}% at μ = {mus[1]} to {100 * d_mu[-1]:.1f}% at "
    f"μ = {mus[-1]}, and the spread of ρ with it ({s_mu[1]:.3f} → {s_mu[-1]:.3f}).\n"
    f"* **Engine/trainer mismatch moves routes before any update, and Keep Routing undoes it.** With FP8 engine "
    f"weights {100 * f8['drift']:.1f}% of the tokens change experts at μ = 1, and Keep Routing cuts their mean "
    f"$|\\log\\rho|$ from {f8['abs_log_ratio']['own']['changed']:.4f} to "
    f"{f8['abs_log_ratio']['kept']['changed']:.4f}.\n"
    f"* **During updates, Keep Routing removes the routing change, but little of the ratio spread.** The tokens whose "
    f"experts change are the ones with large log-ratios, yet forcing the recorded experts moves their "
    f"log-probs by only {np.mean(swap):.3f} nats on average (their mean $|\\log\\rho|$: {np.mean(ch):.3f}). "
    f"Presumably, with 8 small experts in one layer, the two candidates at a routing tie compute similar "
    f"things. V3.2 has 58 MoE layers of 256 experts and an inference engine whose numerics differ from "
    f"the trainer's; the paper calls Keep Routing crucial there. This miniature has no engine/trainer "
    f"mismatch at all.\n"
    f"* **At the default learning rate, "
    f"{says(any(unstable.values()), 'some runs lost', 'no run lost')} more than half of the held-out accuracy "
    f"in {len(sweep[mus[0]]['grpo']['reward'])} steps**, and the V3.2 recipe ended with the higher held-out "
    f"accuracy for {sum(v32_better.values())} of {len(v32_better)} values of μ > 1 (one seed, a noisy "
    f"measure).\n"
    f"* **Stressed (learning rate {res['stress_lr']:g}, μ = {mu_hi}), the unmodified recipe "
    f"{says(collapsed['grpo'], 'collapses', 'does not collapse')} "
    f"({st['grpo']['eval_before']:.3f} → {st['grpo']['eval_after']:.3f}) and the V3.2 recipe "
    f"{says(collapsed['v32'], 'collapses too', 'does not')} "
    f"({st['v32']['eval_before']:.3f} → {st['v32']['eval_after']:.3f}).** "
    + says(collapsed["grpo"] and collapsed["v32"],
           "So here the instability comes from too large a step on stale data, which none of the four changes "
           "bounds: the clipping and OPSM act only on the tokens and sequences they select.", "")))

# %% [markdown]
# So the miniature reproduces the *mechanisms* V3.2 guards against: a lower-precision engine routes
# tokens differently from the trainer before any update, Keep Routing removes most of the resulting
# ratio error, and routes drift further with every off-policy update. It does not reproduce their
# *consequence*: in these short runs the four changes do not separate a stable from an unstable run
# (the training runs use an engine that computes exactly what the trainer computes). Making them
# matter would need what this miniature leaves out: many MoE layers (drift compounds through the
# residual stream), an FP8 engine inside the training loop, and long generations. `python -m refimpl moe-rl-stability`
# with `--steps`, `--num-iterations`, `--lr` and `--stress-lr` runs larger versions.
#
# ## Exercises
#
# 1. Show by enumeration on a 5-token vocabulary that *detaching* ρ in the unbiased KL (using
#    $\rho\,(1-\pi_{ref}/\pi_\theta)$ as the gradient weight) gives a biased expected gradient, while
#    `unbiased_kl`'s is exact. At π_old = π_θ the detached weight is plain k3's: show that its expected
#    gradient is then $\pi_\theta-\pi_{ref}$, the gradient of the reverse KL.

# %% tags=["hide-cell"]
rng = np.random.default_rng(5)
zt, zo, zr = rng.standard_normal((3, 5))
lt, lo_, lr_ = log_softmax(zt), log_softmax(zo), log_softmax(zr)
pt, po = np.exp(lt), np.exp(lo_)
kl = np.sum(pt * (lt - lr_))
J = np.eye(5) - pt[None, :]
exact = pt * (lt - lr_ - kl)
_, g = unbiased_kl(lt, lo_, lr_)
detached = np.exp(lt - lo_) * (1 - np.exp(lr_ - lt))
assert np.allclose((po * g) @ J, exact, atol=1e-14)
assert np.abs((po * detached) @ J - exact).max() > 1e-3
# on-policy (pi_old = pi_theta): detached = plain k3, whose expected gradient is that of KL(pi_ref || pi)
_, g_on = unbiased_kl(lt, lt, lr_)
assert np.allclose((pt * g_on) @ J, exact, atol=1e-14)
assert np.allclose((pt * (1 - np.exp(lr_ - lt))) @ J, pt - np.exp(lr_), atol=1e-14)
print(f"detached-rho bias: {np.abs((po * detached) @ J - exact).max():.3e}")

# %% [markdown]
# 2. Off-policy sequence masking never masks a sequence with non-negative advantage, however stale.
#    Check it on random batches, and find the smallest δ at which none of a batch's sequences is masked.

# %% tags=["hide-cell"]
rng = np.random.default_rng(6)
lp_b = rng.normal(-1, 0.5, (8, 6))
samp = lp_b + rng.normal(0.2, 0.5, (8, 6))
m_b = rng.random((8, 6)) < 0.8
a_b = rng.standard_normal(8)
keep_b, div_b = off_policy_sequence_mask(a_b, lp_b, samp, m_b, 0.0)
assert keep_b[a_b >= 0].all()
delta_min = div_b[a_b < 0].max()                                       # masked iff div > delta (strict)
assert off_policy_sequence_mask(a_b, lp_b, samp, m_b, delta_min)[0].all()
assert not off_policy_sequence_mask(a_b, lp_b, samp, m_b, delta_min - 1e-9)[0].all()
print(f"smallest delta masking nothing: {delta_min:.4f}")

# %%
print(f"chapter run time: {time.perf_counter() - t_start:.0f} s")
