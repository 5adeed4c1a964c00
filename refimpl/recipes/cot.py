r"""Does thinking first help? The same tiny model trained to answer directly, and to think first.

The claim behind chain-of-thought reasoning (DeepSeek-R1 §1, §2.2: "the model ... first thinks
about the reasoning process in the mind and then provides the user with the answer"), measured in
miniature. Two copies of one initialisation of the R1 policy (:func:`~refimpl.recipes.r1.r1_model_config`,
~100k parameters) are fine-tuned on the same training problems (the same prompts, drawn in the
same order) with the same batch size and learning rate, and differ in their targets:

* **direct**: ``47+85=`` → ``<answer>132</answer>`` — the answer in one go, "in the head";
* **think first**: ``47+85=`` → ``<think>7+5=12,4+8+1=13</think><answer>132</answer>`` — the
  column sums, least significant first, carries written (:class:`~refimpl.tasks.AdditionTask`).

Training problems: both operands have ``d`` digits, ``d`` uniform in 1..``train_max_digits`` (4 by
default), so each trained length gets a quarter of the rows. With operand lengths drawn
independently (``equal_lengths=False``: only 1/16 of the rows have two 4-digit operands) the direct
model failed to learn even the 2-digit sums in two seeds of three (5% and 9% after 5000 steps).
Evaluation: greedy, on held-out problems whose operands both have ``d`` digits, for each ``d`` in
``eval_digits`` (2..6 by default: 2, 3, 4 trained, 5 and 6 longer than any training problem);
held-out prompts are kept out of the training data. "Overall" is the mean over the evaluated
lengths; ``_seen`` and ``_beyond`` split it.

Budgets: the direct model gets more steps, ``direct_steps=5000`` against ``steps=3000``: an answer
of a few tokens carries little training signal per example, and with equal steps the direct model
learned nothing at all (an earlier version: 0.5% at every length). Its rows are shorter (14 tokens
on average against 33), so it still trains on fewer tokens (about 0.7×, the result's ``tokens``):
this is not an equal-compute comparison but an equal-data one, with the steps tilted towards the
direct model. At 1500 think-first steps the model that thinks first had not yet learned the 4-digit
sums in one seed of two (2%), hence 3000.

Why the gap should grow with length: a direct answer must produce the leading digit first, and
it depends on every carry below it, all computed in one forward pass; the trace turns the sum
into a chain of one-digit additions, each depending only on two prompt digits and the previous
carry, the same work at every length.

**Measured** (the defaults, i.e. ``python -m refimpl cot-ablation --seeds 3``, each seed run as its
own call with ``seeds=1``; default backend, one thread; 20000 training problems, 3000 and 5000
steps of 32 rows, 64 held-out problems per length). Held-out accuracy, think first / direct, in %:

=======  ===========  ===========  ===========  ============  ===========================
seed     2 digits     3 digits     4 digits     5, 6 digits   all five lengths (gap)
=======  ===========  ===========  ===========  ============  ===========================
0        100 / 85.9   100 / 3.1    100 / 0      0 / 0         60.0 / 17.8 (+42.2)
1        100 / 95.3   100 / 6.2    100 / 3.1    0 / 0         60.0 / 20.9 (+39.1)
2        100 / 70.3   98.4 / 1.6   96.9 / 0     0 / 0         59.1 / 14.4 (+44.7)
0 numpy  100 / 54.7   98.4 / 3.1   100 / 0      0 / 0         59.7 / 11.6 (+48.1)
=======  ===========  ===========  ===========  ============  ===========================

Overall gap 42.0 ± 1.6 points (mean ± standard error over seeds 0, 1, 2), at least 39 in each run;
over the trained lengths 99.5% against 29.5%. Within the training lengths the gap grows with
length in every run (2 → 4 digits: 14 → 100, 5 → 97, 30 → 97 points; numpy 45 → 100): the direct model learns
the 2-digit sums and little else. Beyond them (5 and 6 digits) both models score 0 in every seed:
neither generalises to numbers longer than it has seen, so there the gap is 0 and the claim "the
gap grows with length" holds over the trained lengths only. Earlier designs, for comparison (seed
0 unless said): operands of 1..3 digits, think first 1000 steps: gap +13.7 over 2..5 digits (4 and
5 beyond, both models at 0); 1..5 digits with 1000 think-first steps: the think-first model lost to the direct
one at 3..5 digits (-7.2 overall); 1..4 digits drawn independently: the direct model at 5% and 9%
on 2-digit sums in seeds 0 and 1 (gap roughly flat). "0 numpy" is seed 0 again with
``REFIMPL_BACKEND=numpy`` (the default picks Numba kernels for the larger calls): the direct model's
2-digit accuracy moves by 31 points with the rounding, the conclusions do not; a rerun with the
default backend reproduced seed 0 exactly. Time: ~870 s per seed on a machine shared with other
jobs (2 cores, load ~5; ~1400 s at load 7 to 10); not measured on an idle machine.
"""

from __future__ import annotations

import time

import numpy as np

