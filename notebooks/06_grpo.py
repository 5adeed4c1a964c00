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
# # GRPO and R1-Zero
#
# DeepSeek-R1-Zero learned to reason by reinforcement learning alone {cite}`deepseekai2025r1`.
# Starting from the pretrained DeepSeek-V3-Base, with no supervised fine-tuning, it sampled a
# group of answers to each question, rewarded the ones that were right and well formatted, and
# pushed the policy toward the answers that beat their group's average. The algorithm is Group
# Relative Policy Optimization (GRPO), introduced with DeepSeekMath {cite}`shao2024deepseekmath`.
# Its signal comes from rules, not from a learned reward model. Over training, the model's answers
# grew longer, and it began to check and revise its own steps.
#
# This chapter builds GRPO from its parts and then runs R1-Zero in miniature:
#
# 1. from REINFORCE and PPO to GRPO: the group replaces the value network as the baseline;
# 2. group-relative advantages, and what scaling by the standard deviation does;
# 3. the loss variants (`grpo`, `dr_grpo`, `dapo`, clip-higher, GSPO, CISPO, SAPO), each with the
#    bias or failure it fixes, measured on a small example;
# 4. the three KL estimators k1, k2 and k3;
# 5. rule-based rewards on real completions;
# 6. R1-Zero in miniature: GRPO on the tiny DeepSeek-V3 of {doc}`05_tiny_v3`, with curves and
#    sampled reasoning traces before and after.
#
# {doc}`07_r1` adds the cold start and the rest of the R1 recipe. Everything below calls
# `refimpl.rl`, `refimpl.tasks` and `refimpl.recipes`; code shown is the library's real source.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * derive GRPO from REINFORCE and PPO, and compute group-relative advantages;
# * tell apart the loss normalisations of GRPO, Dr. GRPO, DAPO and GSPO, and the biases each one
#   fixes;
# * choose between three estimators of the KL penalty;
# * train a small model R1-Zero style, with rule-based rewards only, and read its training curves.
# ```

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

from refimpl.core import log_softmax_forward, softmax_forward  # noqa: E402
from refimpl.display import show_source, table  # noqa: E402
from refimpl.recipes.r1 import r1_zero_run  # noqa: E402
from refimpl.rl import (  # noqa: E402
    accuracy_reward,
    combine_rewards,
    format_reward,
    group_advantages,
    grpo_loss,
    grpo_objective,
    language_consistency_reward,
    loss_types,  # noqa: E402
    overlong_penalty,
    per_token_kl,
    selective_log_softmax_backward,
    selective_log_softmax_forward,
    tag_count_reward,
)
from refimpl.tasks import TOKENIZER, AdditionTask, Example, reference_completion  # noqa: E402

t_start = time.perf_counter()


# %% [markdown]
# ## 1. From REINFORCE and PPO to GRPO
#
# ```{glue:figure} diagram-grpo
# ---
# alt: >-
#   One GRPO group: a question, eight sampled answers with rule rewards of 1 or 0, and each
#   answer's advantage measured against the group's mean and standard deviation, with no value
#   network.
# name: diagram-grpo
# ---
# GRPO's group baseline on one example group; the advantages are computed by
# `refimpl.rl.group_advantages` (drawn by `refimpl.diagrams.grpo_diagram`).
# ```
#
# A language model is a policy $\pi_\theta$: given a prompt $q$ it samples a completion $o$. With a
# reward $r(q, o)$ that only scores the finished completion, the gradient of the expected reward is
# the REINFORCE estimator {cite}`williams1992reinforce`:
#
# $$
# \nabla_\theta\, \mathbb E_{o\sim\pi_\theta}[r(o)] = \mathbb E_{o\sim\pi_\theta}\big[(r(o) - b)\,
# \nabla_\theta \log\pi_\theta(o)\big],\qquad \log\pi_\theta(o) = \sum_t \log\pi_\theta(o_t\mid q, o_{<t}).
# $$
#
# Any baseline $b$ that does not depend on $o$ leaves the expectation unchanged, because
# $\mathbb E[\nabla\log\pi_\theta(o)] = 0$, but a good baseline removes most of the variance.
# PPO {cite}`schulman2017ppo` learns the baseline: a value network $V_\psi$ estimates the expected
# return from each prefix, the advantage is built from it (with GAE), and a clipped importance
# ratio keeps each update close to the policy that sampled the data. For a language model the
# value network is a second model about as large as the policy, trained alongside it, and with a
# reward only at the end of the completion its per-token estimates are hard to learn.
#
# GRPO drops the value network (DeepSeekMath §4.1). For each prompt it samples a *group* of $G$
# completions $o_1, \dots, o_G$ and uses the group itself as the baseline: completion $i$ gets
# the advantage $\hat A_i = (r_i - \mathrm{mean}(r))/\mathrm{std}(r)$, the same for all its tokens.
# The rest is PPO's clipped surrogate, per token, averaged over each completion and over the
# group, with a KL penalty to a frozen reference policy added to the objective instead of to the
# reward (DeepSeekMath eq. 3; R1 eq. 1–3):
#
# $$
# \mathcal J_{\mathrm{GRPO}}(\theta) = \mathbb E\Bigg[\frac1G\sum_{i=1}^G\frac1{|o_i|}\sum_{t=1}^{|o_i|}
# \Big(\min\big(\rho_{i,t}\hat A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\varepsilon, 1+\varepsilon)\,\hat A_i\big)
# - \beta\,\mathbb D_{\mathrm{KL}}\big[\pi_\theta\,\|\,\pi_{\mathrm{ref}}\big]_{i,t}\Big)\Bigg],\qquad
# \rho_{i,t} = \frac{\pi_\theta(o_{i,t}\mid q, o_{i,<t})}{\pi_{\theta_{\mathrm{old}}}(o_{i,t}\mid q, o_{i,<t})}
# $$ (eq-grpo-loss)
#
# Codebases minimise $-\mathcal J$; `refimpl.rl.grpo_loss` returns that loss and its gradient with
# respect to every token's log-probability $\ell_{i,t} = \log\pi_\theta(o_{i,t}\mid\cdot)$.
#
# **The group as a baseline, measured.** Take a one-step "completion": 8 possible answers, one of
# them right, and a policy that rarely picks it (8% of the time). The reward is 1 for the format
# (every answer has it) plus 1 if the answer is right, the shape of R1's reward once the format is
# learnt.
# We draw 4000 groups of $G = 8$, and form the gradient estimate of each group from
# `grpo_loss`'s gradient, carried into the logits by `selective_log_softmax_backward`. The
# estimate without a baseline uses $\hat A_i = r_i$; the group baseline uses $r_i - \bar r$.

