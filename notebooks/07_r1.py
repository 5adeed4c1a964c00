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
# # The R1 recipe
#
# R1-Zero ({doc}`06_grpo`) showed that reinforcement learning with rule-based rewards alone can
# teach a pretrained model to reason. It also had problems that made it a poor assistant: its
# reasoning was hard to read, and it mixed languages within one answer (DeepSeek-R1 §2.2.4,
# {cite}`deepseekai2025r1`). DeepSeek-R1 keeps GRPO and the rule-based rewards, and wraps them in
# a pipeline of four stages that starts with a small supervised *cold start*.
#
# This chapter:
#
# 1. walks through the four stages as the R1 paper describes them;
# 2. shows the language-consistency reward that R1 added against language mixing;
# 3. runs the pipeline in miniature on the tiny DeepSeek-V3 policy of {doc}`05_tiny_v3`, and
#    compares it with R1-Zero on the same reinforcement-learning budget;
# 4. lists what carries over from the miniature to the real thing, and what does not.
#
# Everything below calls `refimpl.rl` and `refimpl.recipes.r1`; code shown is the library's real
# source.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * lay out the four stages of R1 and the problem each one solves;
# * write the language-consistency reward and rejection sampling;
# * run the whole recipe at toy scale and compare it with R1-Zero;
# * say which conclusions carry over from a toy to the real model, and which do not.
# ```

# %%
import os

# The arrays here are small: BLAS threads only add synchronisation cost (set before NumPy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from refimpl.display import show_source, table  # noqa: E402
from refimpl.recipes.r1 import TASK, r1_run, r1_zero_run, steps_to_accuracy  # noqa: E402
from refimpl.rl import (  # noqa: E402
    accuracy_reward,
    combine_rewards,
    evaluate,
    format_reward,
    group_advantages,
    language_consistency_reward,
    rejection_sample,
)
from refimpl.tasks import AdditionTask, Example, reference_completion  # noqa: E402

t_start = time.perf_counter()


# %% tags=["remove-cell"]
# A diagram drawn by refimpl.diagrams from the config it shows; glued into the figure below.
from myst_nb import glue

from refimpl.diagrams import r1_pipeline_diagram

glue("diagram-r1-pipeline", r1_pipeline_diagram(), display=False)
plt.close("all")

# %% [markdown]
# ## 1. Four stages
#
# ```{glue:figure} diagram-r1-pipeline
# ---
# alt: >-
#   The DeepSeek-R1 pipeline: R1-Zero is V3-Base trained with GRPO alone; R1 goes through a
#   cold-start SFT, reasoning RL, rejection sampling with a second SFT, and RL for all prompts; the
#   rejection-sampled data also trains the distilled dense students.
# name: diagram-r1-pipeline
# ---
# R1-Zero, the four stages of R1, and distillation, as the R1 paper describes them (drawn by
# `refimpl.diagrams.r1_pipeline_diagram`).
# ```
#
# R1's pipeline (DeepSeek-R1 §2.3) answers two questions the R1-Zero run left open: can a little
# high-quality data, given before RL, make reasoning better or RL converge faster? And how do we
# get a model whose chains of thought are clear and which is also good at everything else?
#
# 1. **Cold start** (§2.3.1). A few thousand long chain-of-thought examples, collected by
#    prompting with long worked examples, by asking models for detailed answers with reflection
#    and verification, and from R1-Zero outputs rewritten in a readable form and refined by human
#    annotators. Every example follows one readable pattern: the reasoning, then a summary of it.
#    DeepSeek-V3-Base is fine-tuned on them before any RL. Compared with R1-Zero this fixes the
#    output format from the start, and the paper reports better results from it.
# 2. **Reasoning-oriented RL** (§2.3.2). The same large-scale GRPO as R1-Zero, on math, code,
#    science and logic problems with verifiable answers. To stop language mixing, a
#    **language-consistency reward**, the proportion of target-language words in the chain of
#    thought, is added to the accuracy reward. The paper's ablation finds that it costs a little
#    accuracy but makes the output more readable.
# 3. **Rejection sampling and SFT** (§2.3.3). When that RL run converges, its checkpoint is sampled
#    many times per prompt, and only correct answers are kept (some judged by DeepSeek-V3 as a
#    generative reward model), with mixed-language, long-paragraph and code-block outputs
#    filtered out: about 600k reasoning samples. About 200k non-reasoning samples (writing,
#    factual QA, self-cognition, translation) come from DeepSeek-V3's SFT pipeline. The *base*
#    model, DeepSeek-V3-Base, not the RL checkpoint, is then fine-tuned on these ~800k samples for
#    two epochs.
# 4. **RL for all scenarios** (§2.3.4). A second RL stage on that model: rule-based rewards for
#    reasoning prompts as before, and reward models of human preference for general prompts
#    (helpfulness judged on the final summary only, harmlessness on the whole response).
#
# Stage 3 is where the knowledge moves: the RL checkpoint is used only as a *data generator*, and
# rejection sampling turns its best behaviour into a plain supervised dataset. The same ~800k
# samples are what the distilled models are fine-tuned on ({doc}`08_distill`).
#
# ## 2. The language-consistency reward
#
# R1 rewards the fraction of the chain of thought written in the target language. refimpl's hook,
# `language_consistency_reward`, measures the text inside `<think>` against an allowed alphabet,
# by characters or by words. In the toy tasks the "target language" is arithmetic: digits and
# the signs `+ = ,`. A completion whose reasoning drifts into words scores lower, whether or not
# its answer is right; the total reward is the sum of the rule-based rewards.