from .._validate import check_integer
from ..model.transformer import init_params
from ..rl.rollout import evaluate
from ..rl.trainer import sft_train
from ..tasks import AdditionTask, eval_set, format_completion, make_dataset
from . import _cache
from ._cache import mean_se
from .r1 import SOURCES, r1_model_config

COT_SOURCES = SOURCES + ("recipes/cot.py",)
STEPS, DIRECT_STEPS = 3000, 5000     # the defaults: think first, direct
MAX_DIGITS = 9                       # AdditionTask's longest operands; their rows fit cot_model_config


def cot_model_config():
    """The R1 policy with 128 positions (RoPE, no learned positions): room for the longest row of
    :data:`MAX_DIGITS`-digit operands (``<bos>``, prompt, trace, answer, ``<eos>``: 114 tokens for
    ``999999999+999999999=``)."""
    return r1_model_config(max_position_embeddings=128)


def max_completion_tokens(digits: int) -> int:
    """The generation budget for ``digits``-digit operands: room for the longest trace and answer."""
    return 12 + 9 * digits


def direct_completion(answer: str) -> str:
    """The direct-answer target: ``<answer>answer</answer>``, no reasoning."""
    return f"<answer>{answer}</answer>"


def cot_data(n_train, seed, train_max_digits, eval_digits, eval_n, *, equal_lengths=True):
    """``(direct, think)``: the same ``n_train`` training prompts as (prompt, completion) pairs in the
    two styles, drawn with ``default_rng(seed)``; held-out prompts of every length in ``eval_digits``
    are excluded. ``equal_lengths``: both operands have ``d`` digits, ``d`` uniform in
    1..``train_max_digits`` (repeats allowed: there are only 100 one-digit prompts); else each
    operand has 1..``train_max_digits`` digits independently (distinct prompts)."""
    task = AdditionTask(1, train_max_digits)
    banned = {e.prompt for d in eval_digits for e in eval_set(AdditionTask(d, d), eval_n)}
    rng = np.random.default_rng(seed)
    if equal_lengths:
        by_length = [AdditionTask(d, d) for d in range(1, train_max_digits + 1)]
        exs = []
        while len(exs) < n_train:
            e = by_length[int(rng.integers(0, train_max_digits))].sample(rng)
            if e.prompt not in banned:
                exs.append(e)
    else:
        pool = make_dataset(task, n_train + len(banned), rng)
        exs = [e for e in pool if e.prompt not in banned][:n_train]
    direct = [(e.prompt, direct_completion(e.answer)) for e in exs]
    think = [(e.prompt, format_completion(task.chain_of_thought(e.prompt), e.answer)) for e in exs]
    return direct, think


def cot_ablation_seed(steps, seed, progress, cache_dir, *, direct_steps, n_train, train_max_digits, eval_digits,
                      eval_n, batch_size, lr, equal_lengths):
    """One seed of :func:`cot_ablation_run` (arguments as there, checked by it), cached under its own key.

    Returns ``dict(accuracy_with_cot, accuracy_without_cot, gap, accuracy_{with,without}_cot_{seen,beyond},
    per_length, tokens, history, samples, seconds, cached)``.
    """
    config = cot_model_config()
    args = dict(steps=steps, direct_steps=direct_steps, seed=seed, n_train=n_train, train_max_digits=train_max_digits,
                eval_digits=eval_digits, eval_n=eval_n, batch_size=batch_size, lr=lr, equal_lengths=equal_lengths)
    key = _cache.cache_key("cot_ablation", args, COT_SOURCES)
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, ["direct", "think"])) is not None:
        return {**hit[1], "cached": True}
    t0 = time.perf_counter()
    pairs = cot_data(n_train, seed, train_max_digits, eval_digits, eval_n, equal_lengths=equal_lengths)
    data = dict(zip(("direct", "think"), pairs, strict=True))
    init = init_params(config, np.random.default_rng(seed), np.float32)
    trained, history, tokens = {}, {}, {}
    for style, pairs in data.items():
        n = direct_steps if style == "direct" else steps
        out = sft_train(init, config, pairs, steps=n, batch_size=batch_size, lr=lr,
                        warmup_steps=min(50, n), seed=seed, progress=progress)
        trained[style], history[style] = out["params"], [float(x) for x in out["history"]["lm_loss"]]
        tokens[style] = int(out["tokens"])
    rows, samples = [], {}
    for d in eval_digits:
        acc = {}
        for style in ("direct", "think"):
            ev = evaluate(trained[style], config, AdditionTask(d, d), n=eval_n, max_new_tokens=max_completion_tokens(d))
            acc[style] = ev["accuracy"]
            samples[f"{style}/{d}"] = [(s["prompt"], s["completion"], s["correct"]) for s in ev["samples"][:3]]
        rows.append({"digits": d, "with_cot": acc["think"], "without_cot": acc["direct"],
                     "gap": acc["think"] - acc["direct"], "beyond_training": d > train_max_digits})
    meta = _cache.plain({**summarise(rows), "per_length": rows, "tokens": tokens, "history": history,
                         "samples": samples, "seconds": time.perf_counter() - t0})
    if cache_dir is not None:
        _cache.save(cache_dir, key, trained, meta)
    return {**meta, "cached": False}