# %% tags=["hide-input"]
rng = np.random.default_rng(0)
V, G, TRIALS, RIGHT = 8, 8, 4000, 3
z = rng.standard_normal(V)                                              # (V,) the policy's logits
pi = softmax_forward(z)[0]                                              # (V,)
true_grad = pi[RIGHT] * (np.eye(V)[RIGHT] - pi)                         # (V,) d E[r] / dz, exact
print(f"probability of the right answer: {pi[RIGHT]:.3f}")
assert 0.07 < pi[RIGHT] < 0.09
answers = rng.choice(V, size=(TRIALS, G), p=pi)                         # (TRIALS, G) sampled answers
rewards = 1.0 + (answers == RIGHT)                                      # (TRIALS, G) format + accuracy
logits = np.broadcast_to(z, (TRIALS * G, 1, V)).copy()                  # (B, T=1, V)
logps, lp_cache = selective_log_softmax_forward(logits, answers.reshape(-1, 1))  # (B, 1)
one_token = np.ones((TRIALS * G, 1), bool)                              # (B, 1) mask


def group_gradients(adv):
    """Per-group estimates of d E[r] / dz: -(dLoss/dz) summed over each group's G rows, times 1/G."""
    _, dlogps, _ = grpo_loss(logps, None, None, adv, one_token, loss_type="grpo")  # (B, 1) = -A / B
    dz = selective_log_softmax_backward(dlogps, lp_cache)[:, 0] * (TRIALS * G)  # (B, V) = -A (onehot - pi)
    return -dz.reshape(TRIALS, G, V).mean(axis=1)                       # (TRIALS, V)


estimates = {
    "no baseline (A = r)": group_gradients(rewards.reshape(-1)),
    "group mean (A = r - mean)": group_gradients(group_advantages(rewards.reshape(-1), G, scale_rewards="none")[0]),
}
rows, stats = [], {}
for name, g in estimates.items():
    scale = float(g.mean(axis=0) @ true_grad / (true_grad @ true_grad))  # E[estimate] as a multiple of the truth
    var = float(((g - g.mean(axis=0)) ** 2).sum(axis=1).mean())          # total variance per group
    stats[name] = scale, var
    rows.append((name, f"{scale:.3f}", f"{var:.4f}"))
table(["estimator", "mean / true gradient", "variance per group"], rows)
(s0, v0), (s1, v1) = stats.values()
assert abs(s0 - 1) < 0.05 and abs(s1 - (G - 1) / G) < 0.03      # unbiased; the group mean costs (G-1)/G
assert v1 < v0 / 10                                               # at least ten times less variance

# %% tags=["remove-cell"]
# A diagram drawn by refimpl.diagrams from the config it shows; glued into the figure below.
from myst_nb import glue

from refimpl.diagrams import grpo_diagram

glue("diagram-grpo", grpo_diagram(), display=False)
plt.close("all")

# %% [markdown]
# The group baseline cuts the variance by more than ten times here, and costs no network. It is
# slightly biased in scale: a completion's own reward is part of the mean it is compared with, so
# the expectation is $(1 - 1/G)$ times the true gradient (measured above: close to
# $7/8 = 0.875$). Dividing by $G - 1$ instead of $G$ (a leave-one-out baseline) removes that
# factor; since it is the same for every sample, GRPO absorbs it into the learning rate.
#
# ## 2. Group-relative advantages
#
# `group_advantages` follows TRL's `GRPOTrainer`: groups are contiguous blocks of
# `num_generations` rewards, the standard deviation is the *sample* standard deviation (Bessel's
# correction, `ddof=1`), and $10^{-4}$ is added to it. NumPy's `np.std` defaults to `ddof=0`,
# which gives different numbers. A group whose rewards are all equal has no signal, and gets
# exactly zero advantage, not NaN.

# %%
r = np.array([1.0, 0.0, 0.0, 1.0])
adv, info = group_advantages(r, 4)
ddof0 = (r - r.mean()) / (r.std() + 1e-4)
print("rewards", r, "-> advantages", adv.round(6), "  (with ddof=0 they would be", ddof0.round(6), ")")
assert np.allclose(adv, [0.865875, -0.865875, -0.865875, 0.865875], atol=1e-6)
assert np.allclose(ddof0, [0.9998, -0.9998, -0.9998, 0.9998], atol=1e-4)

batch = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0], float)      # 3 prompts, G = 4 each
adv, info = group_advantages(batch, 4)
print("three groups:", adv.reshape(3, 4).round(3).tolist(),
      f" frac_reward_zero_std = {info['frac_reward_zero_std']:.3f}")
assert (adv[:8] == 0).all() and np.isclose(info["frac_reward_zero_std"], 2 / 3)

# %% [markdown]
# Two of these three groups are all right or all wrong: they contribute nothing to the policy
# gradient, which is why TRL logs `frac_reward_zero_std`, and why DAPO's *dynamic sampling*
# {cite}`yu2025dapo` resamples prompts until each batch is filled with groups that have a spread.
#
# **The difficulty bias of the standard deviation.** Dividing by the group's standard deviation
# makes every group's advantages have the same scale, however hard the question. Dr. GRPO
# {cite}`liu2025drgrpo` points out that this reweights questions: with binary rewards and $k$ of
# $G$ right, the total advantage mass of a group, $\sum_i |\hat A_i|$, is $2Gp(1-p)$ without
# scaling ($p = k/G$) but $2\sqrt{G(G-1)p(1-p)}$ with it, so the nearly-always-right and
# nearly-always-wrong questions, whose standard deviation is small, get relatively more weight.
# `scale_rewards="none"` removes the division; `"batch"` divides by the whole batch's standard
# deviation, one number for every group, and so keeps the unscaled weighting (its curve lies on
# top of `"none"`'s).

# %% tags=["hide-input"]
G = 16
ks = np.arange(1, G)
mass = {}
for mode in ("group", "batch", "none"):
    rr = np.concatenate([np.r_[np.ones(k), np.zeros(G - k)] for k in ks])  # (15 G,) one group per k
    a, _ = group_advantages(rr, G, scale_rewards=mode)
    mass[mode] = np.abs(a).reshape(len(ks), G).sum(axis=1)               # (15,)
fig, ax = plt.subplots(figsize=(6, 3.4))
for mode, m in mass.items():
    ax.plot(ks, m / m.max(), marker="o", ms=3, label=f'scale_rewards="{mode}"')
