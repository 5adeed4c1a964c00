r"""R1's four stages on a task where they matter, against R1-Zero at equal RL steps, over seeds.

DeepSeek-R1 (§2.3) trains in four stages from DeepSeek-V3-Base: (1) a *cold start*, SFT on a few
thousand long, readable chains of thought; (2) *reasoning-oriented RL* with rule rewards plus a
language-consistency reward (§2.3.2); (3) *rejection sampling and SFT*: correct, readable samples
of the RL checkpoint (mixed-language ones filtered out) become SFT data (§2.3.3); (4) a second RL
stage over all scenarios (§2.3.4). R1-Zero (§2.2) is RL alone, from the same base.

**Task** (:class:`~refimpl.tasks.MixedArithmeticTask`): additions of 2..4 digits and, half the
time, a 2- or 3-digit number times one digit, both written as column traces with carries
(``347*6=`` → ``<think>7*6=42,4*6+4=28,3*6+2=20</think><answer>2082</answer>``).

**Base.** The R1 policy (:func:`~refimpl.recipes.r1.r1_model_config`) pretrained (loss on every
token) on a corpus of careless, mixed-script, sometimes badly formatted completions
(:func:`stage_completion`): each addition carry is written with probability ``p_carry_add``, each
multiplication carry with the smaller ``p_carry_mul`` (a dropped carry gives a consistent but wrong
answer); at every column boundary the writer switches for the rest of the trace to letters
(``a`` = 0 … ``j`` = 9, :func:`refimpl.recipes.language.to_letters`) with probability ``p_switch``;
a share ``p_broken_format`` of completions break the format (as in :func:`refimpl.recipes.r1.noisy_completion`).
A sample of the base gets a product with two carries right with probability ~``p_carry_mul``²:
R1-Zero's exploration rarely finds the right habit there.

**Runs** (per seed, from the same base): *R1-Zero*, ``steps`` GRPO steps, accuracy and format
rewards, at the learning rate of :data:`refimpl.recipes.r1.GRPO_DEFAULTS` (3e-4); *R1*, cold start
(``cold_start_examples`` reference traces, ``cold_start_steps`` SFT steps) → ``steps_rl1`` GRPO
steps with the language reward (``language_weight``, the share of the ``<think>`` characters in
:data:`TARGET_ALPHABET`) at learning rate ``rl_lr`` → rejection sampling (``rs_generations``
samples of ``rs_prompts`` fresh prompts; kept if correct, well formatted *and* entirely in digits)
and ``rs_sft_steps`` SFT steps continuing from the RL checkpoint (R1 retrains the base; deviation
kept for the budget) → ``steps - steps_rl1`` more GRPO steps, as stage 2. Both runs use ``steps``
RL steps in all.

**Measures** (greedy, ``eval_n`` held-out problems, after every stage): accuracy, format rate and
*readability*, the share of completions that are well formatted and whose ``<think>`` is entirely
in the digit script. Means over ``seeds`` seeds with standard errors (sample std / √n), and the
per-seed paired differences of each stage with theirs.

**Measured** (defaults: base 2500 steps; 40 RL steps, 20 + 20 for R1; 256 held-out problems;
seeds 0-2; one thread per run; accuracy %, additions/products in brackets):

=========  ====  ============  ============  ============  ============  ============  ============  =========
backend    seed  base          R1-Zero       cold start    RL 1          RS + SFT      RL 2          R1 − Zero
=========  ====  ============  ============  ============  ============  ============  ============  =========
default    0     23.8 (31/17)  49.6 (79/19)  70.7 (95/45)  66.4 (92/40)  64.5 (91/37)  65.2 (92/38)  +15.6
default    1     23.8 (31/17)  50.4 (82/17)  65.2 (91/39)  66.4 (94/38)  65.2 (98/32)  64.1 (95/33)  +13.7
default    2     23.8 (31/17)  46.9 (76/17)  67.6 (92/43)  66.8 (92/40)  64.8 (91/38)  65.2 (91/39)  +18.4
numpy      0     25.4 (34/17)  47.3 (77/17)  65.2 (94/36)  63.3 (92/33)  64.1 (92/35)  65.2 (95/35)  +18.0
numpy      1     25.4 (34/17)  46.5 (75/17)  62.1 (91/33)  65.6 (92/39)  61.7 (91/32)  60.9 (90/31)  +14.5
numpy      2     25.4 (34/17)  50.4 (80/20)  64.8 (92/37)  62.9 (90/35)  65.2 (91/39)  65.2 (88/41)  +14.8
=========  ====  ============  ============  ============  ============  ============  ============  =========

(the last column: R1 after stage 4 minus R1-Zero, points). Means ± SE over the 3 seeds, default backend
(``REFIMPL_BACKEND=numpy`` in brackets): R1 − R1-Zero +15.9 ± 1.4 (+15.8 ± 1.1) points; stage
effects: cold start +44.0 ± 1.6 (+38.7 ± 1.0), reasoning RL −1.3 ± 1.6 (−0.1 ± 1.8), rejection
sampling + SFT −1.7 ± 0.3 (−0.3 ± 1.9), second RL +0.0 ± 0.6 (+0.1 ± 0.6). Readability: base 95%
(97%), R1-Zero 82 ± 5% (84 ± 4%), every R1 checkpoint 100%; format 100% from R1-Zero on. Rejection
sampling found 170-196 right samples of 1024 (17-19%, while the same checkpoint is right greedily
on ~65%) and kept all but 1-7 as readable. The cold start carries R1's lead: it teaches the table
of a product plus a carry (products 17% → 35-45%), which R1-Zero cannot find (its products stay
at 17-20%: the base almost never writes a product's carry, ``p_carry_mul`` 0.05); the three later
stages move the greedy accuracy by a few points either way. A busy 2-core machine (load ~8) took
~9 minutes of wall time per seed; an idle one about a minute (estimate: ~60 s of RL, SFT and
evaluation per seed, ~110 s for the base).

How the defaults were chosen (seed 0 unless said). With the earlier cold start (300 traces, 30
SFT steps, 128 held-out problems) products stayed at ~25% for every checkpoint, and R1 − R1-Zero
was +7.4 ± 0.4 in one 2-seed build but −0.4 ± 2.0 in another that differed only in float32
rounding (the second RL stage lost 6.6 points there). SFT of the base on 2000 traces (lr 1e-3)
reaches 71% (products 49%) after 100 steps and 87% (75%) after 500. With that cold start and
R1's RL stages at R1-Zero's learning rate 3e-4, the RL stages lost accuracy: default backend
70.7 → 67.2 → 66.0 → 60.2, numpy 65.2 → 58.6 → 62.9 → 60.9 (cold start → RL 1 → RS + SFT → RL 2).
Stage 4 rerun from the same RS + SFT checkpoint (66.0%): warm-up over 5 steps 63.7%, β = 0.04
(KL to that checkpoint) 58.2%, lr 1e-4 65.6%; hence ``rl_lr`` = 1e-4 for both of R1's RL stages.
Without the rare multiplication carries (``p_carry_mul`` 0.15) R1-Zero learned products too and
matched R1 (67% both, base 3000 steps, earlier design), so the stages could not be told apart.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .._validate import check_positive_int
from ..rl import evaluate, format_reward, grpo_train, language_consistency_reward, rejection_sample, sft_train
from ..tasks import MixedArithmeticTask, format_completion, make_dataset, reference_completion
from ..tasks.mixed import column_steps
from . import _cache
from ._cache import mean_se
from .aha import pretrain_on
from .language import to_letters
from .r1 import SOURCES, r1_model_config, r1_zero_grpo_config

TASK = MixedArithmeticTask()
TARGET_ALPHABET = "0123456789+*=,"
STAGES_SOURCES = SOURCES + ("recipes/aha.py", "recipes/language.py", "recipes/r1_stages.py")
#: the measured checkpoints, in order: the base, R1-Zero, and R1 after each of its four stages
CHECKPOINTS = ("base", "zero", "cold_start", "rl1", "rejection_sft", "rl2")


def stage_completion(example, rng, *, p_carry_add=0.35, p_carry_mul=0.05, p_switch=0.2, p_broken_format=0.3) -> str:
    """One completion of the base corpus: a careless column trace (carries kept with probability
    ``p_carry_add`` / ``p_carry_mul``), switching to letters after a column with probability
    ``p_switch`` at each boundary, in the R1 format or (``p_broken_format``) one of four broken layouts."""
    a, op, b = TASK.parse(example.prompt)
    p = p_carry_add if op == "+" else p_carry_mul
    steps, answer = column_steps(a, op, b, keep_carry=lambda i: rng.random() < p)
    for k in range(1, len(steps)):
        if rng.random() < p_switch:
            steps[k:] = [to_letters(s) for s in steps[k:]]
            break
    thought = ",".join(steps)
    if rng.random() >= p_broken_format:
        return format_completion(thought, answer)
    kind = int(rng.integers(4))
    return (f"<answer>{answer}</answer>", f"<think>{thought}</think>{answer}",
            f"<think>{thought}<answer>{answer}</answer>", f"{thought} so {answer}")[kind]


def stages_corpus(n=4000, seed=0, **kw) -> list[str]:
    """``n`` distinct training prompts (never held-out ones), each followed by a :func:`stage_completion`."""
    rng = np.random.default_rng(seed)
    return [e.prompt + stage_completion(e, rng, **kw) for e in make_dataset(TASK, n, rng)]


def readability(texts) -> dict:
    """``readability``: share of completions well formatted with a ``<think>`` entirely in
    :data:`TARGET_ALPHABET`; ``language_share``: mean share of ``<think>`` characters in it."""
    lc = language_consistency_reward(list(texts), alphabet=TARGET_ALPHABET)   # (B,)
    fmt = format_reward(list(texts))                                          # (B,)
    return {"readability": float(((lc == 1.0) & (fmt > 0)).mean()), "language_share": float(lc.mean())}


def measure(params, config, n, L):
    """Greedy held-out accuracy (also apart on additions and on products), format rate, mean length,
    :func:`readability`, and 4 transcripts."""
    ev = evaluate(params, config, TASK, n=n, max_new_tokens=L)
    texts = [s["completion"] for s in ev["samples"]]
    by_op = {op: [s["correct"] for s in ev["samples"] if op in s["prompt"]] for op in "+*"}
    return {"accuracy": ev["accuracy"], "format": ev["format"], "mean_length": ev["mean_length"],
            "accuracy_add": float(np.mean(by_op["+"])) if by_op["+"] else 0.0,
            "accuracy_mul": float(np.mean(by_op["*"])) if by_op["*"] else 0.0, **readability(texts),
            "examples": [(s["prompt"], s["completion"], s["correct"]) for s in ev["samples"][:4]]}


def stages_base(base_steps=2500, n_corpus=4000, corpus_options=None, progress=True, cache_dir=None, *, seed=0):
    """The pretrained base (:func:`refimpl.recipes.aha.pretrain_on` on :func:`stages_corpus`), shared by
    every seed of :func:`r1_stages_run` as R1 and R1-Zero share DeepSeek-V3-Base. Cached on its own.
    Returns ``dict(params, corpus_examples, seconds, cached)``."""
    config, corpus_options = r1_model_config(), dict(corpus_options or {})
    key = _cache.cache_key("r1_stages_base", dict(base_steps=base_steps, n_corpus=n_corpus, corpus=corpus_options,
                                                  seed=seed), STAGES_SOURCES)
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, ["params"])) is not None:
        return {"params": hit[0]["params"], **hit[1], "cached": True}
    t0 = time.perf_counter()
    corpus = stages_corpus(n_corpus, seed, **corpus_options)
    params = pretrain_on(corpus, config, base_steps, seed, progress)["params"]
    meta = _cache.plain({"corpus_examples": corpus[:10], "seconds": time.perf_counter() - t0})
    if cache_dir is not None:
        _cache.save(cache_dir, key, {"params": params}, meta)
    return {"params": params, **meta, "cached": False}


def r1_stages_seed(seed=0, progress=True, cache_dir=None, *, steps=40, steps_rl1=20, base_steps=2500,
                   n_corpus=4000, corpus_options=None, cold_start_examples=2000, cold_start_steps=100,
                   cold_start_lr=1e-3, rs_prompts=256, rs_generations=4, rs_sft_steps=60, rs_sft_lr=3e-4,
                   language_weight=0.5, rl_lr=1e-4, eval_n=256, max_completion_length=56, **overrides):
    """One seed of :func:`r1_stages_run`: the base, R1-Zero, and R1's four stages, each measured
    (:func:`measure`). Returns ``dict(measures, n_rejection_kept, n_rejection_sampled, corpus_examples,
    cold_start_examples, seconds, budget, cached)``; ``measures[name]`` for each of :data:`CHECKPOINTS`;
    ``budget`` the run's arguments (seed, stage budgets, ``rl_lr``, ...) but the GRPO settings."""
    if not (isinstance(steps_rl1, int) and 0 <= steps_rl1 <= steps):
        raise ValueError(f"steps_rl1: expected an int in 0..steps={steps}, got {steps_rl1!r}")
    gc = r1_zero_grpo_config(steps, seed, **{"max_completion_length": max_completion_length, "eval_n": eval_n,
                                             "language_alphabet": TARGET_ALPHABET, **overrides})
    config = r1_model_config()
    corpus_options = dict(corpus_options or {})
    args = dict(seed=seed, steps_rl1=steps_rl1, base_steps=base_steps, n_corpus=n_corpus, corpus=corpus_options,
                cold_start_examples=cold_start_examples, cold_start_steps=cold_start_steps, cold_start_lr=cold_start_lr,
                rs_prompts=rs_prompts, rs_generations=rs_generations, rs_sft_steps=rs_sft_steps, rs_sft_lr=rs_sft_lr,
                language_weight=language_weight, rl_lr=rl_lr, gc=dataclasses.asdict(gc))
    key = _cache.cache_key("r1_stages", args, STAGES_SOURCES)
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, list(CHECKPOINTS))) is not None:
        return {**hit[1], "cached": True}
    L, trees, t0 = gc.max_completion_length, {}, time.perf_counter()
    base = stages_base(base_steps, n_corpus, corpus_options, progress, cache_dir)
    trees["base"], seconds = base["params"], {"base": base["seconds"]}
    trees["zero"] = grpo_train(trees["base"], config, TASK, gc, progress=progress, eval_every=0)["params"]
    seconds["zero"], t0 = time.perf_counter() - t0, time.perf_counter()
    cold = [(e.prompt, reference_completion(TASK, e))
            for e in make_dataset(TASK, cold_start_examples, np.random.default_rng(10_000 + seed))]
    trees["cold_start"] = sft_train(trees["base"], config, cold, steps=cold_start_steps, batch_size=32,
                                    lr=cold_start_lr, warmup_steps=min(10, cold_start_steps), seed=seed,
                                    progress=progress)["params"]
    seconds["cold_start"], t0 = time.perf_counter() - t0, time.perf_counter()
    g_lc = gc.replace(language_weight=language_weight, lr=rl_lr)
    trees["rl1"] = (grpo_train(trees["cold_start"], config, TASK, g_lc.replace(steps=steps_rl1), progress=progress,
                               eval_every=0)["params"] if steps_rl1 else trees["cold_start"])
    seconds["rl1"], t0 = time.perf_counter() - t0, time.perf_counter()
    sampled = rejection_sample(trees["rl1"], config, TASK, rs_prompts, rs_generations, max_completion_length=L,
                               seed=20_000 + seed)
    kept = [(p, c) for p, c in sampled if readability([c])["readability"] == 1.0]   # R1 drops mixed-language CoT
    trees["rejection_sft"] = (sft_train(trees["rl1"], config, kept, steps=rs_sft_steps, batch_size=32, lr=rs_sft_lr,
                                        warmup_steps=min(10, rs_sft_steps), seed=seed, progress=progress)["params"]
                              if kept and rs_sft_steps else trees["rl1"])
    seconds["rejection_sft"], t0 = time.perf_counter() - t0, time.perf_counter()
    g2 = g_lc.replace(steps=steps - steps_rl1, seed=seed + 1000)
    trees["rl2"] = (grpo_train(trees["rejection_sft"], config, TASK, g2, progress=progress, eval_every=0)["params"]
                    if g2.steps else trees["rejection_sft"])
    seconds["rl2"] = time.perf_counter() - t0
    measures = {name: measure(trees[name], config, eval_n, L) for name in CHECKPOINTS}
    meta = _cache.plain({"measures": measures, "n_rejection_kept": len(kept), "n_rejection_sampled": len(sampled),
                         "corpus_examples": base["corpus_examples"], "cold_start_examples": cold[:4],
                         "seconds": seconds, "budget": {k: v for k, v in args.items() if k != "gc"}})
    if cache_dir is not None:
        _cache.save(cache_dir, key, trees, meta)
    return {**meta, "cached": False}