def summarise(rows) -> dict:
    """The mean accuracies of ``per_length`` rows: ``accuracy_with_cot``, ``accuracy_without_cot`` and
    ``gap`` over all lengths, and the same with the suffix ``_seen`` (lengths within the training
    lengths) and ``_beyond`` (longer ones); NaN where there are no such lengths."""
    out = {}
    for where, sel in (("", rows), ("_seen", [r for r in rows if not r["beyond_training"]]),
                       ("_beyond", [r for r in rows if r["beyond_training"]])):
        for key, name in (("with_cot", "accuracy_with_cot"), ("without_cot", "accuracy_without_cot"), ("gap", "gap")):
            out[name + where] = float(np.mean([r[key] for r in sel])) if sel else float("nan")
    return out


def cot_ablation_run(steps=STEPS, seed=0, progress=True, cache_dir=None, *, seeds=1, direct_steps=DIRECT_STEPS,
                     n_train=20000, train_max_digits=4, eval_digits=(2, 3, 4, 5, 6), eval_n=64, batch_size=32,
                     lr=3e-3, equal_lengths=True):
    """Direct answer vs think first, with the same model and data (see the module docstring), for the
    seeds ``seed, seed + 1, ..., seed + seeds - 1``.

    For each seed both models start from ``init_params(config, default_rng(seed))`` and are trained by
    :func:`~refimpl.rl.trainer.sft_train` (``steps`` steps for think first, ``direct_steps`` for
    direct) on ``batch_size`` rows drawn with the same seed (loss on the completion only), learning
    rate ``lr`` with warmup and cosine decay, on ``n_train`` problems whose operands have
    1..``train_max_digits`` digits (both the same number, unless ``equal_lengths`` is False; see
    :func:`cot_data`). Evaluation: greedy, ``eval_n`` held-out problems per number of
    digits in ``eval_digits``.

    Returns a dict: ``accuracy_with_cot``, ``accuracy_without_cot`` and ``gap`` (held-out accuracy,
    mean over all the lengths), the same with the suffixes ``_seen`` (lengths within the training
    lengths) and ``_beyond`` (longer ones; NaN if none), each a mean over the seeds with its standard
    error ``<name>_se`` (sample std / √seeds; 0 for one seed); ``per_length``, a list of
    ``dict(digits, beyond_training, with_cot, without_cot, gap)`` with their ``_se``; ``per_seed``,
    each seed's ``dict(seed, <the means>, per_length, tokens)``; ``tokens`` (the real tokens each
    model trained on), ``history`` (the two training-loss curves) and ``samples`` (a few greedy
    completions per model and length) of the first seed; ``steps``, ``seeds``, ``train_max_digits``,
    ``seconds`` (all seeds) and ``cached`` (every seed loaded from ``cache_dir``).
    """
    for name, v, low in (("steps", steps, 0), ("direct_steps", direct_steps, 0), ("n_train", n_train, 1),
                         ("eval_n", eval_n, 1), ("seeds", seeds, 1), ("seed", seed, 0)):
        check_integer(name, v, low=low)
    check_integer("train_max_digits", train_max_digits, low=1, high=MAX_DIGITS)
    eval_digits = tuple(int(d) for d in eval_digits)
    if not eval_digits or not all(1 <= d <= MAX_DIGITS for d in eval_digits):
        raise ValueError(f"eval_digits: expected lengths in 1..{MAX_DIGITS} (AdditionTask), got {eval_digits!r}")
    runs = [cot_ablation_seed(steps, seed + i, progress, cache_dir, direct_steps=direct_steps, n_train=n_train,
                              train_max_digits=train_max_digits, eval_digits=eval_digits, eval_n=eval_n,
                              batch_size=batch_size, lr=lr, equal_lengths=equal_lengths)
            for i in range(seeds)]
    names = list(summarise(runs[0]["per_length"]))
    out = {}
    for name in names:
        out[name], out[f"{name}_se"] = mean_se([r[name] for r in runs])
    per_length = []
    for j, d in enumerate(eval_digits):
        row = {"digits": d, "beyond_training": d > train_max_digits}
        for key in ("with_cot", "without_cot", "gap"):
            row[key], row[f"{key}_se"] = mean_se([r["per_length"][j][key] for r in runs])
        per_length.append(row)
    per_seed = [{"seed": seed + i, **{n: r[n] for n in names}, "per_length": r["per_length"], "tokens": r["tokens"]}
                for i, r in enumerate(runs)]
    return {**out, "per_length": per_length, "per_seed": per_seed, "seeds": seeds,
            "steps": {"think": steps, "direct": direct_steps}, "train_max_digits": train_max_digits,
            "tokens": runs[0]["tokens"], "history": runs[0]["history"], "samples": runs[0]["samples"],
            "seconds": float(sum(r["seconds"] for r in runs)), "cached": all(r["cached"] for r in runs)}