# %% tags=["hide-input"]
task = AdditionTask(min_digits=1, max_digits=3)
ex = Example("58+67=", task.solve("58+67="))
samples = [
    reference_completion(task, ex),                                      # pure arithmetic
    "<think>8+7=15,5+6+1=12</think><answer>125</answer>",                # same, written out
    "<think>8+7=15 carry one,5+6+1=12</think><answer>125</answer>",      # words mixed in
    "<think>eight plus seven is fifteen</think><answer>125</answer>",    # all words
    "<think>8+7=15 carry one,5+6=11</think><answer>115</answer>",        # mixed and wrong
]
alphabet = "0123456789+=,"
acc = accuracy_reward(samples, [ex.answer] * len(samples), check=task.check)
fmt = format_reward(samples)
lang_w = language_consistency_reward(samples, alphabet=alphabet, unit="word")
lang_c = language_consistency_reward(samples, alphabet=alphabet, unit="char")
total = combine_rewards(np.stack([acc, fmt, lang_w], axis=1))
table(["completion", "accuracy", "format", "language (words)", "language (chars)", "total"],
      [(f"`{s}`", a, f, f"{w:.2f}", f"{c:.2f}", f"{t:.2f}")
       for s, a, f, w, c, t in zip(samples, acc, fmt, lang_w, lang_c, total, strict=True)])
assert lang_w[0] == lang_w[1] == 1 and lang_w[3] == 0 and 0 < lang_w[2] < 1
assert total[0] > total[2] > total[4] and total[2] > total[3]
adv, _ = group_advantages(total, len(samples))
print("advantages inside this group:", adv.round(3))
assert adv[0] > 0 and adv[3] < 0 and adv[4] < 0 and np.isclose(adv[2], 0.0)

# %% [markdown]
# The mixed completion with the right answer lands exactly on the group's mean: the language
# reward has taken back what the accuracy reward gave it. R1's ablation found a similar trade:
# slightly lower accuracy, more readable reasoning.
#
# ## 3. The recipe in miniature
#
# `refimpl.recipes.r1.r1_run` runs three of the four stages on the same tiny policy and the same
# pretrained base as the R1-Zero run of {doc}`06_grpo` (the careless writers' corpus: carries
# dropped two times in three, a share of broken formats):
#
# 1. **cold start**: supervised fine-tuning of the base on 300 reference traces of training
#    problems, every carry written, in the R1 format;
# 2. **reasoning RL**: GRPO with the R1-Zero settings (rewards, loss, batch, learning rate), for
#    fewer steps;
# 3. **rejection sampling + SFT**: 4 samples for each of 256 fresh problems from the RL
#    checkpoint, the right and well-formatted ones kept (distinct completions only), and a short
#    SFT on them.
#
# Two deviations from the paper, both to stay small: stage 3 continues from the RL checkpoint
# instead of retraining the base model, and there is no stage 4 (there are no general prompts and
# no preference reward models here). Both runs are loaded from `notebooks/_cache` when
# {doc}`06_grpo` has already computed them.

# %%
t0 = time.perf_counter()
r1 = r1_run(cache_dir="_cache", progress=False)
zero = r1_zero_run(cache_dir="_cache", progress=False)
print(f"both runs ready in {time.perf_counter() - t0:.0f} s "
      f"({'cached' if r1['cached'] else 'computed'} R1, {'cached' if zero['cached'] else 'computed'} R1-Zero)")
st = r1["stages"]
rows = [("base model", "", f"{r1['eval_before']['accuracy']:.1%}", f"{r1['eval_before']['format']:.1%}",
         f"{r1['eval_before']['mean_length']:.1f}", "")]
for name, label in (("cold_start", "1. cold-start SFT"), ("rl", "2. reasoning RL (GRPO)"),
                    ("rejection_sft", "3. rejection sampling + SFT")):
    e = st[name]["eval"]
    size = {"cold_start": f"{st[name].get('n_examples', '')} traces",
            "rl": f"{len(st['rl']['history'])} steps",
            "rejection_sft": f"{st[name].get('n_examples', '')} kept of {st[name].get('n_sampled', '')}"}[name]
    rows.append((label, size, f"{e['accuracy']:.1%}", f"{e['format']:.1%}", f"{e['mean_length']:.1f}",
                 f"{st[name]['seconds']:.0f}"))
