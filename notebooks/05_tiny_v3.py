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
# # A tiny DeepSeek-V3
#
# The previous chapters built multi-head latent attention and DeepSeekMoE as separate layers. This
# one stacks them into the whole decoder of DeepSeek-V3 {cite}`deepseekai2024v3`, trains it with
# hand-written gradients on a toy task, generates from it with the compressed KV cache, and uses
# its multi-token-prediction (MTP) module as a draft model for speculative decoding.
#
# 1. assemble the model: embedding, pre-norm blocks (dense first, then MoE), final norm, LM head,
#    with parameters named exactly as in the released checkpoints;
# 2. check the backward pass of the whole model, loss included;
# 3. train it on column addition (AdamW, clipping, warmup + cosine, V3's bias update);
# 4. generate with the latent cache, and check it against recomputing everything;
# 5. MTP: the extra training signal, and the acceptance rate of MTP drafts.
#
# Everything below calls `refimpl.model`; code shown is the library's real source.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * assemble MLA, DeepSeekMoE and RMSNorm into a complete decoder with multi-token prediction;
# * run its backward pass end to end and check it against finite differences;
# * train it from scratch on column addition in about a minute, then sample from it with the latent
#   cache and with MTP drafts;
# * save and load it in the Hugging Face checkpoint layout.
# ```

# %%
import os

# The matrices here are tiny: BLAS threads only add synchronisation cost (set before NumPy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile  # noqa: E402
import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refimpl import ModelConfig, load_pretrained  # noqa: E402
from refimpl.attention import kv_cache_elements_per_token  # noqa: E402
from refimpl.display import show_source  # noqa: E402
from refimpl.model import (  # noqa: E402
    block_forward,
    generate,
    init_params,
    loss_backward,
    loss_forward,
    model_backward,
    model_forward,
    save_pretrained,
    speculative_generate,
    to_hub,
)
from refimpl.model.mtp import mtp_draft_step  # noqa: E402
from refimpl.moe import count_parameters  # noqa: E402
from refimpl.recipes.tiny_v3 import answer_accuracy, tiny_v3_config, tiny_v3_run  # noqa: E402
from refimpl.tasks import TOKENIZER, make_dataset, reference_completion  # noqa: E402
from refimpl.testing import check_grad  # noqa: E402
from refimpl.tree import tree_map  # noqa: E402

# %% [markdown]
# ## Assembling the decoder
#
# A DeepSeek-V3 layer is pre-norm: RMSNorm, MLA, residual; RMSNorm, feed-forward, residual
# (V3 §2.1):
#
# $$
# u^{(\ell)} = h^{(\ell-1)} + \mathrm{MLA}\bigl(\mathrm{RMSNorm}(h^{(\ell-1)})\bigr), \qquad
# h^{(\ell)} = u^{(\ell)} + \mathrm{FFN}^{(\ell)}\bigl(\mathrm{RMSNorm}(u^{(\ell)})\bigr).
# $$ (eq-decoder-block)
#
# The attention is the MLA of {doc}`03_mla`, whose cache per token is {eq}`eq-mla-cache`. The
# feed-forward network is a dense SwiGLU ({eq}`eq-swiglu`) in the first `first_k_dense_replace`
# layers (3 in V3) and the DeepSeekMoE layer of {doc}`04_moe`, {eq}`eq-moe-dispatch`, in the
# others. The embedding is not scaled and not tied to the
# output head. Our tiny model has one dense layer and one MoE layer with 8 routed experts (top-2,
# routed within 1 of 2 groups, V3's sigmoid router with a balancing bias) and one shared expert.

# %%
config = tiny_v3_config()
params = init_params(config, np.random.default_rng(0), np.float32)
counts = count_parameters(config)
print(f"vocabulary {config.vocab_size}, hidden {config.hidden_size}, layers "
      f"{config.num_hidden_layers} "
      f"(MoE: {[n for n in range(config.num_hidden_layers) if config.is_moe_layer(n)]}), MTP depth "
      f"{config.num_nextn_predict_layers}")
print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token (without MTP)")
show_source(block_forward)

# %% [markdown]
# The parameter tree uses the names of the Hugging Face checkpoints, so every leaf maps to one hub
# tensor; the stacked experts expand into one tensor per expert, and the MTP module lives at layer
# index `num_hidden_layers` as in the released V3 weights.

