r"""Does thinking first help? The same tiny model trained to answer directly, and to think first.

The claim behind chain-of-thought reasoning (DeepSeek-R1 §1, §2.2: "the model ... first thinks
about the reasoning process in the mind and then provides the user with the answer"), measured in
miniature. Two copies of one initialisation of the R1 policy (:func:`~refimpl.recipes.r1.r1_model_config`,
~100k parameters) are fine-tuned on the same training problems (the same prompts, drawn in the
same order) with the same batch size and learning rate, and differ in their targets:

* **direct**: ``47+85=`` → ``<answer>132</answer>`` — the answer in one go, "in the head";
* **think first**: ``47+85=`` → ``<think>7+5=12,4+8+1=13</think><answer>132</answer>`` — the
  column sums, least significant first, carries written (:class:`~refimpl.tasks.AdditionTask`).

The direct model gets ``direct_steps`` (5×) the think-first model's ``steps``: an answer of a few
tokens carries little training signal per example, and with equal steps the direct model learns
nothing at all (an earlier version of this recipe: 0.5% at every length), which says little about
*length*. With the larger budget it learns the short sums, and the comparison is about how
accuracy falls with the number of digits. Both are evaluated greedily on held-out problems whose
two operands both have ``d`` digits, for each ``d`` in ``eval_digits``, including lengths longer
than any training problem (``train_max_digits``); held-out prompts are kept out of the training data.

Why the gap should grow with length: a direct answer must produce the leading digit first, and
it depends on every carry below it, all computed in one forward pass; the trace turns the sum
into a chain of one-digit additions, each depending only on two prompt digits and the previous
carry, the same work at every length.

**Measured** (``python -m refimpl cot-ablation``, defaults: 20000 training problems of 1..3 digits
per operand, 1000 steps of 32 rows for think first and 5000 for direct, 64 held-out problems per
length, seed 0): think first 98.4% and 89.1% at 2 and 3 digits, direct 93.8% and 39.1%: the gap
grows from 5 to 50 points. Beyond the training lengths (4 and 5 digits) both score 0%: neither
model generalises to numbers longer than it has seen. Over the trained lengths 93.8% against
66.4%; over all four lengths 46.9% against 33.2%.
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
from .r1 import SOURCES, r1_model_config

COT_SOURCES = SOURCES + ("recipes/cot.py",)


def cot_model_config():
    """The R1 policy with room for 7-digit traces (``max_position_embeddings=128``; RoPE, no learned positions)."""
    return r1_model_config(max_position_embeddings=128)


def direct_completion(answer: str) -> str:
    """The direct-answer target: ``<answer>answer</answer>``, no reasoning."""
    return f"<answer>{answer}</answer>"


def cot_data(n_train, seed, train_max_digits, eval_digits, eval_n):
    """``(direct, think)``: the same ``n_train`` training prompts as (prompt, completion) pairs in the
    two styles. Operands have 1..``train_max_digits`` digits (independently); held-out prompts of
    every length in ``eval_digits`` are excluded."""
    task = AdditionTask(1, train_max_digits)
    banned = {e.prompt for d in eval_digits for e in eval_set(AdditionTask(d, d), eval_n)}
    pool = make_dataset(task, n_train + len(banned), np.random.default_rng(seed))
    exs = [e for e in pool if e.prompt not in banned][:n_train]
    direct = [(e.prompt, direct_completion(e.answer)) for e in exs]
    think = [(e.prompt, format_completion(task.chain_of_thought(e.prompt), e.answer)) for e in exs]
    return direct, think


def cot_ablation_run(steps=1000, seed=0, progress=True, cache_dir=None, *, direct_steps=5000, n_train=20000,
                     train_max_digits=3, eval_digits=(2, 3, 4, 5), eval_n=64, batch_size=32, lr=3e-3):
    """Direct answer vs think first, with the same model and data (see the module docstring).

    Both models start from ``init_params(config, default_rng(seed))`` and are trained by
    :func:`~refimpl.rl.trainer.sft_train` (``steps`` steps for think first, ``direct_steps`` for
    direct) on ``batch_size`` rows drawn with the same seed (loss on the completion only), learning
    rate ``lr`` with warmup and cosine decay. Evaluation: greedy, ``eval_n`` held-out problems per
    number of digits.

    Returns ``dict(accuracy_with_cot, accuracy_without_cot, gap, accuracy_with_cot_seen,
    accuracy_without_cot_seen, accuracy_with_cot_beyond, accuracy_without_cot_beyond, steps,
    per_length, train_max_digits, history, samples, seconds, cached)``: held-out accuracies
    (mean over the lengths: all of them, those within the training lengths, those beyond; NaN
    if there are none),
    ``per_length`` a list of ``dict(digits, with_cot, without_cot, beyond_training)``, ``history``
    the two training-loss curves, ``samples`` a few greedy completions of each model at each length.
    """
    for name, v, low in (("steps", steps, 0), ("direct_steps", direct_steps, 0), ("n_train", n_train, 1),
                         ("eval_n", eval_n, 1), ("train_max_digits", train_max_digits, 1)):
        check_integer(name, v, low=low)
    eval_digits = tuple(int(d) for d in eval_digits)
    if not eval_digits or not all(1 <= d <= 7 for d in eval_digits):
        raise ValueError(f"eval_digits: expected lengths in 1..7 (128 positions), got {eval_digits!r}")
    config = cot_model_config()
    args = dict(steps=steps, direct_steps=direct_steps, seed=seed, n_train=n_train, train_max_digits=train_max_digits,
                eval_digits=eval_digits,
                eval_n=eval_n, batch_size=batch_size, lr=lr)
    key = _cache.cache_key("cot_ablation", args, COT_SOURCES)
    if cache_dir is not None and (hit := _cache.load(cache_dir, key, config, ["direct", "think"])) is not None:
        return {**hit[1], "cached": True}
    t0 = time.perf_counter()
    data = dict(zip(("direct", "think"), cot_data(n_train, seed, train_max_digits, eval_digits, eval_n), strict=True))
    init = init_params(config, np.random.default_rng(seed), np.float32)
    trained, history = {}, {}
    for style, pairs in data.items():
        n = direct_steps if style == "direct" else steps
        out = sft_train(init, config, pairs, steps=n, batch_size=batch_size, lr=lr,
                        warmup_steps=min(50, n), seed=seed, progress=progress)
        trained[style], history[style] = out["params"], [float(x) for x in out["history"]["lm_loss"]]
    rows, samples = [], {}
    for d in eval_digits:
        acc = {}
        for style in ("direct", "think"):
            ev = evaluate(trained[style], config, AdditionTask(d, d), n=eval_n, max_new_tokens=12 + 9 * d)
            acc[style] = ev["accuracy"]
            samples[f"{style}/{d}"] = [(s["prompt"], s["completion"], s["correct"]) for s in ev["samples"][:3]]
        rows.append({"digits": d, "with_cot": acc["think"], "without_cot": acc["direct"],
                     "beyond_training": d > train_max_digits})
    with_cot = float(np.mean([r["with_cot"] for r in rows]))
    without = float(np.mean([r["without_cot"] for r in rows]))
    seen = {k: [r[k] for r in rows if not r["beyond_training"]] for k in ("with_cot", "without_cot")}
    beyond = {k: [r[k] for r in rows if r["beyond_training"]] for k in ("with_cot", "without_cot")}
    meta = _cache.plain({"accuracy_with_cot": with_cot, "accuracy_without_cot": without, "gap": with_cot - without,
                         **{f"accuracy_{k}_{where}": float(np.mean(v[k])) if v[k] else float("nan")
                            for where, v in (("seen", seen), ("beyond", beyond)) for k in v},
                         "steps": {"think": steps, "direct": direct_steps}, "per_length": rows,
                         "train_max_digits": train_max_digits, "history": history,
                         "samples": samples, "seconds": time.perf_counter() - t0})
    if cache_dir is not None:
        _cache.save(cache_dir, key, trained, meta)
    return {**meta, "cached": False}