ez = zero["eval_after"]
rows.append(("R1-Zero (GRPO from the base)", f"{len(zero['history'])} steps", f"{ez['accuracy']:.1%}",
             f"{ez['format']:.1%}", f"{ez['mean_length']:.1f}", f"{zero['seconds']['rl']:.0f}"))
table(["stage", "data / steps", "held-out accuracy", "format", "mean length", "seconds"], rows)
assert st["cold_start"]["eval"]["accuracy"] > r1["eval_before"]["accuracy"] + 0.2
assert st["cold_start"]["eval"]["format"] >= 0.95 and len(r1["history"]) < len(zero["history"])
# same GRPO settings
assert r1["grpo_config"].replace(steps=zero["grpo_config"].steps) == zero["grpo_config"]

# %% [markdown]
# A few hundred reference traces are enough to change the base model's habit: after the cold
# start it writes the carries and the format, before any RL step. That is the point of the
# cold start, compressed: R1's thousands of readable examples gave its RL stage a start that was
# already readable and already better.
#
# **RL steps to a given accuracy.** Both GRPO runs evaluate the same 128 held-out problems every
# few steps. On one figure, with the step axis counting RL steps only, and in a table of the first
# evaluated step at which each run reached a threshold (`refimpl.recipes.r1.steps_to_accuracy`):

# %% [markdown]
# **The verdict first** (asserted below the plot): with the same GRPO settings and the same RL
# budget, R1 and R1-Zero end within 5 points of each other here; what the cold start buys is a
# policy that starts RL well formatted and far above the base model.

# %% tags=["hide-input"]
def eval_curve(res):
    return np.array([e["step"] for e in res["evals"]]), np.array([e["accuracy"] for e in res["evals"]])


fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for res, name in ((zero, "R1-Zero: base → GRPO"), (r1, "R1: base → cold start → GRPO")):
    s, a = eval_curve(res)
    ax[0].plot(s, a, marker="o", label=name)
    ax[1].plot([m["step"] for m in res["history"]], [m["reward"] for m in res["history"]], label=name)
ax[0].axhline(r1["eval_after"]["accuracy"], color="grey", ls=":", label="R1 after rejection-sampling SFT")
ax[0].set_ylim(0, 1.02), ax[0].set_title("held-out accuracy (greedy)"), ax[0].legend(fontsize=8)
ax[0].set_ylabel("fraction of problems answered exactly")
ax[1].set_title("reward of the training samples (τ = 1)"), ax[1].legend(fontsize=8)
ax[1].set_ylim(0, None), ax[1].set_ylabel("mean reward per sample")
for a in ax:
    a.set_xlabel("GRPO step")
plt.tight_layout()
plt.show()
targets = (0.6, 0.8, 0.9, 0.95)
table(["held-out accuracy ≥", "R1-Zero: RL steps", "R1: RL steps"],
      [(f"{t:.0%}", steps_to_accuracy(zero, t), steps_to_accuracy(r1, t)) for t in targets])
for t in targets:
    z_, r_ = steps_to_accuracy(zero, t), steps_to_accuracy(r1, t)
    assert z_ is None or (r_ is not None and r_ <= z_)        # R1 reaches what R1-Zero reaches, no later
k = int(eval_curve(r1)[0][-1])                                  # R1's RL budget
acc_at = {name: dict(zip(*eval_curve(res), strict=True))[k] for name, res in (("R1-Zero", zero), ("R1", r1))}
print(f"after {k} RL steps: R1-Zero {acc_at['R1-Zero']:.1%}, R1 {acc_at['R1']:.1%}; "
      f"R1 after its rejection-sampling SFT {r1['eval_after']['accuracy']:.1%}")
assert r1["eval_after"]["accuracy"] >= zero["eval_after"]["accuracy"] - 0.02
assert abs(acc_at["R1"] - acc_at["R1-Zero"]) <= 0.05            # same RL budget, similar end point
assert r1["eval_after"]["accuracy"] >= st["rl"]["eval"]["accuracy"]   # rejection-sampling SFT: no loss

# %% [markdown]
# The cold start is a head start: R1's RL stage begins where R1-Zero arrives only after several
# steps, and reaches each accuracy threshold in fewer RL steps (in none at all for the lower
# ones). With the same number of RL steps both runs end close to each other, because this task is
# easy once the carry is written; the cold start buys time, not a better end point. Rejection
# sampling and the final SFT then sharpen the RL policy a little further, at the cost of one more
# supervised stage. In R1 the cold start also made the outputs readable, which rule-based rewards
# alone never asked for.