# %%
hub = to_hub(params, config)
for name in list(hub)[:3] + [n for n in hub if ".experts.0." in n] + [n for n in hub if "eh_proj" in n]:
    print(f"{name:55s} {hub[name].shape}")
assert len(hub) == len(set(hub)) and "model.layers.1.mlp.experts.7.down_proj.weight" in hub

# %% [markdown]
# ## The backward pass of the whole model
#
# ```{glue:figure} diagram-mtp
# ---
# alt: >-
#   Multi-token prediction: beside the main model, one extra module combines each position's hidden
#   state with the embedding of the next token and predicts the token after it; at decoding time
#   its guess is a draft that the next forward pass verifies.
# name: diagram-mtp
# ---
# Multi-token prediction in training (left) and as the draft of speculative decoding (right), with
# DeepSeek-V3's hidden size and depth (drawn by `refimpl.diagrams.mtp_diagram`).
# ```
#
# The training loss is the next-token cross-entropy ({eq}`eq-cross-entropy`), plus V3's
# sequence-wise balance loss (eq. 17–20, weight `aux_loss_alpha`) and the MTP loss (§2.2, eq. 25),
# the mean of the $D$ depths' cross-entropies weighted by $\lambda = 0.3$:
#
# $$
# \mathcal{L} = \mathcal{L}_{\text{LM}} + \sum_{\ell \in \text{MoE}} \mathcal{L}^{(\ell)}_{\text{Bal}}
#   + \frac{\lambda}{D} \sum_{k=1}^{D} \mathcal{L}^{k}_{\text{MTP}} .
# $$ (eq-v3-loss)
#
# Its gradient with respect to every parameter is assembled from the layers' hand-written
# backward passes in reverse order. A finite-difference check in float64, on a smaller copy of the
# model, tests all of it at once: a few randomly chosen entries of every one of the ~70 parameter
# tensors.

# %%
show_source(model_backward)

# %%
small = tiny_v3_config(hidden_size=16, intermediate_size=16, moe_intermediate_size=8, q_lora_rank=8, kv_lora_rank=8,
                       qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, num_attention_heads=2,
                       num_key_value_heads=2, initializer_range=0.3, aux_loss_alpha=0.1)
small_params = init_params(small, np.random.default_rng(1))
ids = np.random.default_rng(2).integers(0, small.vocab_size, (2, 6))


def loss_and_vjp(p):
    loss, cache, _ = loss_forward(ids, p, small, backend="numpy")
    return loss, lambda d: (loss_backward(float(d), cache, p),)


err = check_grad(loss_and_vjp, [small_params], max_entries=2)
print(f"worst relative error over all parameters: {err:.1e}")
assert err < 1e-5

# %% [markdown]
# ## Training on column addition
#
# The task comes from `refimpl.tasks`: a prompt such as `58+7=` and a completion that works the
# sum out column by column, `<think>8+7=15,5+0+1=6</think><answer>65</answer>`, one character per
# token. The loss covers the completion only. Each step runs the forward and backward pass, clips
# the global gradient norm to 1, takes an AdamW step with a warmup + cosine learning rate, and
# then moves every expert's routing bias by ±γ toward balance (V3 §2.1.2). The recipe is
# deterministic for a seed; this run takes about a minute.
#
# **The verdict first** (asserted under the plots): the next-token loss falls more than tenfold,
# and the MoE imbalance falls too, with no balance gradient beyond the tiny sequence-wise loss.

# %%
t0 = time.perf_counter()
run = tiny_v3_run(steps=600, progress=False)
print(f"600 steps in {time.perf_counter() - t0:.0f} s")
state, task = run["state"], run["task"]
h = {k: np.array(v) for k, v in state.history.items()}

fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
ax[0].plot(h["lm_loss"], label="next-token loss", lw=0.8)
ax[0].plot(h["mtp_loss"] / 0.3, label="MTP depth-1 loss (λ removed)", lw=0.8)
ax[0].set_yscale("log"), ax[0].set_xlabel("step"), ax[0].legend(), ax[0].set_title("losses")
ax[1].plot(h["lr"]), ax[1].set_xlabel("step"), ax[1].set_title("learning rate (warmup + cosine)")
ax[2].plot(np.convolve(h["max_vio"], np.ones(20) / 20, "valid"))
ax[2].set_xlabel("step"), ax[2].set_title("MoE imbalance MaxVio (20-step mean)")
ax[0].set_ylabel("cross-entropy (nats per token)"), ax[1].set_ylabel("learning rate")
ax[2].set_ylabel("MaxVio (busiest expert's load / mean - 1)"), ax[2].set_ylim(0, None)
plt.tight_layout()
plt.show()
assert h["lm_loss"][-20:].mean() < h["lm_loss"][:20].mean() / 10

# %% [markdown]
# The MoE layer's imbalance (MaxVio: the busiest expert's excess over the mean load) falls as the
# bias update pushes tokens away from overloaded experts, without any gradient from a balance term
# beyond the tiny sequence-wise loss.

# %%
print(f"MaxVio: {h['max_vio'][:20].mean():.2f} over the first 20 steps, "
      f"{h['max_vio'][-100:].mean():.2f} "
      "over the last 100")
assert h["max_vio"][-100:].mean() < h["max_vio"][:20].mean()

# %% [markdown]
# ## Generating with the latent cache
#
# Generation prefills the prompt once, then decodes one token per step. Each MLA layer caches only
# the normalised latent $c^{KV}$ and the rotated rope key $k^R$ per token ({eq}`eq-mla-cache`), and
# decodes with the absorbed weights ({eq}`eq-mla-absorb`, V2 §2.1.2). Prompts of different lengths
# are grouped by length, so no padding enters the attention. The answers are checked exactly.

# %%
acc, texts = answer_accuracy(state.params, run["config"], task, n=64)
examples = make_dataset(task, 4, np.random.default_rng(10_001))
for e, t in zip(examples, texts[:4], strict=True):
    print(f"{e.prompt:10s} -> {t}")
print(f"exact answers on 64 new prompts: {acc:.0%}")
per_token = kv_cache_elements_per_token(run["config"], "mla"), kv_cache_elements_per_token(run["config"], "mha")
print(f"cache per token (all layers): {per_token[0]} values with MLA vs {per_token[1]} for MHA "
      "with the same heads")

prompts = np.stack([TOKENIZER.encode(e.prompt, add_bos=True) for e in make_dataset(task, 40, np.random.default_rng(5))
                    if len(e.prompt) == 6][:4])
cached = generate(state.params, run["config"], prompts, 20)
recomputed = generate(state.params, run["config"], prompts, 20, use_cache=False)
naive = generate(state.params, run["config"], prompts, 20, impl="naive")
assert (cached == recomputed).all() and (cached == naive).all()
assert acc > 0.2

# %% tags=["remove-cell"]
# A diagram drawn by refimpl.diagrams from the config it shows; glued into the figure below.
from myst_nb import glue

from refimpl.diagrams import mtp_diagram

glue("diagram-mtp", mtp_diagram("deepseek-v3"), display=False)
plt.close("all")

# %% [markdown]
# ## Multi-token prediction
#
# V3's MTP module predicts the token after next: it combines the main model's final hidden state
# at position $i$ with the embedding of token $i+1$ (embedding first, as the released weights),
# runs one more transformer block and reuses the shared output head. In training it adds a denser
# signal (the curve above). At inference it can propose a draft token that the main model checks
# in the same forward pass that produces the next token: if the draft is right, one forward yields
# two tokens. The output is exactly the greedy output, whatever the draft.

# %%
show_source(mtp_draft_step)

# %%
drafted = accepted = forwards = produced = 0
for e in make_dataset(task, 16, np.random.default_rng(7)):
    p = TOKENIZER.encode(e.prompt, add_bos=True)[None]
    toks, info = speculative_generate(state.params, run["config"], p, 24)
    assert (toks == generate(state.params, run["config"], p, 24)).all()
    drafted, accepted = drafted + info["drafted"], accepted + info["accepted"]
    forwards, produced = forwards + info["main_forwards"], produced + 24
print(f"MTP draft acceptance rate: {accepted / drafted:.0%} ({accepted}/{drafted}); "
      f"{produced / forwards:.2f} tokens per main-model forward")
assert accepted / drafted > 0.3

