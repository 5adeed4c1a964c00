r"""R1-Zero's "aha moment" in miniature: RL with accuracy and format rewards only makes a rare check common.

DeepSeek-R1-Zero's completions grew longer under RL and started to re-evaluate themselves
("Wait, wait. Wait. That's an aha moment I can flag here", R1 §2.2.4, Table 3), although no
reward asked for it. Later work traced the behaviour to the base model: RL amplifies verification
and backtracking that pretraining already put there, rarely. This recipe builds that situation.

**Base.** The R1 policy (:func:`~refimpl.recipes.r1.r1_model_config`) pretrained (loss on every
token) on a corpus of addition problems (2 and 3 digits). A share ``p_drill`` of the documents
are column drills outside the answer format (:func:`column_drill`, ``sum 47+85: 7+5=12,4+8+1=13
so 132.``): the base's arithmetic "from elsewhere". The others are completions
(:func:`refimpl.tasks.reflection.reflective_completion`) that give a careless answer "in the
head" — each carry dropped with probability ``1 - p_carry`` — and only in a fraction ``p_check``
of them check it, restating the problem and recomputing it column by column, with "wait" and the
fix when the check fails. With the defaults, 0.6 × 0.16 ≈ 10% of all documents hold a check.

**RL.** GRPO (:func:`~refimpl.rl.trainer.grpo_train`) with the R1-Zero settings of
:data:`~refimpl.recipes.r1.GRPO_DEFAULTS` — accuracy and format rewards only, nothing for checking
or for length — and room for the longer completions (``max_completion_length`` 64).

**Measured.** The returned rates are computed by :func:`refimpl.tasks.reflection.reflection_stats`
on the held-out prompts, greedily and sampled at temperature 1, before and after RL, and along the
run every ``eval_every`` steps (``curve``). Defaults, seed 0, 128 held-out problems, greedy:
completions that check 0% → 94.5% (sampled 12.5% → 83%), self-corrections (wrong first answer,
right final one) 0% → 42% (sampled 1.6% → 41%), accuracy 26.6% → 71.9%, mean length 11.0 → 53.4
tokens; about 5.5 minutes on a busy 2-core machine. The policy stops writing "wait": it ends every
check with "ok" and answers with the recomputed value. Without the column drills and the restated
problem in the check, the base's checks were wrong and RL made checking rarer (0.10 → 0.02 sampled).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..model.transformer import init_params
from ..rl.rollout import evaluate
from ..rl.trainer import grpo_train, sft_train
from ..tasks import AdditionTask, make_dataset
from ..tasks.reflection import reflection_stats, reflective_completion
from . import _cache
from .r1 import SOURCES, r1_model_config, r1_zero_grpo_config

TASK = AdditionTask(min_digits=2, max_digits=3)
AHA_SOURCES = SOURCES + ("recipes/aha.py",)


def column_drill(example) -> str:
    """A document that only practises column addition, outside the answer format:
    ``"sum 47+85: 7+5=12,4+8+1=13 so 132."`` (the base model's arithmetic "from elsewhere")."""
    return f"sum {example.prompt[:-1]}: {TASK.chain_of_thought(example.prompt)} so {example.answer}."


def aha_corpus(n=4000, seed=0, *, p_check=0.1, p_carry=0.35, p_drill=0.0) -> list[str]:
    """``n`` distinct training prompts (never held-out ones): with probability ``p_drill`` a
    :func:`column_drill`, else the prompt followed by a reflective completion."""
    rng = np.random.default_rng(seed)
    return [column_drill(e) if p_drill and rng.random() < p_drill
            else e.prompt + reflective_completion(e, rng, p_check=p_check, p_carry=p_carry)
            for e in make_dataset(TASK, n, rng)]


def pretrain_on(corpus, config, steps, seed, progress):
    """A base model: a fresh ``init_params(config, default_rng(seed))`` trained on ``corpus`` (loss on every
    token) with the pretraining settings of :func:`refimpl.recipes.r1.pretrain_base` (batch 32, lr 3e-3)."""
    return sft_train(init_params(config, np.random.default_rng(seed), np.float32), config, corpus, steps=steps,
                     batch_size=32, lr=3e-3, warmup_steps=min(20, steps), seed=seed, progress=progress)


def measure(params, config, n, temperature, seed, max_new_tokens):
    """Held-out evaluation plus :func:`~refimpl.tasks.reflection.reflection_stats` of its completions."""
    ev = evaluate(params, config, TASK, n=n, temperature=temperature, seed=seed, max_new_tokens=max_new_tokens)
    texts, golds = [s["completion"] for s in ev["samples"]], [s["answer"] for s in ev["samples"]]
    return {"accuracy": ev["accuracy"], "format": ev["format"], "mean_length": ev["mean_length"],
            **reflection_stats(texts, golds)}, ev["samples"]


def aha_run(steps=40, seed=0, progress=True, cache_dir=None, *, base_steps=3000, n_corpus=4000, p_check=0.16,
            p_carry=0.35, p_drill=0.4, eval_every=10, eval_n=128, max_completion_length=64, **overrides):
    """Pretrain the reflective base, then R1-Zero GRPO on it (see the module docstring).

    ``overrides`` are :class:`~refimpl.rl.trainer.GRPOConfig` fields on top of
    :func:`~refimpl.recipes.r1.r1_zero_grpo_config`. Deterministic for ``seed``.

    Returns a dict with the scalars ``reflection_rate_before``/``_after``,
    ``self_correction_rate_before``/``_after``, ``accuracy_before``/``_after`` and
    ``mean_length_before``/``_after`` (greedy, held-out); ``sampled_before``/``sampled_after``
    (the same measures at temperature 1); ``curve`` (one dict per evaluation: ``step`` and the
    greedy and sampled measures); ``history`` (GRPO's per-step metrics without samples);
    ``corpus_examples``; ``samples_before``/``samples_after`` (greedy completions);
    ``sampled_transcripts_after`` (sampled completions); ``seconds``; ``cached``.
    """
    gc = r1_zero_grpo_config(steps, seed, **{"max_completion_length": max_completion_length, "eval_n": eval_n,
                                             **overrides})
    config = r1_model_config()
    args = dict(base_steps=base_steps, n_corpus=n_corpus, p_check=p_check, p_carry=p_carry, p_drill=p_drill,
                eval_every=eval_every,
                gc=dataclasses.asdict(gc))
    key = _cache.cache_key("aha", args, AHA_SOURCES)
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, ["base", "params"])) is not None:
        return {**hit[1], "cached": True}
    t0 = time.perf_counter()
    corpus = aha_corpus(n_corpus, seed, p_check=p_check, p_carry=p_carry, p_drill=p_drill)
    base = pretrain_on(corpus, config, base_steps, seed, progress)
    L = gc.max_completion_length
    curve = []

    def point(step, params):
        g, gs = measure(params, config, eval_n, 0.0, seed, L)
        s, ss = measure(params, config, eval_n, 1.0, seed + 1, L)
        curve.append({"step": step, "greedy": g, "sampled": s})
        return gs, ss

    samples_before, _ = point(0, base["params"])

    def callback(step, metrics, params):
        if step < gc.steps and eval_every and step % eval_every == 0:
            point(step, params)
    run = grpo_train(base["params"], config, TASK, gc, progress=progress, eval_every=0, callback=callback)
    samples_after, sampled_after = point(gc.steps, run["params"])
    before, after = curve[0]["greedy"], curve[-1]["greedy"]
    meta = {f"{k}_{when}": m[k] for when, m in (("before", before), ("after", after))
            for k in ("reflection_rate", "self_correction_rate", "accuracy", "mean_length")}
    meta.update(sampled_before=curve[0]["sampled"], sampled_after=curve[-1]["sampled"], curve=curve,
                history=[{k: v for k, v in h.items() if k not in ("sample", "iterations", "seconds")}
                         for h in run["history"]],
                corpus_examples=corpus[:12], samples_before=samples_before, samples_after=samples_after,
                sampled_transcripts_after=sampled_after, seconds=time.perf_counter() - t0)
    meta = _cache.plain(meta)
    if cache_dir is not None:
        _cache.save(cache_dir, key, {"base": base["params"], "params": run["params"]}, meta)
    return {**meta, "cached": False}