# %% [markdown]
# **Rejection sampling.** The RL checkpoint is now only a data generator. `rejection_sample`
# samples it on fresh training problems and keeps the distinct completions that are right *and*
# well formatted:

# %%
show_source(rejection_sample, checks=False)

# %% [markdown]
# What fraction of its samples does it accept? We sample the RL checkpoint four times at
# $\tau = 1$ on 64 held-out problems:

# %%
rl_params, config = r1["stage_params"]["rl"], r1["config"]
draws = [evaluate(rl_params, config, TASK, n=64, temperature=1.0, seed=s)["samples"] for s in range(4)]
ok = np.array([[d["correct"] and d["formatted"] for d in draw] for draw in draws])   # (4, 64)
per_sample, per_problem = ok.mean(), ok.any(axis=0).mean()
rs = st["rejection_sft"]
print(f"accepted: {per_sample:.1%} of samples; {per_problem:.1%} of problems have at least one of "
      "4 accepted")
print(f"the recipe's run: {rs['n_examples']} distinct accepted completions from {rs['n_sampled']} "
      "samples "
      f"(256 problems × 4)")
print("accepted examples:", *[f"{p}{c}" for p, c in rs["examples"][:3]], sep="\n   ")
assert per_sample > 0.5 and per_problem >= per_sample
# about one distinct trace per problem
assert 0 < rs["n_examples"] < 1.5 * rs["n_sampled"] / 4

# %% [markdown]
# Most problems yield an accepted completion, but few yield more than one *distinct* one: the
# right trace of an addition is unique, so the four right samples of a problem collapse to one
# training example. R1's reasoning data is different in kind (many correct chains of thought per
# problem, filtered further for readability), but the principle is the same: rejection sampling
# turns the RL policy's successes into a plain supervised dataset that can be trained into any
# model, the base model in R1 and smaller models in distillation.
#
# ## 4. What carries over, and what does not
#
# **Carries over.** The mechanics are the real ones: group-relative advantages, the clipped
# token-level loss with its exact normalisers, rule-based accuracy and format rewards, a cold
# start that fixes the format and the habit of writing the useful steps before RL begins, and
# rejection sampling as the bridge from RL back to supervised data. The qualitative results match
# the paper's: RL alone lifts a base model that only sometimes reasons well, and a small cold
# start gets to the same accuracy in fewer RL steps.
#
# **Does not carry over.** The miniature's "reasoning" is a fixed algorithm that the base model
# already knows and applies carelessly; RL here *selects* a behaviour present in the pretraining
# data. The same holds for its "aha moment": {doc}`06_grpo` §8 shows a tiny model whose base
# checks its answer in a few percent of its documents learn, under accuracy and format rewards
# alone, to check almost always and to fix wrong first answers. What a tiny model cannot show is
# the rest of R1-Zero's story: reflection that was (as far as one can tell) never written that
# way in the pretraining data, new strategies, and chains of thought that grow to thousands of
# tokens over thousands of RL steps (R1 §2.2.4). Readability and language mixing are simulated
# by a corrupted corpus rather than arising from RL. Stage 4 of §6 below keeps only the
# rule-based reasoning rewards: R1's preference reward models for helpfulness and harmlessness,
# and its ~200k non-reasoning SFT samples, have no counterpart here, and the sizes differ by many
# orders of magnitude: thousands of cold-start examples and ~800k SFT samples in R1, against
# 300 and a few hundred here.

# %% [markdown]
# ## 5. Language consistency in training
#
# Section 2 scored hand-written strings. The recipe `refimpl.recipes.language` puts the reward into
# training. Its miniature "languages" are two scripts for the same numbers: digits, and letters
# (`a` = 0, `b` = 1, …, `j` = 9). The base model is pretrained on the careless writers' traces of
# {doc}`06_grpo`, except that at each boundary between two columns the writer switches, for the
# rest of the trace, to letters with probability 0.6, as R1-Zero drifted between languages:
# `47+85=<think>7+5=12,e+i=bc</think><answer>122</answer>`. The answer stays in digits. From
# this base the recipe runs the R1-Zero GRPO twice: with the accuracy and format rewards only, and
# with R1's language-consistency reward added (weight 1; the share of the `<think>` characters
# that are digits or `+ = ,`; characters, since these traces have no spaces to split words at).
# A completion counts as consistent when its whole trace is in digits.

# %%
from refimpl.recipes.language import language_seeds_run  # noqa: E402

t0 = time.perf_counter()
lang = language_seeds_run(cache_dir="_cache", progress=False)     # 2 RL seeds from one pretrained base
print(f"{'loaded from the cache' if lang['cached'] else 'trained'} in {time.perf_counter() - t0:.0f} s "
      f"({lang['seconds']:.0f} s when computed)")