# %% [markdown]
# DeepSeek-V3 reports an acceptance rate of 85–90% for its second token (§5.4.3), giving about
# 1.8 times the decoding speed.
#
# ## Checkpoints in the hub layout
#
# `save_pretrained` writes `config.json` and safetensors with the hub's tensor names;
# `refimpl.load_pretrained` reads a DeepSeek-V2 or V3 directory in that layout (the test suite
# checks it against transformers' logits and greedy generations on tiny random models).

# %%
with tempfile.TemporaryDirectory() as d:
    save_pretrained(d, state.params, run["config"])
    m = load_pretrained(d)
    logits = m(prompts)
# the file holds the float32 weights exactly; load_pretrained computes in float64, so compare with a
# float64 forward of the same weights
params64 = tree_map(lambda a: a.astype(np.float64), state.params)
assert np.allclose(logits, model_forward(prompts, params64, run["config"])[0], rtol=1e-10, atol=1e-10)
print(m, logits.dtype, logits.shape)

# %% [markdown]
# ## Does thinking first help? An ablation
#
# The chains of thought of the later chapters rest on a claim: a model that writes its reasoning
# before the answer gets more answers right than one that answers at once. The recipe
# `refimpl.recipes.cot` measures it with everything else held fixed. Two copies of one
# initialisation of the policy of {doc}`07_r1` (this chapter's model without its MTP module)
# are fine-tuned on the same training problems, drawn in the same order, and differ only in the
# target: `<answer>132</answer>` (**direct**) or `<think>7+5=12,4+8+1=13</think><answer>132</answer>`
# (**think first**). An answer of a few tokens carries little signal per example, and with equal
# steps the direct model learned nothing at any length; so it gets more steps than the model that
# thinks first (the cell below prints both budgets, and the tokens each model trained on). Both
# are then evaluated greedily on held-out problems whose two operands both have $d$ digits, for
# lengths inside the training range and beyond it. The chapter runs the command line's defaults
# (`python -m refimpl cot-ablation`, one seed; `--seeds 3` repeats the run with other
# initialisations and draws of the training problems and reports means with standard errors),
# cached in `notebooks/_cache`.

# %%
from refimpl.recipes.cot import cot_ablation_run  # noqa: E402

t0 = time.perf_counter()
cot = cot_ablation_run(cache_dir="_cache", progress=False)   # the CLI's defaults
print(f"{'loaded from the cache' if cot['cached'] else 'trained'} in {time.perf_counter() - t0:.0f} s "
      f"({cot['seconds']:.0f} s when computed); seeds: {[s['seed'] for s in cot['per_seed']]}; steps: "
      f"{cot['steps']}; training tokens: {cot['tokens']}; training operands of 1 to {cot['train_max_digits']} digits")
rows = cot["per_length"]
for r in rows:
    print(f"{r['digits']} digits{' (beyond training)' if r['beyond_training'] else '':20s} "
          f"think first {r['with_cot']:6.1%}   direct {r['without_cot']:6.1%}   gap {100 * r['gap']:+4.0f} points")
for where, label in (("", "all lengths"), ("_seen", "trained lengths"), ("_beyond", "beyond training")):
    print(f"{label:16s} think first {cot['accuracy_with_cot' + where]:6.1%}   direct "
          f"{cot['accuracy_without_cot' + where]:6.1%}   gap {100 * cot['gap' + where]:+5.1f} points")
for style in ("direct", "think"):
    print(f"{style}, 3 digits:", *(f"{p}{c} {'✓' if ok else '✗'}" for p, c, ok in cot["samples"][f"{style}/3"][:2]))
seen = [r for r in rows if not r["beyond_training"]]
beyond = [r for r in rows if r["beyond_training"]]
assert len(seen) >= 2 and beyond and rows[-1]["digits"] >= 6   # trained lengths and longer ones, up to 6 digits
assert cot["gap"] >= 0.20                                   # thinking first wins by 20 points or more overall
assert seen[-1]["gap"] > seen[0]["gap"]                     # and its lead is larger on the longest trained sums
assert cot["tokens"]["direct"] > 0 and cot["steps"]["direct"] > cot["steps"]["think"]
assert all(r["with_cot"] <= 0.05 and r["without_cot"] <= 0.05 for r in beyond)   # both fail beyond training