ax.set_xlabel(f"right answers in the group (of G={G})"), ax.set_ylabel("sum |A| (relative to its max)")
ax.set_title("How much each question pushes the policy"), ax.legend(), ax.set_ylim(0, None)
plt.tight_layout()
plt.show()
ratio = {mode: m[0] / m[G // 2 - 1] for mode, m in mass.items()}
print("weight of a 1-in-16 question relative to an 8-in-16 one:", {k: round(float(v), 3) for k, v in ratio.items()})
assert np.isclose(ratio["none"], (1 * 15) / (8 * 8)) and ratio["group"] > 1.8 * ratio["none"]
assert np.allclose(mass["group"], 2 * np.sqrt(G * (G - 1) * (ks / G) * (1 - ks / G)), rtol=1e-3)

# %% [markdown]
# With scaling by the group, a question that the policy gets right once in 16 pushes about half
# as hard as one it gets right half the time; without scaling, about a quarter as hard. Which is
# better depends on the curriculum; Dr. GRPO argues that the unscaled objective is the unbiased
# one.
#
# ## 3. The loss variants and the biases they fix
#
# Every variant computes the same per-token term and differs in how it sums the terms:
# $J = \sum_{i,t} W_{i,t} L_{i,t}$. The weights are TRL's (one process, no gradient accumulation):
#
# | `loss_type` | $W_{i,t}$ | from |
# |---|---|---|
# | `grpo` | $1/(B\,\lvert o_i\rvert)$: mean per completion, then over them | DeepSeekMath eq. 3, {eq}`eq-grpo-loss` |
# | `bnpo` | $1/N$, $N$ = tokens in the batch | TRL |
# | `dr_grpo` | $1/(B\,L_{\max})$, a constant | Dr. GRPO {cite}`liu2025drgrpo` |
# | `dapo` | $1/N$ over the whole generation batch | DAPO {cite}`yu2025dapo` |
#
# Here is the part of `grpo_loss` that builds them, and the clipped surrogate with its derivative:

# %%
show_source(loss_types.sequence_mean_weights, loss_types.token_mean_weights, loss_types.constant_weights,
            loss_types.items_weights, loss_types.min_clip)

# %% [markdown]
# **Length bias.** On policy, $\rho \equiv 1$ and the gradient of each token's log-probability is
# simply $-\hat A_i W_{i,t}$. Under `grpo`, $W$ contains $1/|o_i|$: a long completion's tokens
# each get a smaller share. Take a group of two, one right answer of 4 tokens and one wrong answer
# of 16 (then swap the lengths), and read off the gradient per token:

# %% tags=["hide-input"]
L_MAX = 16


def per_token_push(n_right, n_wrong, loss_type):
    """dJ/dl of one token of the right and of the wrong answer, on policy, G = 2, beta = 0."""
    mask = np.zeros((2, L_MAX), bool)
    mask[0, :n_right], mask[1, :n_wrong] = True, True
    adv, _ = group_advantages(np.array([1.0, 0.0]), 2)                 # (2,) = [+0.707, -0.707]
    lp = np.full((2, L_MAX), -1.0)
    _, d, _ = grpo_loss(lp, None, None, adv, mask, loss_type=loss_type, max_completion_length=L_MAX)
    return d[0, 0], d[1, 0]


rows, push = [], {}
for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
    short_right, long_wrong = per_token_push(4, 16, lt)
    long_right, short_wrong = per_token_push(16, 4, lt)
    push[lt] = short_right, long_wrong, long_right, short_wrong
    rows.append((f"`{lt}`", f"{short_right:+.4f}", f"{long_wrong:+.4f}", f"{long_right:+.4f}", f"{short_wrong:+.4f}"))
table(["loss_type", "right, 4 tokens", "wrong, 16 tokens", "right, 16 tokens", "wrong, 4 tokens"], rows)
sr, lw, lr_, sw = push["grpo"]
assert np.isclose(sr / -lw, 4.0) and np.isclose(lr_ / -sw, 0.25)   # grpo: per-token push ~ 1 / length
for lt in ("bnpo", "dr_grpo", "dapo"):
    sr, lw, lr_, sw = push[lt]
    assert np.isclose(sr, -lw) and np.isclose(lr_, -sw)            # token-level: every token alike

# %% [markdown]
# Under `grpo`, a token of a short right answer is pushed up four times harder than a token of a
# long wrong answer is pushed down. Over training this favours short right answers and, among
# wrong answers, long ones: the model is penalised less per token for rambling when it is wrong.
# Dr. GRPO traces part of the length growth reported for R1-Zero-like training to this term, and
# replaces the per-completion mean by a constant ($L_{\max}$); DAPO uses a token-level mean over the
# batch. Both treat every token alike. The figure shows the penalty per token, and the total over
# the completion, of a wrong answer of length $n$ in a group with one right answer of 8 tokens.

# %% tags=["hide-input"]
L_MAX = 64
ns = np.arange(1, L_MAX + 1)
curves = {lt: [] for lt in ("grpo", "dr_grpo", "dapo")}
for n in ns:
    mask = np.zeros((2, L_MAX), bool)
    mask[0, :8], mask[1, :n] = True, True
    adv, _ = group_advantages(np.array([1.0, 0.0]), 2)
    for lt in curves:
        _, d, _ = grpo_loss(np.full((2, L_MAX), -1.0), None, None, adv, mask, loss_type=lt,
                            max_completion_length=L_MAX)
        curves[lt].append(d[1, 0])
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for lt, c in curves.items():
    c = np.array(c)
    ax[0].plot(ns, c, label=f"`{lt}`".strip("`"))
    ax[1].plot(ns, c * ns, label=lt)
ax[0].set_title("penalty per token of a wrong answer"), ax[0].set_xlabel("length of the wrong answer")
ax[1].set_title("total penalty over the wrong answer"), ax[1].set_xlabel("length of the wrong answer")
ax[0].legend(), ax[1].legend()
plt.tight_layout()
plt.show()
g_total = np.array(curves["grpo"]) * ns
assert np.allclose(g_total, g_total[0])                     # grpo: the same total, however long
assert np.allclose(curves["dr_grpo"], curves["dr_grpo"][0])   # dr_grpo: the same per token

# %% [markdown]
# Under `grpo` a wrong answer loses the same total log-probability whatever its length, so each
# of its tokens is penalised less the longer it gets. Under `dr_grpo` each token carries the same
# penalty. `dapo` sits in between: its normaliser is the token count of the whole batch, so here a
# longer wrong answer also dilutes the weight of every other token.
#
# **Clipping, and clip-higher.** Off policy (after the first of several updates on the same
# samples, `num_iterations` > 1) the ratio $\rho$ moves away from 1. The `min` with the clipped
# term stops the gradient once a token has moved far enough in the direction its advantage asks
# for: $\rho > 1 + \varepsilon$ with $\hat A > 0$, or $\rho < 1 - \varepsilon$ with $\hat A < 0$. DAPO
# observed that the upper bound limits exploration: a token sampled with probability 0.01 can rise
# only to 0.012 before its gradient vanishes, while a likely token is barely constrained. It
# raises the upper bound alone, $\varepsilon_{\mathrm{high}} = 0.28$ ("clip-higher"), against
# entropy collapse. The other losses in `refimpl.rl` replace the hard clip. CISPO
# {cite}`minimax2025m1` never drops a token's gradient: it weights $\ell$ by the *detached* ratio
# capped at $\varepsilon_{\mathrm{high}}$. SAPO {cite}`gao2025sapo` replaces the clip by a smooth
# sigmoid gate $\tfrac{4}{\tau}\sigma(\tau(\rho - 1))$, whose gradient is the `grpo` one at
# $\rho = 1$ and fades smoothly as $\rho$ moves away, over a width of about $1/\tau$ (TRL's
# defaults, $\tau = 1$ and $1.05$, make a very soft gate; $\tau = 10$ is shown to make the shape
# visible). The figure shows the gradient one token receives as a function of its ratio, for a
# positive and a negative advantage:

# %% tags=["hide-input"]
rhos = np.linspace(0.5, 1.6, 221)
variants = {
    "grpo, ε = 0.2": dict(loss_type="grpo"),
    "dapo, clip-higher ε_high = 0.28": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo, cap 5": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo (τ+ = 1, τ- = 1.05)": dict(loss_type="sapo"),
    "sapo (τ = 10)": dict(loss_type="sapo", sapo_temperature_pos=10.0, sapo_temperature_neg=10.0),
}
lp_now = np.full((len(rhos), 1), np.log(0.3))                       # (R, 1) current log-prob of the token
lp_old = lp_now - np.log(rhos)[:, None]                             # (R, 1) so that rho = exp(l - l_old)
one = np.ones((len(rhos), 1), bool)
grad = {}
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for k, sign in enumerate((1.0, -1.0)):
    for name, kw in variants.items():
        _, d, _ = grpo_loss(lp_now, lp_old, None, np.full(len(rhos), sign), one, **kw)
        g = -d[:, 0] * len(rhos)                                    # (R,) push on l: + raises the token
        grad[name, sign] = g
        ax[k].plot(rhos, g, label=name)
    ax[k].axvline(1.0, color="grey", lw=0.5)
    ax[k].set_xlabel("ratio ρ = π / π_old"), ax[k].set_title(f"advantage {sign:+.0f}: push on log π of the token")
ax[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
at = lambda name, sign, x: grad[name, sign][np.argmin(np.abs(rhos - x))]  # noqa: E731
assert at("grpo, ε = 0.2", 1, 1.25) == 0 and at("dapo, clip-higher ε_high = 0.28", 1, 1.25) > 0
assert at("grpo, ε = 0.2", -1, 0.75) == 0 and at("cispo, cap 5", 1, 1.5) > 0
assert np.isclose(at("sapo (τ+ = 1, τ- = 1.05)", 1, 1.0), at("grpo, ε = 0.2", 1, 1.0))
assert 0 < at("sapo (τ = 10)", 1, 1.5) < at("sapo (τ = 10)", 1, 1.0) / 5
p = 0.01
print(f"a token sampled with p = {p}: the clip stops its rise at {p * 1.2:.4f} (ε = 0.2) "
      f"or {p * 1.28:.4f} (ε_high = 0.28)")

# %% [markdown]
# Note the asymmetric side of the clip: with $\hat A > 0$ and $\rho < 1 - \varepsilon$ the token is
# *not* clipped (the `min` is pessimistic), and its gradient keeps growing with $\rho$.
#
# **Sequence-level ratios (GSPO).** The reward belongs to the whole completion, but the token
# ratios are noisy, and one extreme token can be clipped away while its neighbours are not. GSPO
# {cite}`zheng2025gspo` uses one ratio per completion, the geometric mean of its token ratios,
# $s_i = \exp\big(\tfrac1{|o_i|}\sum_t(\ell_{i,t} - \ell^{\mathrm{old}}_{i,t})\big)$, and clips the
# whole completion at once (`importance_sampling_level="sequence"`). Below, a right answer of 8
# tokens has one token whose ratio has jumped to 3:

# %% tags=["hide-input"]
n_tok = 8
lp_old = np.full((2, n_tok), np.log(0.5))
lp_new = lp_old.copy()
lp_new[0, 2] += np.log(3.0)                                         # one token of answer 0 tripled
adv = np.array([0.7, -0.7])
mask = np.ones((2, n_tok), bool)
rows, out = [], {}
for level in ("token", "sequence"):
    _, d, info = grpo_loss(lp_new, lp_old, None, adv, mask, loss_type="grpo", importance_sampling_level=level)
    out[level] = d
    rows.append((level, " ".join(f"{-x:.4f}" for x in d[0]), f"{info['clip_ratio/region_mean']:.3f}"))
table(["importance_sampling_level", "push on each token of the right answer", "clipped fraction"], rows)
s = np.exp(np.log(3.0) / n_tok)
assert out["token"][0, 2] == 0 and np.allclose(np.delete(out["token"][0], 2), -0.7 / (2 * n_tok))
assert np.allclose(out["sequence"][0], -0.7 * s / (2 * n_tok))      # every token: -A s / (B n)
print(f"sequence ratio s = 3^(1/8) = {s:.4f}")

# %% [markdown]
# At token level the jumped token loses its gradient and the others keep theirs. At sequence
# level the completion has moved only by $3^{1/8} = 1.147$ on average, inside the clip range,
# so every token, the jumped one included, gets the same push $\hat A s_i/(B|o_i|)$. GSPO's authors
# use it with the `grpo` aggregation; TRL warns that a token-sum aggregation would weight whole
# completions by their length again.
#
# ## 4. Three KL estimators
#
# The KL penalty in {eq}`eq-grpo-loss` is estimated at the sampled tokens only. With
# $x = \ell^{\mathrm{ref}} - \ell$ (the log-ratio of the reference to the policy at the sampled token),
# Schulman's three estimators {cite}`schulman2020klapprox` of
# $\mathrm{KL}(\pi_\theta\|\pi_{\mathrm{ref}}) = \mathbb E_{\pi_\theta}[-x]$ are
#
# $$
# k_1 = -x,\qquad k_2 = \tfrac12 x^2,\qquad k_3 = e^x - x - 1 .
# $$
#
# $k_1$ is unbiased but often negative and noisy; $k_2$ has low variance but is biased; $k_3$ is
# unbiased (because $\mathbb E_{\pi_\theta}[e^x] = 1$), never negative, and has low variance when the
# two policies are close. DeepSeekMath and R1 use $k_3$ (DeepSeekMath eq. 4). We measure all three
# on 100,000 samples from a 50-token policy, for reference policies at growing distance:

# %% tags=["hide-input"]
rng = np.random.default_rng(1)
Vk, N_SAMPLES = 50, 100_000
z_pol = rng.standard_normal(Vk)
u = rng.standard_normal(Vk)
logsm = lambda v: log_softmax_forward(v)[0]                         # noqa: E731
scales = np.array([0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5])
kl_stats = {k: ([], []) for k in ("k1", "k2", "k3")}
true_kl = []
for sc in scales:
    lpol, lref = logsm(z_pol), logsm(z_pol + sc * u)                # (V,) each
    tkl = float(np.exp(lpol) @ (lpol - lref))                        # exact KL(pi || pi_ref)
    true_kl.append(tkl)
    o = rng.choice(Vk, size=N_SAMPLES, p=np.exp(lpol))               # (N,) samples from the policy
    for k in kl_stats:
        est, _ = per_token_kl(lpol[o], lref[o], kl_estimator=k)      # (N,)
        kl_stats[k][0].append(est.mean() / tkl - 1)                  # relative bias
        kl_stats[k][1].append(est.std() / tkl)                       # relative std of one sample
        if k == "k3":
            assert (est >= 0).all()
true_kl = np.array(true_kl)
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for k, (b, s_) in kl_stats.items():
    ax[0].plot(true_kl, b, marker="o", ms=3, label=k)
    ax[1].plot(true_kl, s_, marker="o", ms=3, label=k)
for a_, t in zip(ax, ("relative bias of the mean", "relative std of one sample"), strict=True):
    a_.set_xscale("log"), a_.set_xlabel("true KL(π ‖ π_ref)"), a_.set_title(t), a_.legend()
ax[1].set_yscale("log")
plt.tight_layout()
plt.show()
b1, s1 = map(np.array, kl_stats["k1"])
b2, s2 = map(np.array, kl_stats["k2"])
b3, s3 = map(np.array, kl_stats["k3"])
print("true KL:", true_kl.round(4))
print("std / KL  k1:", s1.round(2), " k3:", s3.round(2))
assert (np.abs(b1) < 5 * s1 / np.sqrt(N_SAMPLES)).all() and (np.abs(b3) < 5 * s3 / np.sqrt(N_SAMPLES)).all()
assert (s3[:3] < s1[:3] / 5).all()            # close policies: k3 is far less noisy than k1
assert abs(b2[-1]) > 0.05                      # k2's bias shows once the policies are far apart

# %% [markdown]
# One more subtlety. In the loss, only the *value* of $k_3$ at the sampled tokens is differentiated;
# the dependence of the sampling distribution on $\theta$ is ignored. The gradient this produces,
# $\mathbb E_{\pi_\theta}[(1 - \pi_{\mathrm{ref}}/\pi_\theta)\nabla\ell]$, is exactly the gradient of the
# *other* direction, $\mathrm{KL}(\pi_{\mathrm{ref}}\|\pi_\theta)$. Enumerating the vocabulary shows it:

# %%
lpol, lref = logsm(z_pol), logsm(z_pol + 0.5 * u)
ids = np.arange(Vk)
lp_all, c_all = selective_log_softmax_forward(np.tile(z_pol, (Vk, 1)), ids)   # (V,) log pi at every token
_, dk3 = per_token_kl(lp_all, lref, kl_estimator="k3")                          # (V,) dk3/dl
expected_grad = selective_log_softmax_backward(np.exp(lpol) * dk3, c_all).sum(axis=0)  # (V,) E_pi[dk3/dz]
# d KL(ref || pi) / dz
grad_reverse_kl = np.exp(lpol) - np.exp(lref)
# d KL(pi || ref) / dz
grad_forward_kl = np.exp(lpol) * ((lpol - lref) - np.exp(lpol) @ (lpol - lref))
assert np.allclose(expected_grad, grad_reverse_kl, atol=1e-12)
print(f"|E[grad k3] - grad KL(ref||pi)| = {np.abs(expected_grad - grad_reverse_kl).max():.1e}, "
      f"|E[grad k3] - grad KL(pi||ref)| = {np.abs(expected_grad - grad_forward_kl).max():.1e}")

# %% [markdown]
# Both gradients vanish at $\pi_\theta = \pi_{\mathrm{ref}}$, and near it they agree to first order, so
# in practice the penalty still holds the policy close. With the small coefficients used for
# reasoning RL ($\beta = 0.04$ in DeepSeekMath, 0.001 for R1 according to TRL's documentation,
# 0 in DAPO and Dr. GRPO) it is a weak leash in any case.
#
# ## 5. Rule-based rewards
#
# R1-Zero used no neural reward model, to avoid reward hacking and the cost of retraining one
# (R1 §2.2.2). Two rules score each completion: **accuracy**, a deterministic check of the final
# answer, which must sit in a fixed place (here between `<answer>` tags); and **format**, the
# reasoning enclosed in `<think>` tags before the answer. R1's template asks for exactly this
# layout. DAPO adds a soft **overlong** penalty that grows linearly over the last $L_{\mathrm{cache}}$
# tokens before the length limit instead of punishing every truncated sample alike; R1 adds a
# **language-consistency** reward ({doc}`07_r1`). On completions for the addition task of
# {doc}`05_tiny_v3`:

# %% tags=["hide-input"]
task = AdditionTask(min_digits=1, max_digits=3)
ex = Example("47+85=", task.solve("47+85="))
good = reference_completion(task, ex)
completions = [
    good,                                                           # the reference trace
    "<think>7+5=12,4+8=12</think><answer>122</answer>",             # forgot the carry
    "<answer>132</answer>",                                         # right, but no reasoning
    "<think>7+5=12,4+8+1=13</think><answer>132</answer> done",      # text after the answer
    "<think>7+5=12,4+8+1=13<answer>132</answer>",                   # unclosed think
    "<think>sieben plus fuenf</think><answer>132</answer>",         # right, reasoning in words
    "<think>7+5=12,4+8+1=13,check 132-85=47</think><answer>132</answer>",                    # checks itself
    "<think>7+5=12,4+8+1=13,check 132-85=47,check 47+85=132 ok</think><answer>132</answer>",  # ... twice
]
acc = accuracy_reward(completions, [ex.answer] * len(completions), check=task.check)
fmt = format_reward(completions)
tags = tag_count_reward(completions)
lang = language_consistency_reward(completions, alphabet="0123456789+-=,")
lengths = np.array([len(TOKENIZER.encode(c)) for c in completions])  # tokens: each tag is one token
over = overlong_penalty(lengths, max_completion_len=48, soft_punish_cache=16)
total = combine_rewards(np.stack([acc, fmt], axis=1))              # R1-Zero: accuracy + format
table(["completion", "accuracy", "format", "tags", "language", "tokens", "overlong (48, 16)", "total"],
      [(f"`{c}`", a, f, t, f"{la:.2f}", n, f"{o:+.3f}", tt)
       for c, a, f, t, la, n, o, tt in zip(completions, acc, fmt, tags, lang, lengths, over, total, strict=True)])
assert acc.tolist() == [1, 0, 1, 1, 1, 1, 1, 1] and fmt.tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
assert total.tolist() == [2, 1, 1, 1, 1, 2, 2, 2] and lang[5] == 0 and lang[0] == 1
assert lengths[0] == 22 and over[0] == 0 and over[6] == (32 - 38) / 16 and over[7] == -1

# %% [markdown]
# The completion reasoning in words shows why R1 needed a language reward: the rules that R1-Zero
# optimised do not look inside the reasoning, so any text there is as good as any other as long as
# the answer is right. The two self-checking completions earn the same accuracy and format reward
# as the reference; only a length penalty tells them apart, and DAPO's penalty starts 16 tokens
# before the 48-token limit, reaching $-1$ beyond it. The format rule is strict (the whole
# completion must match, with each tag once), as a regular expression that looks only for the
# tags would be easy to satisfy with junk around them.
#
# ## 6. The whole loss
#
# The core of `grpo_loss` after its input checks: the ratio (per token or per sequence), the
# surrogate of the chosen `loss_type`, the KL estimator, the weighted sum, and the gradient with
# respect to each log-probability, assembled by hand. The tests in `tests/rl` check it against
# finite differences and against the same formulas in torch autograd, for every combination of
# loss type, ratio level and KL estimator.

# %% tags=["hide-input"]
src = inspect.getsource(grpo_loss)
core = src[src.index("    lp = logps.astype"):src.index("    N = float(mf.sum())")]
display(Markdown(f"```python\n{core.rstrip()}\n```"))
assert "dlogps = dlogps + beta * W * dkl" in core

# %% [markdown]
# ## 7. R1-Zero in miniature
#
# GRPO can only reinforce what the policy already does now and then. R1-Zero started from
# DeepSeek-V3-Base, a pretrained model whose samples were sometimes right, and RL made the
# behaviour behind them the usual one. The miniature recreates such a starting point
# (`refimpl.recipes.r1`):
#
# * **the policy** is the tiny DeepSeek-V3 of {doc}`05_tiny_v3` (MLA, one dense and one MoE layer
#   with 8 routed experts, about 100k parameters) without its MTP module;
# * **the task** is adding two 2- or 3-digit numbers; the reasoning that works is the column sums
#   from the right, with every carry written down;
# * **the base model** is pretrained with the next-token loss on a corpus of worked additions by
#   careless writers: each carry is written only about a third of the time (when it is dropped,
#   the following sums and the answer are consistently wrong), and some completions break the
#   format (no reasoning, missing tags, no tags at all). Greedy decoding follows the majority
#   habit and drops every carry, but a *sample* sometimes keeps them, so a group of 8 samples
#   usually holds right and wrong answers: the spread GRPO needs.
#
# GRPO then runs with the two R1-Zero rewards (accuracy, and format with weight 0.5), `dapo`
# aggregation with clip-higher, no KL term, 16 prompts and $G = 8$ completions per step, and a
# greedy evaluation on 128 held-out problems every few steps. The run is deterministic for its
# seed; the recipe caches its result in `notebooks/_cache`, so the pretraining is shared with
# {doc}`07_r1`.

# %%
t0 = time.perf_counter()
zero = r1_zero_run(cache_dir="_cache", progress=False)
gc = zero["grpo_config"]
base = zero["base"]
print(f"{'loaded from the cache' if zero['cached'] else 'trained'} in "
      f"{time.perf_counter() - t0:.0f} s "
      f"(pretraining {zero['seconds']['pretrain']:.0f} s, GRPO {zero['seconds']['rl']:.0f} s when computed)")
print("a few documents of the base model's corpus:")
for doc in base["corpus_examples"][:6]:
    print("   ", doc)
table(["setting", "value"], [(f"`{k}`", getattr(gc, k)) for k in (
    "steps", "prompts_per_step", "num_generations", "max_completion_length", "temperature", "lr", "loss_type",
    "epsilon", "epsilon_high", "beta", "scale_rewards", "reward_weights", "num_iterations")])

# %% [markdown]
# Each step samples the completions with the latent KV cache, scores them, and makes
# `num_iterations` updates. `grpo_objective` is one evaluation of the loss and its gradient: a
# forward pass, `grpo_loss_from_logits` (the loss above plus the log-softmax backward) and the
# model's hand-written backward pass. Each update then clips the global gradient norm to 1 and
# takes an AdamW step.

# %%
show_source(grpo_objective)

# %% [markdown]
# **The verdict first** (the cell below asserts it): GRPO with rule rewards alone lifts the
# held-out accuracy by at least 30 points, at least 95% of the answers end well formatted, and the
# completions grow longer.

# %% tags=["hide-input"]
h = zero["history"]
step = np.array([m["step"] for m in h])
curve = {k: np.array([m[k] for m in h]) for k in ("reward", "accuracy", "format", "completion_length",
                                                  "frac_reward_zero_std")}
ev_step = np.array([e["step"] for e in zero["evals"]])
ev_acc = np.array([e["accuracy"] for e in zero["evals"]])
fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
ax[0].plot(step, curve["reward"], label="reward (accuracy + 0.5 format)")
ax[0].plot(step, curve["accuracy"], label="accuracy of the samples")
ax[0].plot(step, curve["format"], label="format of the samples")
ax[0].plot(step, curve["frac_reward_zero_std"], ls=":", label="groups with zero reward std")
ax[0].set_title("training batch (sampled at τ = 1)"), ax[0].legend(fontsize=8)
ax[0].set_ylim(0, None), ax[0].set_ylabel("mean over the batch (reward, or a fraction)")
ax[1].plot(ev_step, ev_acc, marker="o")
ax[1].set_ylim(0, 1.02), ax[1].set_title("held-out accuracy (greedy, 128 problems)")
ax[1].set_ylabel("fraction of problems answered exactly")
ax[2].plot(step, curve["completion_length"], lw=0.8, label="training samples (τ = 1)")
ax[2].plot(ev_step, [e["mean_length"] for e in zero["evals"]], marker="o", label="held-out, greedy")
ax[2].set_title("mean completion length"), ax[2].legend(fontsize=8)
ax[2].set_ylim(0, None), ax[2].set_ylabel("tokens")  # from 0: the rise is a few tokens, not a multiple
for a in ax:
    a.set_xlabel("GRPO step")
plt.tight_layout()
plt.show()
before, after = zero["eval_before"], zero["eval_after"]
print(f"held-out accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}, format {before['format']:.1%} -> "
      f"{after['format']:.1%}, mean length {before['mean_length']:.1f} -> {after['mean_length']:.1f} tokens")
print(f"base model sampled at τ = 1: accuracy {base['eval_sampled']['accuracy']:.1%}, "
      f"format {base['eval_sampled']['format']:.1%}")
assert after["accuracy"] - before["accuracy"] >= 0.3        # the target: +30 points
assert after["format"] >= 0.95 and after["mean_length"] > before["mean_length"] + 0.5
assert curve["reward"][-5:].mean() > curve["reward"][:5].mean() + 0.2

# %% [markdown]
# The held-out accuracy climbs from the base model's level, where only problems without a carry
# come out right, to nearly every problem. The format was already right under greedy decoding,
# but about a fifth of the *samples* broke it; the format reward removes most of those over the
# run.
# The completions grow longer because the policy learns to write the carries, two tokens each:
# the miniature counterpart of R1-Zero's growing chains of thought, for a plain reason here. As
# the policy gets better, more groups are all right, carry no signal, and the fraction of
# zero-std groups rises: the situation DAPO's dynamic sampling addresses.
#
# The same held-out problems, before and after GRPO (greedy decoding):

# %% tags=["hide-input"]
pairs = list(zip(zero["samples_before"], zero["samples_after"], strict=True))
fixed = [(b, a) for b, a in pairs if not b["correct"] and a["correct"]]
broken = [(b, a) for b, a in pairs if b["correct"] and not a["correct"]]
shown = fixed[:5] + [(b, a) for b, a in pairs if not a["correct"]][:1]
table(["prompt", "base model", "after GRPO"],
      [(f"`{b['prompt']}`", f"`{b['completion']}` {'✓' if b['correct'] else '✗'}",
        f"`{a['completion']}` {'✓' if a['correct'] else '✗'}") for b, a in shown])
carried = sum(a["completion"].count("+1") > b["completion"].count("+1") for b, a in fixed)
formatted = sum(a["formatted"] and not b["formatted"] for b, a in fixed)
print(f"{len(fixed)} of {len(pairs)} held-out problems went from wrong to right ({carried} by writing the carries, "
      f"{formatted} by fixing the format), {len(broken)} from right to wrong")
assert len(fixed) >= 0.3 * len(pairs) and len(broken) <= 0.05 * len(pairs)
assert carried >= 0.8 * len(fixed)                             # what changed: the carries are written
print("\nthe first completion sampled (τ = 1) at a few training steps, with its reward:")
for m in h[:: max(len(h) // 5, 1)] + [h[-1]]:
    smp = m["sample"]
    print(f"  step {m['step']:3d}  {smp['prompt']}{smp['completion']}   reward {smp['reward']:.1f}")

# %% [markdown]
# Sampled at $\tau = 1$ the policy still slips now and then (a dropped carry, a missing tag), which
# keeps some groups informative; greedy decoding, which the evaluation uses, follows the habit
# that RL has made dominant. {doc}`07_r1` starts the same RL from a cold-started model instead.

# %% [markdown]
# ## 8. The "aha moment" in miniature
#
# R1-Zero's completions did more than grow: they started to re-examine themselves, "Wait, wait.
# Wait. That's an aha moment I can flag here" (R1 §2.2.4), although no reward asked for it. Work
# since then has traced the behaviour to the base model: RL amplifies checking and backtracking
# that pretraining already put there, rarely, when it pays. The recipe `refimpl.recipes.aha`
# builds that situation. Its base is pretrained on additions whose completions give a careless
# answer "in the head" (each carry dropped two times out of three, so the answer is often wrong),
# and only about one document in ten goes on to check it, restating the problem and recomputing it
# column by column; when the check disagrees, the writer says "wait" and takes the recomputed
# value. Column drills outside the answer format (`sum 47+85: 7+5=12,4+8+1=13 so 132.`) give the
# base its arithmetic "from elsewhere":
#
# * `47+85=<think>122</think><answer>122</answer>` (most documents);
# * `47+85=<think>122. check 47+85: 7+5=12,4+8+1=13 so 132. wait, 132</think><answer>132</answer>`.
#
# GRPO then runs exactly as above, with the accuracy and format rewards only (nothing for
# checking, nothing for length), and longer completions allowed. The detectors of
# `refimpl.tasks.reflection` read every completion back into its first answer, check, "wait" and
# final answer.

# %%
from refimpl.recipes.aha import aha_run  # noqa: E402

t0 = time.perf_counter()
aha = aha_run(cache_dir="_cache", progress=False)
print(f"{'loaded from the cache' if aha['cached'] else 'trained'} in {time.perf_counter() - t0:.0f} s "
      f"({aha['seconds']:.0f} s when computed)")
print("corpus:", *aha["corpus_examples"][:4], sep="\n    ")
names = {"reflection_rate": "completions that check", "self_correction_rate": "wrong first answer fixed",
         "accuracy": "accuracy", "mean_length": "mean length (tokens)"}
table(["held-out, greedy", "base", "after GRPO", "base, sampled", "after, sampled"],
      [(label, *(f"{v:.2f}" for v in (aha[f"{k}_before"], aha[f"{k}_after"], aha["sampled_before"][k],
                                      aha["sampled_after"][k]))) for k, label in names.items()])
assert aha["reflection_rate_after"] >= 0.5 and aha["reflection_rate_after"] >= aha["reflection_rate_before"] + 0.3
assert aha["accuracy_after"] >= aha["accuracy_before"] + 0.2
assert aha["mean_length_after"] >= 2 * aha["mean_length_before"]           # "several times longer"
assert aha["reflection_rate_before"] <= 0.02 and 0.05 <= aha["sampled_before"]["reflection_rate"] <= 0.2
assert aha["self_correction_rate_after"] > aha["self_correction_rate_before"]

# %% tags=["hide-input"]
cs = np.array([c["step"] for c in aha["curve"]])
fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
for mode, ls in (("greedy", "-"), ("sampled", "--")):
    ax[0].plot(cs, [c[mode]["reflection_rate"] for c in aha["curve"]], ls=ls, marker="o", label=f"check ({mode})")
    ax[0].plot(cs, [c[mode]["self_correction_rate"] for c in aha["curve"]], ls=ls, marker="s",
               label=f"self-correction ({mode})")
    ax[1].plot(cs, [c[mode]["accuracy"] for c in aha["curve"]], ls=ls, marker="o", label=mode)
    ax[2].plot(cs, [c[mode]["mean_length"] for c in aha["curve"]], ls=ls, marker="o", label=mode)
ax[0].set_title("share of held-out completions"), ax[1].set_title("held-out accuracy")
ax[2].set_title("mean completion length (tokens)")
for a in ax:
    a.set_xlabel("GRPO step"), a.set_ylim(bottom=0), a.legend(fontsize=8)
ax[0].set_ylim(0, 1.02), ax[1].set_ylim(0, 1.02)
plt.tight_layout()
plt.show()

# %% [markdown]
# Self-corrections taken from the held-out problems after GRPO (greedy decoding): the first
# answer is wrong, the check recomputes the sum, and the final answer is the recomputed one.

# %%
from refimpl.tasks.reflection import is_self_correction, parse_reflection  # noqa: E402

fixes = [s for s in aha["samples_after"] if is_self_correction(s["completion"], s["answer"])]
for s in fixes[:3]:
    r = parse_reflection(s["completion"])
    print(f"{s['prompt']}{s['completion']}\n    first answer {r.first} (right: {s['answer']}), final {r.final}")
assert fixes and all(parse_reflection(s["completion"]).first != s["answer"] for s in fixes)
unfixed = [s for s in aha["samples_after"] if parse_reflection(s["completion"]).checked and not s["correct"]]
waits = sum(parse_reflection(s["completion"]).waited for s in aha["samples_after"])
print(f"\n{len(fixes)} of {len(aha['samples_after'])} greedy completions correct themselves; "
      f"{len(unfixed)} check and still end wrong; {waits} say 'wait'")
assert waits <= 0.05 * len(aha["samples_after"])                            # the word "wait" is gone
for s in unfixed[:2]:
    print(f"    {s['prompt']}{s['completion']}")

# %% [markdown]
# **What the miniature shows.** A behaviour the base model never shows under greedy decoding, and
# only in about a tenth of its samples, becomes the usual one under RL that rewards nothing but
# the right answer in the right format, because completions that check are right more often; the
# completions grow several times longer as a consequence, and self-corrections appear: a wrong
# first answer, a recomputation, a right final one. That is the mechanism the R1 report describes
# and later analyses of it found: RL selects among behaviours the base already has. One detail
# came out differently from the corpus: the policy stopped writing "wait". It now closes every
# check with "ok" and answers with the recomputed value whatever the verdict, since only the final
# answer is rewarded and the verdict word earns nothing. The useful part of the habit (recompute,
# then trust the recomputation) was kept, and its wording was not.
#
# **What it does not show.** The check, and the arithmetic it needs (the column drills), were
# written into the corpus; the tiny model does not invent them, it only makes a rare habit common.
# It cannot show reflection that was never in the base, new ways of checking, or an "aha" in the
# sense of an insight, and the check here is a full recomputation, which a careful writer would
# simply do instead of the careless first answer: the policy keeps the first answer because its
# base did. Getting the base to *perform* the rare check at all took two design steps that are
# worth knowing: with checks in a tenth of the documents and no drills, the base had not learned to
# find the prompt's digits from inside the check, its checks were wrong, checking did not pay,
# and RL made it rarer instead of more common.

# ## Summary
#
# What this chapter measured (the numbers are computed by the cells above when the page is built):

# %% tags=["hide-input"]
(_, var_plain), (scale_mean, var_mean) = stats.values()             # the bandit of section 1
summary = [
    f"* On a one-token bandit, the group-mean baseline cut the variance of the gradient estimate from "
    f"{var_plain:.4f} to {var_mean:.4f} per group, at the price of a scale of {scale_mean:.3f} (about (G-1)/G).",
    f"* Scaling by the group's standard deviation gives a question that 1 in 16 samples gets right "
    f"{ratio['group'] / ratio['none']:.1f} times the weight it has without scaling, relative to an 8-in-16 one.",
    f"* R1-Zero in miniature: GRPO with rule rewards took held-out accuracy from {before['accuracy']:.1%} to "
    f"{after['accuracy']:.1%} and the mean completion length from {before['mean_length']:.1f} to "
    f"{after['mean_length']:.1f} tokens.",
]
display(Markdown("\n".join(summary)))
assert var_mean < var_plain and after["accuracy"] > before["accuracy"] and ratio["group"] > ratio["none"]

# %% [markdown]
# ## Exercises
#
# 1. Compute by hand the group-relative advantages of the rewards $[1, 1, 1, 0]$ (one group,
#    `ddof=1`, $\epsilon = 10^{-4}$ added to the standard deviation), then check them against
#    `group_advantages`.

# %% tags=["hide-cell"]
r = np.array([1.0, 1.0, 1.0, 0.0])
mean = r.mean()                                             # 0.75
std = np.sqrt(((r - mean) ** 2).sum() / (len(r) - 1))       # sqrt(0.75 / 3) = 0.5
by_hand = (r - mean) / (std + 1e-4)                         # [0.4999, 0.4999, 0.4999, -1.4997]
adv, _ = group_advantages(r, 4)
print(by_hand.round(5), adv.round(5))
assert np.isclose(std, 0.5) and np.allclose(adv, by_hand) and np.isclose(adv.sum(), 0.0)

# %% [markdown]
# 2. A group of four completions with rewards $[1, 0, 0, 0]$ has lengths 10, 20, 30 and 40 tokens
#    ($L_{\max} = 48$, on policy, $\beta = 0$, `scale_rewards="none"`). Predict $\partial J/\partial\ell$
#    for one token of each completion under `dr_grpo` and under `grpo`, and the *total* over each
#    completion, then check with `grpo_loss`.

# %% tags=["hide-cell"]
lengths, B, L = np.array([10, 20, 30, 40]), 4, 48
adv, _ = group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4, scale_rewards="none")   # [0.75, -0.25, -0.25, -0.25]
mask = np.arange(L)[None, :] < lengths[:, None]                                      # (4, 48)
lp = np.full((B, L), -0.5)
_, d_dr, _ = grpo_loss(lp, None, None, adv, mask, loss_type="dr_grpo", max_completion_length=L)
_, d_g, _ = grpo_loss(lp, None, None, adv, mask, loss_type="grpo")
assert np.allclose(d_dr[:, 0], -adv / (B * L))                  # dr_grpo: -A / (B L_max) per token
assert np.allclose(d_g[:, 0], -adv / (B * lengths))             # grpo: -A / (B |o_i|) per token
assert np.allclose(d_g.sum(axis=1), -adv / B)                   # grpo: the total does not depend on length
assert np.allclose(d_dr.sum(axis=1), -adv * lengths / (B * L))  # dr_grpo: the total grows with length
print("dr_grpo per token:", d_dr[:, 0].round(5), " grpo per token:", d_g[:, 0].round(5))

# %% [markdown]
# 3. Under GSPO (`importance_sampling_level="sequence"`, `loss_type="grpo"`), every token of
#    completion $i$ has moved by the same log-ratio $\delta = 0.1$. Show that each of its tokens
#    receives $\partial J/\partial\ell = -\hat A_i e^{\delta}/(|o_i|\,B)$, and find the smallest $\delta > 0$
#    at which a completion with $\hat A_i > 0$ stops receiving any gradient ($\varepsilon = 0.2$).

# %% tags=["hide-cell"]
B, T, delta = 2, 6, 0.1
lp_old = np.full((B, T), -1.0)
adv = np.array([0.5, -0.5])
_, d, _ = grpo_loss(lp_old + delta, lp_old, None, adv, np.ones((B, T), bool), loss_type="grpo",
                    importance_sampling_level="sequence")
assert np.allclose(d, -adv[:, None] * np.exp(delta) / (T * B))
delta_stop = np.log(1.2)                                          # s_i = e^delta leaves [0.8, 1.2]
_, d_stop, _ = grpo_loss(lp_old + delta_stop + 1e-6, lp_old, None, adv, np.ones((B, T), bool),
                         loss_type="grpo", importance_sampling_level="sequence")
assert (d_stop[0] == 0).all() and (d_stop[1] != 0).all()       # the negative one is not clipped on that side
print(f"gradient stops for A > 0 beyond delta = log 1.2 = {delta_stop:.4f}")

# %% [markdown]
# 4. At the sampled token the policy has probability 0.5 and the reference 0.25. Compute the three
#    KL estimates and their derivatives with respect to $\ell$ by hand, and check them with
#    `per_token_kl`.

# %% tags=["hide-cell"]
lp, lr = np.array([np.log(0.5)]), np.array([np.log(0.25)])
x = np.log(0.25 / 0.5)                                            # log pi_ref / pi = -log 2
by_hand = {"k1": (-x, 1.0), "k2": (x * x / 2, -x), "k3": (np.exp(x) - x - 1, 1 - np.exp(x))}
for k, (value, deriv) in by_hand.items():
    v, dv = per_token_kl(lp, lr, kl_estimator=k)
    assert np.isclose(v[0], value) and np.isclose(dv[0], deriv)
    print(f"{k}: value {v[0]:.6f}, derivative {dv[0]:.6f}")
assert np.isclose(by_hand["k3"][0], 0.193147, atol=1e-6)