lang0 = lang["per_seed"][0]
print("corpus:", *lang0["corpus_examples"][:4], sep="\n    ")
runs = {"before": "pretrained base", "zero": "R1-Zero (accuracy + format)", "lc": "+ language consistency"}


def mse(key):
    return f"{lang[key]:.1%} ± {lang[key + '_se']:.1%}"


table(["model", "consistent (greedy)", "consistent (sampled)", "accuracy (greedy)"],
      [(label, mse(f"consistency_{k}"), mse(f"sampled_consistency_{k}"), mse(f"accuracy_{k}"))
       for k, label in runs.items()])
for run in ("zero", "lc"):
    print(f"{runs[run]}:", *(f"{p}{c}" for p, c, _ in lang0[run]["sampled_samples"][:2]))
print(f"accuracy cost of the language reward (greedy, paired over {lang['seeds']} seeds): "
      f"{lang['accuracy_cost']:+.1%} ± {lang['accuracy_cost_se']:.1%}")
assert lang["consistency_before"] < 0.5 and lang["consistency_lc"] >= 0.95
assert lang["sampled_consistency_lc"] > lang["sampled_consistency_zero"] + 0.3
assert lang["sampled_consistency_zero"] <= lang["sampled_consistency_before"] + 0.1   # mixing stays
assert all(r["accuracy_cost"] > 0 for r in lang["per_seed"]) and lang["accuracy_cost"] <= 0.1   # small, not zero

# %% [markdown]
# Without the language reward, RL has no reason to prefer one script: both compute the same sums,
# so the mixing the base learned survives the accuracy reward (sampled traces even drift further
# from the digits), while the accuracy rises as in {doc}`06_grpo`. With it, the traces become
# consistent, greedy and (mostly) sampled, in every seed. The accuracy cost, measured as the
# paired per-seed difference between the two runs from the same base, is the miniature's
# counterpart of R1's "slight degradation": it is positive in both seeds, a few points, and of
# the order of its own standard error, so two seeds show that it is small but cannot pin it down.
# It is small because the letters are an equally good way to compute, so forcing one script
# costs little, while in R1 the languages differ in how well the model reasons in them.

# %% [markdown]
# ## 6. Four stages on a task where they matter
#
# On the addition task of §3, R1-Zero and R1 end at the same accuracy: once the carry is
# written, there is nothing left to learn, and the later stages cannot be told apart. The recipe
# `refimpl.recipes.r1_stages` (`python -m refimpl r1-stages`) repeats the comparison on a harder
# task, `MixedArithmeticTask`: additions of two to four digits and, half the time, a two- or
# three-digit number times one digit, both as column traces with the carries written
# (`347*6=<think>7*6=42,4*6+4=28,3*6+2=20</think><answer>2082</answer>`); in a product the carry
# can be anything from 0 to 8. The base is pretrained on careless, sometimes badly formatted
# traces that switch to the letter script mid-trace (as in §5, with probability 0.2 per column
# boundary); its writer keeps a carry in an addition a third of the time, as before, but in a
# product only one time in twenty, so that sampling the base almost never shows a product done
# right. From that one base, with the same total number of RL steps, the recipe runs
#
# * **R1-Zero**: GRPO with accuracy and format rewards, at the learning rate it uses in
#   {doc}`06_grpo` (3e-4);
# * **R1**: (1) cold start, SFT on 2000 reference traces of training problems for 100 steps (R1
#   used "thousands" of long, readable chains of thought); (2) GRPO with the language-consistency
#   reward added (weight 0.5; digits, `+`, `*`, `=`, `,` are the target script) for the first half
#   of the RL steps; (3) rejection sampling, 4 samples of 256 fresh problems, kept when right, well
#   formatted and entirely in digits, and a short SFT on them; (4) GRPO again for the second half.
#   R1's two RL stages use a third of R1-Zero's learning rate (1e-4): they start from a model that
#   is already right on most problems, and in exploratory runs at 3e-4 (recorded in the recipe's
#   docstring) both RL stages lost accuracy, in both backends.
#
# Every checkpoint is measured greedily on the same 256 held-out problems: accuracy (also apart
# on additions and on products), format rate, and *readability*, the share of completions well
# formatted with a chain of thought entirely in digits. Seeds change everything after the base
# (cold-start data, sampling, batches); the error bars are standard errors over seeds, and each
# stage's effect is the mean of its per-seed paired difference.

# %%
from refimpl.recipes.r1 import GRPO_DEFAULTS  # noqa: E402
from refimpl.recipes.r1_stages import CHECKPOINTS, r1_stages_run  # noqa: E402