# %% tags=["hide-input"]
d = np.array([r["digits"] for r in rows])
fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.plot(d, [r["with_cot"] for r in rows], marker="o", label="think first (<think> column sums)")
ax.plot(d, [r["without_cot"] for r in rows], marker="s",
        label=f"direct answer ({cot['steps']['direct'] / cot['steps']['think']:.3g}× the steps)")
ax.axvspan(cot["train_max_digits"] + 0.5, d.max() + 0.5, color="0.9", label="longer than any training problem")
ax.set_xlim(0, d.max() + 0.5), ax.set_ylim(0, 1.02), ax.set_xticks(d)
ax.set_xlabel("digits per operand"), ax.set_ylabel("held-out accuracy (greedy)"), ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% tags=["remove-input"]
from IPython.display import Markdown, display  # noqa: E402

short, long_ = seen[0], seen[-1]
tokens = cot["tokens"]["direct"] / cot["tokens"]["think"]
display(Markdown(
    f"On {short['digits']}-digit sums the direct model reaches {short['without_cot']:.0%} against "
    f"{short['with_cot']:.0%} for the model that thinks first; on {long_['digits']}-digit sums, the longest "
    f"it was trained on, {long_['without_cot']:.0%} against {long_['with_cot']:.0%}. The lead of thinking first "
    f"grows from {100 * short['gap']:.0f} to {100 * long_['gap']:.0f} points as the sums get longer, as the "
    "argument predicts: the direct model has to produce the leading digit first, although it depends on every "
    "carry below it, in one forward pass per token, while the model thinking first only ever adds two digits "
    f"and a carry. Over all {len(rows)} lengths thinking first leads by {100 * cot['gap']:.0f} points "
    f"({cot['accuracy_with_cot']:.0%} against {cot['accuracy_without_cot']:.0%}), although the direct model had "
    f"{cot['steps']['direct'] / cot['steps']['think']:.3g} times the steps (its rows being shorter, "
    f"{tokens:.0%} of the tokens of the model that thinks first). In the grey band, beyond the training "
    "lengths, both fail: "
    f"{max(max(r['with_cot'], r['without_cot']) for r in beyond):.0%} at best. The tiny model has not learned "
    "to find the k-th digit of a number longer than any it has seen, so here the chain of thought helps with "
    "the work per step, not with length generalisation. This is one seed, and a run of these tiny models is "
    "sensitive to details as small as floating-point rounding: read the sizes as an example, the sign and "
    "the growth as the finding (the recipe's documentation lists the other seeds measured). The chapters on "
    "reinforcement learning start from here: they take for granted that the trace pays, and ask how a model "
    "can learn to write it without being shown."))

# %% [markdown]
# The same model, scaled up to V3's configuration, is what the later chapters train with
# reinforcement learning and distil, and what {doc}`09_cost` prices.

# %% [markdown]
# ## Summary
#
# What this chapter measured (the numbers are computed by the cells above when the page is built):

# %% tags=["hide-input"]
summary = [
    f"* The tiny V3 has {counts['total']:,} parameters, {counts['active']:,} of them active per token; its "
    f"hand-written backward pass agrees with finite differences to {err:.1e}.",
    f"* 600 steps took the next-token loss from {h['lm_loss'][:20].mean():.3f} (mean of the first 20 steps) to "
    f"{h['lm_loss'][-20:].mean():.3f} (last 20), while the bias update lowered MaxVio from "
    f"{h['max_vio'][:20].mean():.2f} to {h['max_vio'][-100:].mean():.2f}.",
    f"* Greedy decoding from the latent cache answered {acc:.0%} of 64 new problems exactly; the cache holds "
    f"{per_token[0]} values per token against {per_token[1]} for MHA with the same heads.",
    f"* The MTP module's drafts were accepted {accepted / drafted:.0%} of the time ({accepted} of {drafted}).",
]
display(Markdown("\n".join(summary)))
assert h["lm_loss"][-20:].mean() < h["lm_loss"][:20].mean() and per_token[0] < per_token[1]

# %% [markdown]
# ## Exercises
#
# The solutions are hidden under each exercise; they run when the book is built and assert their
# answers.
#
# 1. **The tiny model's cache.** Use {eq}`eq-mla-cache` to compute the values cached per token by
#    the trained model (all layers), check it with `kv_cache_elements_per_token`, and compare with
#    what MHA with the same heads and head dimension $D_n + D_r$ would cache.

