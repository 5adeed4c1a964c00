r"""DeepSeek-R1-Zero and DeepSeek-R1 in miniature: a noisy pretrained base, then GRPO (and SFT stages).

The chapters "GRPO and R1-Zero" and "The R1 recipe" run these functions with small budgets; the
command line (``python -m refimpl r1-zero``, ``python -m refimpl r1``) runs them longer.

**Policy.** The tiny DeepSeek-V3 of :mod:`refimpl.recipes.tiny_v3` (MLA, one dense and one MoE
layer with 8 routed experts, ~106k parameters) without the MTP module (RL trains next-token
log-probs only), character tokenizer, float32.

**Task.** Addition of 2- and 3-digit numbers (:class:`~refimpl.tasks.AdditionTask`), whose
reference chain of thought writes one column sum per step, carries included:
``47+85=`` → ``<think>7+5=12,4+8+1=13</think><answer>132</answer>``.

**The pretrained base (why a noisy corpus).** R1-Zero starts from DeepSeek-V3-Base, a model that
has read worked solutions of every quality and can, when sampled, sometimes reason correctly; RL
then makes the good behaviour the usual one (R1 §2.2). The miniature reproduces that situation
with a language model pretrained (next-token loss on every token, prompts included, as a base
model reads documents) on a corpus of ``prompt + completion`` texts in which

* every carry is written (``+1``) with probability only ``p_carry`` = 0.35 — otherwise the
  writer is careless, drops it, and the following sums and the answer, computed consistently from
  what was written, are wrong. Since the careless habit is the majority at every carry, *greedy*
  decoding of the base drops every carry: it is right only on the ~35% of held-out problems
  without one, while a *sample* is right on a carry problem with probability ~0.35 per carry. So a
  group of G = 8 samples usually contains both right and wrong answers: the signal GRPO needs;
* a fraction ``p_broken_format`` = 0.3 of completions break the format in one of four ways (no
  reasoning, only ``<answer>…</answer>``; answer without tags after ``</think>``; missing
  ``</think>``; no tags at all, ``… so 132``), so about a quarter of samples earn no format reward.

RL then has to discover that writing the carry pays, and the completion length grows as it does
(two more tokens per carry) — the miniature of R1-Zero's lengthening chain of thought.

**R1.** Cold start: supervised fine-tuning of the same base on ``cold_start_examples`` (300)
reference traces of training prompts (R1 §2.3.1 used thousands of long, readable CoT samples),
then the same GRPO, then rejection sampling (§2.3.3): sample 4 completions for 256 fresh prompts,
keep the correct and well-formatted ones, and fine-tune on them. Deviation: R1 retrains
DeepSeek-V3-Base on the rejection-sampled data (and then runs a second RL stage); here the SFT
continues from the RL checkpoint, which keeps the miniature to the three stages of the issue.

**Measured** (seed 0, defaults, one thread; CPU seconds of a busy 2-core machine, about the wall
time of an idle one): the base answers 37.5% of the 128 held-out problems greedily (format 99%;
sampled at τ = 1: 48% right, 80% well formatted) after 2000 pretraining steps (~60 s). R1-Zero's
30 GRPO steps (~0.6 s each) raise the greedy accuracy to 88% at step 10 and 97.7% at step 30
(+60 points), the samples' format reward from 0.74 to 0.98, and the mean completion length from
24.4 to 26.2 tokens. Seed 1: 35.9% → 90.6% (96% at step 20). R1: the cold start alone (20 SFT
steps) gives 92%, GRPO 98.4% after 5 steps (R1-Zero needed 15 for its final 97.7%), and the
rejection-sampling SFT on 252 kept completions (of 1024 samples) 99.2%; its three stages add
~11 s. The learning rate matters: at 2e-3 Adam's first, sign-like steps wreck the base within ten
steps (accuracy → 0); 3e-4 is used.

**Caching.** With ``cache_dir``, each stage's result (parameters as ``.npz``, the rest as JSON) is
stored under a key hashing the arguments and the source of every refimpl module the run depends
on, and loaded instead of recomputed; so the R1 chapter reuses the base model of the R1-Zero
chapter and the distillation chapter reuses the R1 teacher (:func:`r1_teacher`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..config import ModelConfig
from ..model.transformer import init_params
from ..rl.trainer import GRPOConfig, evaluate, grpo_train, rejection_sample, sft_train
from ..tasks import AdditionTask, Example, format_completion, make_dataset, reference_completion
from . import _cache
from .tiny_v3 import tiny_v3_config

TASK = AdditionTask(min_digits=2, max_digits=3)

#: refimpl sources a run depends on (hashed into the cache keys): everything it executes, and
#: nothing else, so that editing e.g. the distillation losses does not invalidate a trained teacher.
SOURCES = ("core", "attention", "moe", "model", "rl", "tasks", "kernels/cross_entropy_nb.py", "kernels/moe_nb.py",
           "kernels/vecmath_nb.py", "kernels/stream_nb.py",       # the two kernels' own imports
           "optim.py", "tree.py", "config.py", "backend.py", "_validate.py", "recipes/tiny_v3.py", "recipes/r1.py")

#: the recipes' GRPO settings (:class:`~refimpl.rl.trainer.GRPOConfig` fields): DAPO loss and
#: clip-higher, no KL term, G = 8 samples for 16 prompts per step, lr measured on this policy.
GRPO_DEFAULTS = dict(num_generations=8, prompts_per_step=16, max_completion_length=48, temperature=1.0,
                     lr=3e-4, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0,
                     reward_weights=(1.0, 0.5), eval_n=128)


def r1_model_config(**changes) -> ModelConfig:
    """The policy: :func:`~refimpl.recipes.tiny_v3.tiny_v3_config` without the MTP module."""
    return tiny_v3_config(**{"num_nextn_predict_layers": 0, **changes})


# ----------------------------------------------------------------------------------------------
# The base model's corpus
# ----------------------------------------------------------------------------------------------

def careless_thought(prompt: str, rng, *, p_carry: float) -> tuple[str, str]:
    """Column-by-column addition trace in which each carry is written with probability ``p_carry``.

    Returns ``(thought, answer)`` where the answer is read off the written sums (the last sum in full,
    then the other sums' units digits), so a dropped carry gives a consistent but wrong answer.
    """
    a, b = TASK._parse(prompt)
    width = max(len(a), len(b))
    a, b = a.zfill(width)[::-1], b.zfill(width)[::-1]
    steps, sums, carry = [], [], 0
    for da, db in zip(a, b, strict=True):
        written = bool(carry) and rng.random() < p_carry
        s = int(da) + int(db) + written
        steps.append(f"{da}+{db}" + ("+1" if written else "") + f"={s}")
        sums.append(s)
        carry = s // 10
    answer = str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1]))
    return ",".join(steps), str(int(answer))


def noisy_completion(example: Example, rng, *, p_carry=0.35, p_broken_format=0.3) -> str:
    """One completion of the base model's pretraining corpus (see the module docstring).

    With probability ``1 - p_broken_format`` the R1 format ``<think>…</think><answer>…</answer>``,
    else one of four broken layouts, equally likely. The trace drops carries (:func:`careless_thought`).
    """
    thought, answer = careless_thought(example.prompt, rng, p_carry=p_carry)
    if rng.random() >= p_broken_format:
        return format_completion(thought, answer)
    kind = int(rng.integers(4))
    if kind == 0:
        return f"<answer>{example.answer}</answer>"          # no reasoning: the answer is memorised or guessed
    if kind == 1:
        return f"<think>{thought}</think>{answer}"            # answer without its tags
    if kind == 2:
        return f"<think>{thought}<answer>{answer}</answer>"   # </think> missing
    return f"{thought} so {answer}"                           # no tags at all


def base_corpus(n=4000, seed=0, *, p_carry=0.35, p_broken_format=0.3) -> list[str]:
    """``n`` distinct training prompts (never held-out ones), each followed by a noisy completion."""
    rng = np.random.default_rng(seed)
    return [e.prompt + noisy_completion(e, rng, p_carry=p_carry, p_broken_format=p_broken_format)
            for e in make_dataset(TASK, n, rng)]


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

def _key(name, args) -> str:
    """The cache key of a stage of these recipes (:func:`refimpl.recipes._cache.cache_key` over :data:`SOURCES`)."""
    return _cache.cache_key(name, args, SOURCES)


_save, _load, _plain = _cache.save, _cache.load, _cache.plain


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def pretrain_base(steps=2000, seed=0, *, batch_size=32, lr=3e-3, n_corpus=4000, p_carry=0.35, p_broken_format=0.3,
                  eval_n=128, progress=True, cache_dir=None):
    """Pretrain the base model (next-token loss on every token) on :func:`base_corpus`.

    Returns ``dict(config, params, history, eval, eval_sampled, samples, corpus_examples, seconds)``:
    ``eval`` is the greedy held-out evaluation (:func:`~refimpl.rl.trainer.evaluate`, without its
    samples, which are in ``samples``) on ``eval_n`` held-out prompts, ``eval_sampled`` the same
    at temperature 1, ``corpus_examples`` the first texts of the corpus.
    """
    config = r1_model_config()
    args = dict(steps=steps, seed=seed, batch_size=batch_size, lr=lr, n_corpus=n_corpus, p_carry=p_carry,
                p_broken_format=p_broken_format, eval_n=eval_n)
    key = _key("pretrain", args)
    if cache_dir is not None and (hit := _load(cache_dir, key, config, ["params"])) is not None:
        return {"config": config, "params": hit[0]["params"], **hit[1], "cached": True}
    t0 = time.perf_counter()
    corpus = base_corpus(n_corpus, seed, p_carry=p_carry, p_broken_format=p_broken_format)
    params = init_params(config, np.random.default_rng(seed), np.float32)
    out = sft_train(params, config, corpus, steps=steps, batch_size=batch_size, lr=lr,
                    warmup_steps=min(20, steps), seed=seed, progress=progress)
    ev = evaluate(out["params"], config, TASK, n=eval_n)
    evs = evaluate(out["params"], config, TASK, n=eval_n, temperature=1.0, seed=seed)
    meta = _plain({"history": out["history"], "eval": _strip(ev), "eval_sampled": _strip(evs),
                   "samples": ev["samples"], "corpus_examples": corpus[:12], "seconds": time.perf_counter() - t0})
    if cache_dir is not None:
        _save(cache_dir, key, {"params": out["params"]}, meta)
    return {"config": config, "params": out["params"], **meta, "cached": False}


def _strip(ev):
    return {k: v for k, v in ev.items() if k != "samples"}


def r1_zero_grpo_config(steps=30, seed=0, **overrides) -> GRPOConfig:
    """The recipes' :class:`~refimpl.rl.trainer.GRPOConfig`: :data:`GRPO_DEFAULTS` plus ``overrides``."""
    return GRPOConfig(**{**GRPO_DEFAULTS, "steps": steps, "seed": seed, **overrides})


def r1_zero_run(steps=30, seed=0, progress=True, cache_dir=None, *, base_steps=2000, eval_every=5, **overrides):
    """R1-Zero (DeepSeek-R1 §2.2): GRPO with rule-based rewards straight from the pretrained base.

    ``steps`` GRPO steps with :func:`r1_zero_grpo_config` (``overrides`` are GRPOConfig fields),
    greedy held-out evaluation every ``eval_every`` steps; ``base_steps`` pretraining steps
    (:func:`pretrain_base`, cached separately). Deterministic for ``seed``.

    Returns ``dict(config, grpo_config, base_params, params, history, evals, eval_before, eval_after,
    samples_before, samples_after, base, seconds, cached)``: ``history``/``evals`` from
    :func:`~refimpl.rl.trainer.grpo_train`, ``eval_before``/``eval_after`` greedy evaluations
    of the base and of the trained policy (their per-prompt samples in ``samples_*``), ``base`` the
    pretraining record (without parameters), ``seconds`` the wall time of pretraining and RL.
    """
    gc = r1_zero_grpo_config(steps, seed, **overrides)
    base = pretrain_base(base_steps, seed, eval_n=gc.eval_n, progress=progress, cache_dir=cache_dir)
    config = base["config"]
    key = _key("r1_zero", dict(base_steps=base_steps, eval_every=eval_every, gc=dataclasses.asdict(gc)))
    if cache_dir is not None and (hit := _load(cache_dir, key, config, ["params"])) is not None:
        meta = hit[1]
    else:
        t0 = time.perf_counter()
        run = grpo_train(base["params"], config, TASK, gc, progress=progress, eval_every=eval_every)
        ev = evaluate(run["params"], config, TASK, n=gc.eval_n, max_new_tokens=gc.max_completion_length)
        meta = _plain({"history": run["history"], "evals": run["evals"], "eval_after": _strip(ev),
                       "samples_after": ev["samples"], "rl_seconds": time.perf_counter() - t0,
                       "step_seconds": run["seconds"]})
        if cache_dir is not None:
            _save(cache_dir, key, {"params": run["params"]}, meta)
        hit = ({"params": run["params"]}, None)
    return {"config": config, "grpo_config": gc, "base_params": base["params"], "params": hit[0]["params"],
            "history": meta["history"], "evals": meta["evals"], "eval_before": base["eval"],
            "eval_after": meta["eval_after"], "samples_before": base["samples"], "samples_after": meta["samples_after"],
            "base": {k: v for k, v in base.items() if k not in ("params", "config")},
            "seconds": {"pretrain": base["seconds"], "rl": meta["rl_seconds"],
                        "total": base["seconds"] + meta["rl_seconds"]},
            "step_seconds": meta["step_seconds"], "cached": hit[1] is not None}


def r1_run(steps=15, seed=0, progress=True, cache_dir=None, *, base_steps=2000, cold_start_examples=300,
           cold_start_steps=20, cold_start_lr=1e-3, rs_prompts=256, rs_generations=4, rs_sft_steps=100,
           rs_sft_lr=3e-4, eval_every=5, **overrides):
    """R1 (DeepSeek-R1 §2.3): cold-start SFT → GRPO → rejection-sampling SFT, from the same base as R1-Zero.

    1. *cold start*: :func:`~refimpl.rl.trainer.sft_train` of the base on ``cold_start_examples``
       reference traces (``cold_start_steps`` steps of 32 rows at ``cold_start_lr``);
    2. *reasoning RL*: ``steps`` GRPO steps with :func:`r1_zero_grpo_config` (``overrides``);
    3. *rejection sampling + SFT*: ``rs_generations`` samples for each of ``rs_prompts`` fresh
       prompts, the correct and well-formatted ones kept (:func:`~refimpl.rl.trainer.rejection_sample`),
       ``rs_sft_steps`` SFT steps on them at ``rs_sft_lr``.

    Returns the keys of :func:`r1_zero_run` (``params``: the final model; ``history``/``evals``:
    the RL stage; ``eval_after``: the final evaluation) plus ``stages``: ``cold_start``, ``rl``,
    ``rejection_sft``, each with its ``eval`` (greedy, held-out), ``history``, ``seconds`` and size
    (``n_examples``), and ``stage_params`` with the cold-start and RL checkpoints.
    """
    gc = r1_zero_grpo_config(steps, seed, **overrides)
    base = pretrain_base(base_steps, seed, eval_n=gc.eval_n, progress=progress, cache_dir=cache_dir)
    config = base["config"]
    args = dict(base_steps=base_steps, cold_start_examples=cold_start_examples, cold_start_steps=cold_start_steps,
                cold_start_lr=cold_start_lr, rs_prompts=rs_prompts, rs_generations=rs_generations,
                rs_sft_steps=rs_sft_steps, rs_sft_lr=rs_sft_lr, eval_every=eval_every, gc=dataclasses.asdict(gc))
    key = _key("r1", args)
    names = ["cold_start", "rl", "final"]
    hit = _load(cache_dir, key, config, names) if cache_dir is not None else None
    if hit is not None:
        trees, meta = hit
    else:
        n_eval, L = gc.eval_n, gc.max_completion_length
        stages = {}
        t0 = time.perf_counter()
        cold = [(e.prompt, reference_completion(TASK, e))
                for e in make_dataset(TASK, cold_start_examples, np.random.default_rng(10_000 + seed))]
        cs = sft_train(base["params"], config, cold, steps=cold_start_steps, batch_size=32, lr=cold_start_lr,
                       warmup_steps=min(10, cold_start_steps), seed=seed, progress=progress)
        ev = evaluate(cs["params"], config, TASK, n=n_eval, max_new_tokens=L)
        stages["cold_start"] = {"eval": _strip(ev), "history": cs["history"], "n_examples": len(cold),
                                "examples": cold[:8], "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        run = grpo_train(cs["params"], config, TASK, gc, progress=progress, eval_every=eval_every)
        ev = evaluate(run["params"], config, TASK, n=n_eval, max_new_tokens=L)
        stages["rl"] = {"eval": _strip(ev), "history": run["history"], "evals": run["evals"],
                        "seconds": time.perf_counter() - t0, "step_seconds": run["seconds"]}
        t0 = time.perf_counter()
        kept = rejection_sample(run["params"], config, TASK, rs_prompts, rs_generations, max_completion_length=L,
                                seed=20_000 + seed)
        if kept:
            rs = sft_train(run["params"], config, kept, steps=rs_sft_steps, batch_size=32, lr=rs_sft_lr,
                           warmup_steps=min(10, rs_sft_steps), seed=seed, progress=progress)
        else:   # nothing correct to learn from: the stage is a no-op
            rs = {"params": run["params"], "history": {}}
        ev_final = evaluate(rs["params"], config, TASK, n=n_eval, max_new_tokens=L)
        stages["rejection_sft"] = {"eval": _strip(ev_final), "history": rs["history"], "n_examples": len(kept),
                                   "n_sampled": rs_prompts * rs_generations, "examples": kept[:8],
                                   "seconds": time.perf_counter() - t0}
        meta = _plain({"stages": stages, "samples_after": ev_final["samples"]})
        trees = {"cold_start": cs["params"], "rl": run["params"], "final": rs["params"]}
        if cache_dir is not None:
            _save(cache_dir, key, trees, meta)
    stages = meta["stages"]
    rl_s = sum(stages[s]["seconds"] for s in ("cold_start", "rl", "rejection_sft"))
    return {"config": config, "grpo_config": gc, "base_params": base["params"], "params": trees["final"],
            "history": stages["rl"]["history"], "evals": stages["rl"]["evals"], "eval_before": base["eval"],
            "eval_after": stages["rejection_sft"]["eval"], "samples_before": base["samples"],
            "samples_after": meta["samples_after"],
            "base": {k: v for k, v in base.items() if k not in ("params", "config")},
            "stages": stages, "stage_params": {"cold_start": trees["cold_start"], "rl": trees["rl"]},
            "seconds": {"pretrain": base["seconds"], **{s: stages[s]["seconds"] for s in stages},
                        "total": base["seconds"] + rl_s},
            "step_seconds": stages["rl"]["step_seconds"], "cached": hit is not None}


def r1_teacher(cache_dir=None, **kwargs):
    """``(params, config)`` of the trained R1 model (:func:`r1_run` with default settings, or ``kwargs``):
    the teacher of the distillation chapter. Pass the chapters' ``cache_dir`` to reuse it."""
    res = r1_run(progress=False, cache_dir=cache_dir, **kwargs)
    return res["params"], res["config"]


def steps_to_accuracy(result, target):
    """First GRPO step at which the greedy held-out accuracy reached ``target`` (from ``result["evals"]``;
    0 if the starting policy already did; None if it never did)."""
    for ev in result["evals"]:
        if ev["accuracy"] >= target:
            return ev["step"]
    return None