t0 = time.perf_counter()
stages = r1_stages_run(cache_dir="_cache", progress=False, seeds=3)
budget = stages["per_seed"][0]["budget"]
assert (budget["cold_start_examples"], budget["cold_start_steps"], budget["rl_lr"], budget["language_weight"],
        budget["rs_prompts"], budget["rs_generations"], stages["eval_n"]) == (2000, 100, 1e-4, 0.5, 256, 4, 256)
assert GRPO_DEFAULTS["lr"] == 3e-4                                       # R1-Zero's learning rate
print(f"{'loaded from the cache' if stages['cached'] else 'trained'} in {time.perf_counter() - t0:.0f} s "
      f"({stages['seconds']:.0f} s of compute when computed)")
labels = {"base": "pretrained base", "zero": f"R1-Zero ({stages['steps']} RL steps)",
          "cold_start": "R1 1. cold start", "rl1": f"R1 2. reasoning RL ({stages['steps_rl1']} steps)",
          "rejection_sft": "R1 3. rejection sampling + SFT",
          "rl2": f"R1 4. second RL ({stages['steps'] - stages['steps_rl1']} steps)"}


def pm(key):
    return f"{stages[key]:.1%} ± {stages[key + '_se']:.1%}"


table(["checkpoint", "accuracy", "additions", "products", "format", "readability"],
      [(labels[c], *(pm(f"{m}_{c}") for m in ("accuracy", "accuracy_add", "accuracy_mul", "format", "readability")))
       for c in CHECKPOINTS])
gains = {"cold_start": "cold start − base", "rl1": "reasoning RL − cold start",
         "rejection_sft": "rejection SFT − reasoning RL", "rl2": "second RL − rejection SFT"}
table(["stage effect on accuracy (paired, per seed)", "mean ± SE", "per seed"],
      [(label, f"{stages['gain_' + g]:+.1%} ± {stages['gain_' + g + '_se']:.1%}",
        ", ".join(f"{r['measures'][g]['accuracy'] - r['measures'][prev]['accuracy']:+.1%}"
                  for r in stages["per_seed"]))
       for (g, label), prev in zip(gains.items(), ("base", "cold_start", "rl1", "rejection_sft"), strict=True)]
      + [("R1 (after stage 4) − R1-Zero", f"{stages['r1_minus_zero']:+.1%} ± {stages['r1_minus_zero_se']:.1%}",
          ", ".join(f"{r['measures']['rl2']['accuracy'] - r['measures']['zero']['accuracy']:+.1%}"
                    for r in stages["per_seed"]))])
for c in ("base", "zero", "rl2"):
    print(f"{labels[c]}:", *(f"{p}{t} {'✓' if ok else '✗'}" for p, t, ok in stages["per_seed"][0]["measures"][c]
                             ["examples"][:3]), sep="\n    ")
print(f"rejection sampling kept {stages['per_seed'][0]['n_rejection_kept']} of "
      f"{stages['per_seed'][0]['n_rejection_sampled']} right, well-formatted samples (seed 0)")
r1_minus_zero = [r["measures"]["rl2"]["accuracy"] - r["measures"]["zero"]["accuracy"] for r in stages["per_seed"]]
assert stages["accuracy_base"] < 0.3 and stages["gain_cold_start"] - 2 * stages["gain_cold_start_se"] > 0.3
assert min(r1_minus_zero) >= 0.05                                        # R1 ≥ R1-Zero + 5 points, every seed
assert stages["accuracy_mul_zero"] < 0.3                                 # RL alone does not find the products
assert all(r["measures"]["cold_start"]["accuracy_mul"] > r["measures"]["zero"]["accuracy_mul"] + 0.1
           for r in stages["per_seed"])                                  # the cold start teaches them
assert all(abs(stages[f"gain_{g}"]) < 0.06 for g in ("rl1", "rejection_sft", "rl2"))   # the later stages: a few points
assert stages["readability_zero"] <= stages["readability_rl2"] - 0.05
assert all(stages[f"readability_{c}"] >= 0.95 and stages[f"format_{c}"] >= 0.95 for c in CHECKPOINTS[2:])

# %% tags=["hide-input"]
fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
x = np.arange(len(CHECKPOINTS))
for a, (m, title) in zip(ax, (("accuracy", "held-out accuracy (greedy)"),
                              ("readability", "readable: formatted, CoT all in digits")), strict=True):
    means = [stages[f"{m}_{c}"] for c in CHECKPOINTS]
    ses = [stages[f"{m}_{c}_se"] for c in CHECKPOINTS]
    a.bar(x, means, yerr=ses, capsize=4, color=["0.6", "tab:orange"] + ["tab:blue"] * 4)
    for r in stages["per_seed"]:
        a.plot(x, [r["measures"][c][m] for c in CHECKPOINTS], "k.", ms=4)
    a.set_xticks(x, ["base", "R1-Zero", "1. cold\nstart", "2. RL", "3. RS +\nSFT", "4. RL"])
    a.set_ylim(0, 1.02), a.set_title(title)