def r1_stages_run(steps=40, seeds=3, progress=True, cache_dir=None, *, steps_rl1=20, base_steps=2500,
                  eval_n=256, **kwargs):
    """R1-Zero and R1's four stages (see the module docstring) for seeds ``0..seeds-1``.

    ``kwargs`` go to :func:`r1_stages_seed` (stage budgets, ``corpus_options``, GRPOConfig fields).
    Returns a dict with, for each checkpoint ``c`` of :data:`CHECKPOINTS` and measure ``m`` in
    (accuracy, accuracy_add, accuracy_mul, format, readability), the scalars ``m_c`` (mean over
    seeds) and ``m_c_se``; the stage effects ``gain_<stage>`` / ``gain_<stage>_se`` (paired
    per-seed accuracy differences: cold start − base, rl1 − cold start, rejection_sft − rl1,
    rl2 − rejection_sft) and ``r1_minus_zero`` / ``r1_minus_zero_se`` (rl2 − zero); ``per_seed``
    (the records of :func:`r1_stages_seed`); ``seconds`` (compute of the base and the runs, cached
    or not); ``cached`` (all seeds loaded).
    """
    check_positive_int("seeds", seeds)
    if not (isinstance(steps_rl1, int) and isinstance(steps, int) and 0 <= steps_rl1 <= steps):
        raise ValueError(f"steps_rl1: expected an int in 0..steps={steps}, got {steps_rl1!r}")
    per_seed = [r1_stages_seed(s, progress, cache_dir, steps=steps, steps_rl1=steps_rl1, base_steps=base_steps,
                               eval_n=eval_n, **kwargs) for s in range(seeds)]
    out = {}
    for c in CHECKPOINTS:
        for m in ("accuracy", "accuracy_add", "accuracy_mul", "format", "readability"):
            out[f"{m}_{c}"], out[f"{m}_{c}_se"] = mean_se([r["measures"][c][m] for r in per_seed])
    pairs = {"cold_start": ("base", "cold_start"), "rl1": ("cold_start", "rl1"),
             "rejection_sft": ("rl1", "rejection_sft"), "rl2": ("rejection_sft", "rl2")}
    for stage, (a, b) in pairs.items():
        out[f"gain_{stage}"], out[f"gain_{stage}_se"] = mean_se(
            [r["measures"][b]["accuracy"] - r["measures"][a]["accuracy"] for r in per_seed])
    out["r1_minus_zero"], out["r1_minus_zero_se"] = mean_se(
        [r["measures"]["rl2"]["accuracy"] - r["measures"]["zero"]["accuracy"] for r in per_seed])
    out.update(seeds=seeds, steps=steps, steps_rl1=steps_rl1, eval_n=eval_n, per_seed=per_seed,
               seconds=float(per_seed[0]["seconds"]["base"] + sum(sum(v for k, v in r["seconds"].items() if k != "base")
                                                                  for r in per_seed)),
               cached=all(r["cached"] for r in per_seed))
    return out
