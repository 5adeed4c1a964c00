r"""Language consistency in training (DeepSeek-R1 §2.3.2): a base that switches script mid-trace, and R1's reward.

R1-Zero's chains of thought mixed languages; R1 added a language-consistency reward, the proportion
of target-language words in the CoT, and reports that it makes the output more readable at a slight
cost in accuracy (R1 §2.3.2). The miniature's two "languages" are two scripts for the same
numbers: decimal digits, and letters (``a`` = 0, ``b`` = 1, … ``j`` = 9; :func:`to_letters`).

**Base corpus.** The careless column traces of :func:`refimpl.recipes.r1.careless_thought` (each
carry written with probability ``p_carry``), in which the writer, at every boundary between two
columns, switches for the rest of the trace to letters with probability ``p_switch`` (default
0.6): ``47+85=<think>7+5=12,e+i=bc</think><answer>122</answer>``. The answer is always in digits.
Greedy decoding of the pretrained base switches at the first boundary; a sample is consistent
with probability 0.4 (two columns) or 0.16 (three).

**RL.** The same R1-Zero GRPO (:func:`~refimpl.recipes.r1.r1_zero_grpo_config`) twice from the
base: with accuracy and format rewards only, and with R1's language-consistency reward added
(``language_weight``; the share of the ``<think>`` text's characters that are digits, ``+``,
``=`` or ``,``, :func:`refimpl.rl.language_consistency_reward` — characters, since the trace has
no spaces to split words at). Returned: held-out accuracy and consistency for the base and both
runs, greedy and sampled; the accuracy cost is ``accuracy_zero - accuracy_lc``.

**Measured** (defaults, seed 0, 128 held-out problems, greedy): consistent traces 9.4% (base),
0.8% after R1-Zero's 30 steps (sampled: 31% → 17%), 100% with the language reward (sampled 88%);
accuracy 36.7% → 97.7% without and 96.9% with it (a cost of 0.8 points, one problem).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .._validate import check_positive_int
from ..rl.rewards import language_consistency_reward
from ..rl.rollout import evaluate
from ..rl.trainer import grpo_train
from ..tasks import format_completion, make_dataset
from . import _cache
from ._cache import mean_se
from .aha import pretrain_on
from .r1 import SOURCES, TASK, careless_thought, r1_model_config, r1_zero_grpo_config

LANGUAGE_SOURCES = SOURCES + ("recipes/aha.py", "recipes/language.py")
TARGET_ALPHABET = "0123456789+=,"
_LETTERS = str.maketrans("0123456789", "abcdefghij")


def to_letters(text: str) -> str:
    """The digits of ``text`` written in the second script: ``0``→``a`` … ``9``→``j``."""
    return text.translate(_LETTERS)


def mixed_completion(example, rng, *, p_switch=0.6, p_carry=0.35) -> str:
    """A careless column trace that switches to letters after a column with probability ``p_switch``
    at every boundary (once switched, it stays); the answer is in digits."""
    thought, answer = careless_thought(example.prompt, rng, p_carry=p_carry)
    steps = thought.split(",")
    for k in range(1, len(steps)):
        if rng.random() < p_switch:
            steps[k:] = [to_letters(s) for s in steps[k:]]
            break
    return format_completion(",".join(steps), answer)


def language_corpus(n=4000, seed=0, *, p_switch=0.6, p_carry=0.35) -> list[str]:
    """``n`` distinct training prompts (never held-out ones), each followed by a mixed-script completion."""
    rng = np.random.default_rng(seed)
    return [e.prompt + mixed_completion(e, rng, p_switch=p_switch, p_carry=p_carry)
            for e in make_dataset(TASK, n, rng)]


def consistency(texts) -> dict:
    """``share``: mean fraction of ``<think>`` characters in the target script; ``consistent``: the
    fraction of completions whose ``<think>`` is entirely in it."""
    lc = language_consistency_reward(list(texts), alphabet=TARGET_ALPHABET)  # (B,)
    return {"share": float(lc.mean()), "consistent": float((lc == 1.0).mean())}


def _measure(params, config, n, L, seed):
    out = {}
    for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
        ev = evaluate(params, config, TASK, n=n, temperature=temp, seed=seed, max_new_tokens=L)
        texts = [s["completion"] for s in ev["samples"]]
        out[mode] = {"accuracy": ev["accuracy"], "format": ev["format"], "mean_length": ev["mean_length"],
                     **consistency(texts)}
        out[f"{mode}_samples"] = [(s["prompt"], s["completion"], s["correct"]) for s in ev["samples"][:6]]
    return out


def language_base(base_steps=2000, seed=0, progress=True, cache_dir=None, *, n_corpus=4000, p_switch=0.6,
                  p_carry=0.35):
    """The mixed-script base (:func:`refimpl.recipes.aha.pretrain_on` on :func:`language_corpus`), cached on
    its own so that several RL seeds share it. Returns ``dict(params, corpus_examples, seconds, cached)``."""
    config = r1_model_config()
    args = dict(base_steps=base_steps, seed=seed, n_corpus=n_corpus, p_switch=p_switch, p_carry=p_carry)
    key = _cache.cache_key("language_base", args, LANGUAGE_SOURCES)
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, ["params"])) is not None:
        return {"params": hit[0]["params"], **hit[1], "cached": True}
    t0 = time.perf_counter()
    corpus = language_corpus(n_corpus, seed, p_switch=p_switch, p_carry=p_carry)
    params = pretrain_on(corpus, config, base_steps, seed, progress)["params"]
    meta = _cache.plain({"corpus_examples": corpus[:12], "seconds": time.perf_counter() - t0})
    if cache_dir is not None:
        _cache.save(cache_dir, key, {"params": params}, meta)
    return {"params": params, **meta, "cached": False}


def language_run(steps=30, seed=0, progress=True, cache_dir=None, *, base_steps=2000, base_seed=None, n_corpus=4000,
                 p_switch=0.6, p_carry=0.35, language_weight=1.0, eval_n=128, **overrides):
    """Pretrain the mixed-script base, then R1-Zero GRPO with and without R1's language-consistency reward.

    The base is pretrained with ``base_seed`` (None: ``seed``; :func:`language_base`), the RL runs
    with ``seed``. Returns ``dict(consistency_before, consistency_zero, consistency_lc, accuracy_before,
    accuracy_zero, accuracy_lc, accuracy_cost, base, zero, lc, corpus_examples, seconds, cached)``: the
    scalars are greedy, held-out (``consistency_*`` = fraction of completions entirely in digits);
    ``base``, ``zero`` and ``lc`` hold the full greedy and sampled measures (:func:`consistency`,
    accuracy, format, length) and a few transcripts, ``zero``/``lc`` also the GRPO ``evals``.
    """
    gc = r1_zero_grpo_config(steps, seed, **{"eval_n": eval_n, **overrides})
    config = r1_model_config()
    base_seed = seed if base_seed is None else base_seed
    args = dict(base_steps=base_steps, base_seed=base_seed, n_corpus=n_corpus, p_switch=p_switch, p_carry=p_carry,
                language_weight=language_weight, gc=dataclasses.asdict(gc))
    key = _cache.cache_key("language", args, LANGUAGE_SOURCES)
    names = ["base", "zero", "lc"]
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, names)) is not None:
        return {**hit[1], "cached": True}
    t0 = time.perf_counter()
    base = language_base(base_steps, base_seed, progress, cache_dir, n_corpus=n_corpus, p_switch=p_switch,
                         p_carry=p_carry)
    L = gc.max_completion_length
    trees, meta = {"base": base["params"]}, {"base": _measure(base["params"], config, eval_n, L, seed)}
    for name, g in (("zero", gc), ("lc", gc.replace(language_weight=language_weight))):
        run = grpo_train(base["params"], config, TASK, g, progress=progress, eval_every=0)
        trees[name] = run["params"]
        meta[name] = {**_measure(run["params"], config, eval_n, L, seed), "evals": run["evals"]}
    for short, name in (("before", "base"), ("zero", "zero"), ("lc", "lc")):
        meta[f"consistency_{short}"] = meta[name]["greedy"]["consistent"]
        meta[f"accuracy_{short}"] = meta[name]["greedy"]["accuracy"]
    meta.update(accuracy_cost=meta["accuracy_zero"] - meta["accuracy_lc"], corpus_examples=base["corpus_examples"],
                seconds=time.perf_counter() - t0 + (0.0 if base["cached"] else 0.0))
    meta = _cache.plain(meta)
    if cache_dir is not None:
        _cache.save(cache_dir, key, trees, meta)
    return {**meta, "cached": False}


def language_seeds_run(steps=30, seeds=2, progress=True, cache_dir=None, *, base_steps=2000, **kwargs):
    """:func:`language_run` for RL seeds ``0..seeds-1`` from one base (pretrained with seed 0).

    Returns the means over seeds of the scalars of :func:`language_run` (``consistency_*``,
    ``accuracy_*``, ``accuracy_cost``, and ``sampled_consistency_*`` at temperature 1), each with its
    standard error ``<name>_se`` (sample std / √seeds; the cost's from the paired per-seed
    differences); ``per_seed`` (the :func:`language_run` records); ``seconds``; ``cached``.
    """
    check_positive_int("seeds", seeds)
    runs = [language_run(steps, s, progress, cache_dir, base_steps=base_steps, base_seed=0, **kwargs)
            for s in range(seeds)]
    out = {}
    for short, name in (("before", "base"), ("zero", "zero"), ("lc", "lc")):
        for m in ("consistency", "accuracy"):
            out[f"{m}_{short}"], out[f"{m}_{short}_se"] = mean_se([r[f"{m}_{short}"] for r in runs])
        out[f"sampled_consistency_{short}"], out[f"sampled_consistency_{short}_se"] = mean_se(
            [r[name]["sampled"]["consistent"] for r in runs])
    out["accuracy_cost"], out["accuracy_cost_se"] = mean_se([r["accuracy_cost"] for r in runs])
    out.update(seeds=seeds, per_seed=runs, seconds=float(sum(r["seconds"] for r in runs)),
               cached=all(r["cached"] for r in runs))
    return out