ax[0].set_ylabel(f"fraction of {stages['eval_n']} problems (mean ± SE, dots: seeds)")
plt.tight_layout()
plt.show()

# %% tags=["remove-input"]
def verdict(mean, se):
    """'+3.1 ± 0.8 points, beyond its error bar' or '..., within twice its error bar'."""
    beyond = abs(mean) > 2 * se
    return f"{100 * mean:+.1f} ± {100 * se:.1f} points, {'beyond' if beyond else 'within'} twice its error bar", beyond


cold, _ = verdict(stages["gain_cold_start"], stages["gain_cold_start_se"])
rl1, rl1_beyond = verdict(stages["gain_rl1"], stages["gain_rl1_se"])
rs, rs_beyond = verdict(stages["gain_rejection_sft"], stages["gain_rejection_sft_se"])
rl2, rl2_beyond = verdict(stages["gain_rl2"], stages["gain_rl2_se"])
vs_zero, vs_zero_beyond = verdict(stages["r1_minus_zero"], stages["r1_minus_zero_se"])
ahead = ("R1 ends ahead of R1-Zero" if stages["r1_minus_zero"] > 0 else "R1 ends behind R1-Zero") \
    if vs_zero_beyond else "R1 and R1-Zero end level"
later = {"the reasoning RL": ("rl1", rl1_beyond), "rejection sampling with SFT": ("rejection_sft", rs_beyond),
         "the second RL": ("rl2", rl2_beyond)}
paid = [name for name, (g, beyond) in later.items() if beyond and stages[f"gain_{g}"] > 0]
hurt = " and ".join(name for name, (g, beyond) in later.items() if beyond and stages[f"gain_{g}"] < 0)
n_samples = budget["rs_prompts"] * budget["rs_generations"]
accept = np.mean([r["n_rejection_sampled"] / n_samples for r in stages["per_seed"]])
display(Markdown(
    f"**What paid, and what did not.** The cold start pays ({cold}): {budget['cold_start_examples']} readable "
    f"traces take the base from {stages['accuracy_base']:.0%} of the problems to "
    f"{stages['accuracy_cold_start']:.0%}, the products from {stages['accuracy_mul_base']:.0%} to "
    f"{stages['accuracy_mul_cold_start']:.0%}, and make every trace readable "
    f"({stages['readability_cold_start']:.0%}), which RL alone does not: R1-Zero's traces stay at "
    f"{stages['readability_zero']:.0%} readable, since nothing in its rewards prefers digits (the miniature of "
    f"R1-Zero's language mixing), and its products at {stages['accuracy_mul_zero']:.0%}. The reasoning RL stage: "
    f"{rl1}; rejection sampling with SFT: {rs}; the second RL stage: {rl2}. "
    + (f"Of the later stages, {' and '.join(paid)} paid beyond twice the error bar. " if paid else
       "None of the three later stages paid beyond twice its error bar. ")
    + (f"{hurt[:1].upper() + hurt[1:]} lost accuracy by more than twice its error bar. " if hurt else "")
    + f"With the same number of RL steps, {ahead} ({vs_zero}; per seed "
    f"{', '.join(f'{100 * d:+.1f}' for d in r1_minus_zero)}): R1 is "
    f"{'at least' if min(r1_minus_zero) >= 0.05 else 'not'} five points above R1-Zero in every seed."))

# %% [markdown]
# Why the later stages have little to add here, and what R1's have that these lack. The
# reasoning the task needs is arithmetic knowledge, a table of products plus carries, and only the
# cold start brings it in: R1-Zero's base almost never wrote a product's carry, so RL from it
# rarely samples one done right and its products stay near the base's. Once the cold start has
# taught the table, the greedy policy is right on most problems, but its *samples* (temperature
# 1, the way GRPO and rejection sampling draw them) are right far less often.

# %% tags=["remove-input"]
display(Markdown(
    f"Rejection sampling from the reasoning-RL checkpoint accepted {accept:.0%} of its samples (mean over seeds) "
    f"while its greedy answers were right on {stages['accuracy_rl1']:.0%} of the problems. So most of what the two "
    "RL stages reward or punish is what greedy decoding never does, and rejection sampling feeds back answers the "
    "greedy policy already gives: the three stages move the greedy accuracy by a few points either way, mostly "
    "noise. In R1 the later stages bring in what this miniature lacks: rejection sampling builds ~800k samples "
    "across many domains, non-reasoning ones included, and trains them into the base model afresh, and the second "
    "RL stage adds new objectives (helpfulness and harmlessness). A single-task miniature that continues from its "
    "own checkpoint has neither, so its stages 2 to 4 have little new to teach once the cold start has taught the "
    "table."))