# %% tags=["hide-cell"]
# Exercise 1
cfg = run["config"]
mla_by_hand = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
mha_same_heads = 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
assert mla_by_hand == kv_cache_elements_per_token(cfg, "mla")
print(f"MLA: {mla_by_hand} values per token; MHA with the same heads: {mha_same_heads} "
      f"({mha_same_heads / mla_by_hand:.1f}x)")
assert mha_same_heads > mla_by_hand

# %% [markdown]
# 2. **Where the parameters are.** With `count_parameters`, find the share of the tiny model's
#    parameters that sit in the MoE layer's routed experts, and its active parameters per token.
#    Compare both with DeepSeek-V3.

# %% tags=["hide-cell"]
# Exercise 2
tiny_c, v3_c = count_parameters(cfg), count_parameters(ModelConfig.preset("deepseek-v3"))
for name, c in (("tiny", tiny_c), ("DeepSeek-V3", v3_c)):
    print(f"{name:12s} routed experts hold {c['moe_routed'] / c['total']:.0%} of {c['total']:,} parameters; "
          f"active per token {c['active'] / c['total']:.1%}")
assert v3_c["moe_routed"] / v3_c["total"] > tiny_c["moe_routed"] / tiny_c["total"]
assert v3_c["active"] / v3_c["total"] < tiny_c["active"] / tiny_c["total"]

# %% [markdown]
# 3. **Two tokens per forward.** In speculative decoding with the MTP draft, every main-model
#    forward yields its own next token, plus the draft token when that was accepted. Check this
#    accounting against the `info` of one `speculative_generate` call: the tokens produced equal
#    the main forwards (after the prefill) plus the accepted drafts.

# %% tags=["hide-cell"]
# Exercise 3: the first main forward is the prefill, which also yields the first token
e = make_dataset(task, 1, np.random.default_rng(11))[0]
p = TOKENIZER.encode(e.prompt, add_bos=True)[None]
toks, info = speculative_generate(state.params, cfg, p, 20)
produced = toks.shape[1] - p.shape[1]
print(f"{produced} tokens from {info['main_forwards']} main forwards (prefill included) and "
      f"{info['accepted']} accepted of {info['drafted']} drafts")
assert info["drafted"] == info["main_forwards"] - 1            # every forward after the prefill checks a draft
# each forward yields one token, each accepted draft one more; the last pair may overshoot by one
assert info["main_forwards"] + info["accepted"] - produced in (0, 1)

# %% [markdown]
# 4. **Turning MTP off.** With {eq}`eq-v3-loss`, the MTP term is a separate summand. Evaluate the
#    training loss of the trained model on a batch with `mtp_lambda=0.3` and with `mtp_lambda=0`
#    and check that the difference is exactly the MTP loss that `loss_forward` reports.

# %% tags=["hide-cell"]
# Exercise 4
rows = [(x.prompt, x.prompt + reference_completion(task, x))
        for x in make_dataset(task, 200, np.random.default_rng(3))]
length = max(set(len(t) for _, t in rows), key=[len(t) for _, t in rows].count)  # commonest length: no padding
chosen = [(p, t) for p, t in rows if len(t) == length][:4]
batch = np.stack([TOKENIZER.encode(t, add_bos=True) for _, t in chosen])
labels = batch.copy()
for i, (p, _) in enumerate(chosen):                   # score the completions only, as training does
    labels[i, :len(TOKENIZER.encode(p, add_bos=True))] = -100
with_mtp, _, info_mtp = loss_forward(batch, state.params, cfg, labels, mtp_lambda=0.3)
without, _, _ = loss_forward(batch, state.params, cfg, labels, mtp_lambda=0.0)
print(f"loss on 4 completions (prompts not scored, as in training): {float(with_mtp):.5f} with the MTP term, "
      f"{float(without):.5f} without it; their difference {float(with_mtp) - float(without):.5f} is the "
      f"reported MTP term {float(info_mtp['mtp_loss']):.5f}")
np.testing.assert_allclose(float(with_mtp) - float(without), float(info_mtp["mtp_loss"]), rtol=1e-5)  # float32 sums