assert accept < stages["accuracy_rl1"] - 0.2

# %% [markdown]
# ## Summary
#
# What this chapter measured (the numbers are computed by the cells above when the page is built):

# %% tags=["hide-input"]
summary = [
    f"* The cold start alone took held-out accuracy from {r1['eval_before']['accuracy']:.1%} to "
    f"{st['cold_start']['eval']['accuracy']:.1%}, with {st['cold_start']['eval']['format']:.1%} of answers "
    "well formatted.",
    f"* After the same {k} RL steps, R1-Zero reached {acc_at['R1-Zero']:.1%} and R1 {acc_at['R1']:.1%}; at the "
    f"end R1 stood at {r1['eval_after']['accuracy']:.1%} and R1-Zero at {zero['eval_after']['accuracy']:.1%}.",
    f"* Rejection sampling accepted {per_sample:.1%} of the RL model's samples; {per_problem:.1%} of problems had "
    "at least one accepted answer in 4 samples.",
    f"* With the language-consistency reward, {lang['consistency_lc']:.1%} of greedy traces were in one script "
    f"(R1-Zero: {lang['consistency_zero']:.1%}), at an accuracy cost of {lang['accuracy_cost']:+.1%} ± "
    f"{lang['accuracy_cost_se']:.1%} over {lang['seeds']} seeds.",
    f"* On the mixed task, R1 after its four stages reached {stages['accuracy_rl2']:.1%} ± "
    f"{stages['accuracy_rl2_se']:.1%} against R1-Zero's {stages['accuracy_zero']:.1%} ± "
    f"{stages['accuracy_zero_se']:.1%} with the same {stages['steps']} RL steps; the cold start alone added "
    f"{stages['gain_cold_start']:+.1%} ± {stages['gain_cold_start_se']:.1%} to the base.",
]
display(Markdown("\n".join(summary)))
assert st["cold_start"]["eval"]["accuracy"] > r1["eval_before"]["accuracy"] and per_problem >= per_sample

# %% [markdown]
# ## Exercises
#
# 1. After the cold start, every completion is well formatted. Show that the format reward then
#    changes no advantage: for a group whose completions all have format 1 and accuracies
#    $[1, 0, 1, 1]$, the advantages of the R1 reward (accuracy + 0.5 format) equal those of
#    accuracy alone. When is that no longer true?

# %% tags=["hide-cell"]
acc = np.array([1.0, 0.0, 1.0, 1.0])
a_total, _ = group_advantages(combine_rewards(np.stack([acc, np.ones(4)], axis=1), [1.0, 0.5]), 4)
a_acc, _ = group_advantages(acc, 4)
assert np.allclose(a_total, a_acc)                              # a constant shift cancels in r - mean
fmt = np.array([1.0, 1.0, 0.0, 1.0])                            # one broken format in the group
a_mixed, _ = group_advantages(combine_rewards(np.stack([acc, fmt], axis=1), [1.0, 0.5]), 4)
assert not np.allclose(a_mixed, a_acc)                          # it matters once the format varies
print(a_acc.round(3), a_mixed.round(3))

# %% [markdown]
# 2. Suppose each sample of a policy is accepted independently with probability $p$. What
#    fraction of problems yields at least one accepted sample out of $G = 4$? Compare the
#    prediction, with $p$ the measured per-sample acceptance rate above, with the measured
#    fraction, and explain why the prediction is an upper bound when problems differ in
#    difficulty.

# %% tags=["hide-cell"]
G = 4
predicted = 1 - (1 - per_sample) ** G
# 1 - (1 - p)^G is concave in p, so averaging it over problems of different p (the measurement)
# gives at most its value at the average p (Jensen's inequality): problems are not alike, and
# the hard ones fail all their samples together
print(f"independent samples: {predicted:.2%} of problems; measured: {per_problem:.2%}")
assert per_problem <= predicted + 0.05                         # up to sampling noise on 64 problems

# %% [markdown]
# 3. Compute by hand the word-level language-consistency reward of
#    `<think>7+5=12 carry 1,4+8+1=13 so</think><answer>132</answer>` with the arithmetic alphabet
#    `0123456789+=,`, then check it with `language_consistency_reward`.

# %% tags=["hide-cell"]
text = "<think>7+5=12 carry 1,4+8+1=13 so</think><answer>132</answer>"
words = ["7+5=12", "carry", "1,4+8+1=13", "so"]                 # the words inside <think>
by_hand = sum(all(ch in alphabet for ch in w) for w in words) / len(words)
got = language_consistency_reward([text], alphabet=alphabet, unit="word")[0]
assert by_hand == got == 0.5
print(f"{got:.2f}")

# %%
print(f"chapter executed in {time.perf_counter() - t_start:.0f} s")
