r"""Rollouts for RL on the toy tasks: sampling completions, the loss's batch layout, evaluation, rejection sampling.

Shared by the GRPO trainer (:mod:`refimpl.rl.trainer`) and the R1 recipes. Prompts are encoded
as ``<bos> prompt`` with :data:`refimpl.tasks.TOKENIZER`; completions are sampled with the latent
KV cache (:func:`refimpl.model.generate`) and stop at ``<eos>``. A completion's text is decoded
without its final ``<eos>``; stray control tokens stay visible in it, so they fail the format
check instead of silently vanishing.

* :func:`collect_rollouts` — one GRPO step's sampled, scored (:func:`score_completions`) and
  (DAPO) filtered groups;
* :class:`RolloutBatch` — right-padded ``<bos> prompt completion`` rows and the positions whose
  logits predict each completion token (``p_i + t - 1``), with the loss mask;
* :func:`completion_logps` — log-probs of the sampled tokens under a policy (π_old, π_ref);
* :func:`evaluate` — held-out accuracy / format / length, greedy by default;
* :func:`rejection_sample` — DeepSeek-R1 §2.3.3's filter: keep correct, well-formatted samples.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_integer
from ..model.generate import generate
from ..model.transformer import model_forward
from ..tasks import EVAL_SIZE, TOKENIZER, eval_set
from .logprobs import logps_entropy_forward
from .rewards import accuracy_reward, combine_rewards, format_reward, language_consistency_reward, overlong_penalty


def check_policy(params, config, name="params"):
    """A policy for the toy tasks: a refimpl parameter tree whose vocabulary holds :data:`refimpl.tasks.TOKENIZER`'s."""
    if not isinstance(params, dict) or "lm_head" not in params or "model" not in params:
        raise TypeError(f"{name}: expected a parameter tree from refimpl.model.init_params")
    if config.vocab_size < TOKENIZER.vocab_size:
        raise ValueError(f"config.vocab_size: expected >= {TOKENIZER.vocab_size} (refimpl.tasks.TOKENIZER), "
                         f"got {config.vocab_size}")


def check_task(task):
    """A :mod:`refimpl.tasks` task: an object with ``sample``, ``check`` and ``name``."""
    for attr in ("sample", "check", "name"):
        if not hasattr(task, attr):
            raise TypeError(f"task: expected a refimpl.tasks task (with sample/check/name), got {type(task).__name__}")


def draw_prompts(task, n, rng, banned):
    """``n`` training examples drawn with ``rng``, never one of the held-out prompts."""
    out = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            return out
        ex = task.sample(rng)
        if ex.prompt not in banned:
            out.append(ex)
    raise ValueError(f"task: could not draw {n} prompts outside the held-out set")


def completion_text(tokens):
    """Decoded completion without its final ``<eos>``; stray control tokens stay visible (and fail
    the format check) instead of being silently dropped."""
    toks = np.asarray(tokens)
    if toks.size and toks[-1] == TOKENIZER.eos_id:
        toks = toks[:-1]
    return TOKENIZER.decode(toks, skip_special_tokens=False)


def sample_completions(params, config, prompts, G, max_new, temperature, top_p, rng, backend):
    """``G`` completions for each prompt (rows ``i * G .. i * G + G - 1``): list of 1-D token arrays."""
    ids = [TOKENIZER.encode(p, add_bos=True) for p in prompts for _ in range(G)]
    outs = generate(params, config, ids, max_new, temperature=temperature, top_p=top_p, rng=rng,
                    stop_tokens=[TOKENIZER.eos_id], pad_id=TOKENIZER.pad_id, backend=backend)
    return ids, [o[len(p):] for o, p in zip(outs, ids, strict=True)]


def score_completions(task, texts, answers, lengths, cfg):
    """The GRPO reward of each completion: accuracy and format (:mod:`refimpl.rl.rewards`) weighted by
    ``cfg.reward_weights``, plus DAPO's overlong penalty (``cfg.soft_punish_cache``) and R1's language
    consistency (``cfg.language_weight``) when enabled. Returns ``(accuracy (B,), format (B,), total (B,))``."""
    acc = accuracy_reward(texts, answers, check=task.check)            # (B,)
    fmt = format_reward(texts)                                          # (B,)
    total = combine_rewards(np.stack([acc, fmt], axis=1), cfg.reward_weights)  # (B,)
    if cfg.soft_punish_cache:
        total = total + overlong_penalty(np.asarray(lengths, dtype=np.int64),
                                         max_completion_len=cfg.max_completion_length,
                                         soft_punish_cache=cfg.soft_punish_cache)
    if cfg.language_weight:   # R1 §2.3.2: the share of the CoT in the target language, added to the reward
        total = total + cfg.language_weight * language_consistency_reward(texts, alphabet=cfg.language_alphabet)
    return acc, fmt, total


def collect_rollouts(params, config, task, cfg, rng, banned):
    """Sample, score and (with ``cfg.dynamic_sampling``, DAPO §3.2) filter one GRPO step's batch.

    Returns ``(prompt_ids, completions, rewards (B,), rounds, first, sample)``: the kept groups'
    rows, the number of generation rounds, the metrics of the *first* round (an unbiased sample of
    the current policy) and its first completion as a ``sample`` dict.
    """
    P, G = cfg.prompts_per_step, cfg.num_generations
    kept_ids, kept_comp, kept_r, rounds, first = [], [], [], 0, None
    while True:
        rounds += 1
        exs = draw_prompts(task, P, rng, banned)
        ids, comps = sample_completions(params, config, [e.prompt for e in exs], G, cfg.max_completion_length,
                                        cfg.temperature, cfg.top_p, rng, cfg.backend)
        texts = [completion_text(c) for c in comps]
        answers = [e.answer for e in exs for _ in range(G)]
        acc, fmt, total = score_completions(task, texts, answers, [len(c) for c in comps], cfg)
        r = total.reshape(P, G)                                         # (P, G)
        flat = ~(r.max(axis=1) > r.min(axis=1))                         # (P,) zero-std groups
        if first is None:
            lens = np.array([len(c) for c in comps])
            ended = np.array([len(c) > 0 and c[-1] == TOKENIZER.eos_id for c in comps])
            first = {"reward": float(total.mean()), "accuracy": float(acc.mean()), "format": float(fmt.mean()),
                     "completion_length": float(lens.mean()), "truncated": float(np.mean(~ended)),
                     "frac_reward_zero_std": float(flat.mean())}
            sample = {"prompt": exs[0].prompt, "completion": texts[0], "reward": float(total[0])}
        keep = ~flat if cfg.dynamic_sampling else np.ones(P, bool)
        for g in np.flatnonzero(keep):
            rows = range(g * G, (g + 1) * G)
            kept_ids += [ids[i] for i in rows]
            kept_comp += [comps[i] for i in rows]
            kept_r.append(total[g * G:(g + 1) * G])
        if not cfg.dynamic_sampling or len(kept_r) >= P or rounds > cfg.max_resample_rounds:
            break
    kept_r = kept_r[:P]
    n = len(kept_r) * G
    return kept_ids[:n], kept_comp[:n], (np.concatenate(kept_r) if kept_r else np.zeros(0)), rounds, first, sample


class RolloutBatch:
    """A rollout batch laid out for the loss: right-padded full rows and completion-aligned indices.

    ``prompt_ids``: list of B 1-D token arrays (``<bos>`` included); ``completions``: list of B
    1-D arrays of sampled tokens (ending in ``<eos>`` unless cut at ``max_completion_length``);
    ``cfg``: the :class:`~refimpl.rl.trainer.GRPOConfig` (its ``max_completion_length`` and
    ``mask_truncated_completions`` are used). Attributes: ``ids`` (B, T) rows, ``comp`` (B, Tc)
    completion tokens, ``mask`` (B, Tc) loss mask (truncated rows zeroed if
    ``mask_truncated_completions``), ``truncated`` (B,), ``pos`` (B, Tc) the row position whose
    logits predict each completion token.
    """

    def __init__(self, prompt_ids, completions, cfg):
        if len(prompt_ids) != len(completions) or not completions:
            raise ValueError(f"completions: expected {len(prompt_ids)} completions (one per prompt row, at least "
                             f"one), got {len(completions)}")
        if any(len(c) == 0 for c in completions) or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("completions: every prompt and completion needs at least one token")
        B = len(completions)
        self.lp = np.array([len(p) for p in prompt_ids])                # (B,) prompt lengths
        self.lc = np.array([len(c) for c in completions])               # (B,) completion lengths
        T, Tc = int((self.lp + self.lc).max()), int(self.lc.max())
        self.ids = np.full((B, T), TOKENIZER.pad_id, dtype=np.int64)     # (B, T) right-padded rows
        self.comp = np.full((B, Tc), TOKENIZER.pad_id, dtype=np.int64)   # (B, Tc)
        for i, (p, c) in enumerate(zip(prompt_ids, completions, strict=True)):
            self.ids[i, :len(p)], self.ids[i, len(p):len(p) + len(c)] = p, c
            self.comp[i, :len(c)] = c
        t = np.arange(Tc)
        self.mask = t[None, :] < self.lc[:, None]                        # (B, Tc)
        ended = np.array([len(c) > 0 and c[-1] == TOKENIZER.eos_id for c in completions])  # (B,)
        self.truncated = ~ended & (self.lc >= cfg.max_completion_length)  # (B,)
        if cfg.mask_truncated_completions:
            self.mask &= ~self.truncated[:, None]
        # position p_i + t - 1 predicts completion token t; padded t are clipped to T - 1, which no real
        # token uses (the longest row's last real prediction is at T - 2), so the scatter below is exact
        self.pos = np.minimum(self.lp[:, None] + t[None, :] - 1, T - 1)  # (B, Tc)
        self.rows = np.arange(B)[:, None]                                # (B, 1)

    def gather(self, logits):
        """Completion-aligned logits. Shapes: (B, T, V) -> (B, Tc, V)."""
        return logits[self.rows, self.pos]                              # (B, Tc, V)

    def scatter(self, dlc, shape):
        """Adjoint of :meth:`gather`. Shapes: (B, Tc, V) -> (B, T, V)."""
        dlogits = np.zeros(shape, dtype=dlc.dtype)                      # (B, T, V)
        dlogits[self.rows, self.pos] = dlc
        return dlogits


def completion_logps(params, config, batch, temperature, backend=None):
    """Per-token log-probs of the sampled completion tokens under ``params`` (no gradient)."""
    logits = model_forward(batch.ids, params, config, backend=backend)[0]  # (B, T, V)
    return logps_entropy_forward(batch.gather(logits), batch.comp, temperature=temperature,
                                 backend=backend)[0]                                   # (B, Tc)


def evaluate(params, config, task, n=128, temperature=0.0, *, max_new_tokens=48, seed=0, backend=None):
    """Held-out evaluation on the first ``n`` prompts of :func:`refimpl.tasks.eval_set` (greedy by default).

    Returns ``dict(accuracy, format, mean_length, samples)``: the fraction of completions whose
    ``<answer>`` passes ``task.check``, the fraction matching :func:`refimpl.rl.format_reward`,
    the mean completion length in tokens (``<eos>`` included), and per prompt a dict
    ``prompt, completion, answer, correct, formatted``. ``temperature > 0`` samples with
    ``default_rng(seed)``.
    """
    check_policy(params, config)
    check_task(task)
    check_integer("n", n, low=1)
    exs = eval_set(task, max(n, EVAL_SIZE))[:n]                        # the same prefix for every n
    rng = np.random.default_rng(seed) if temperature else None
    _, comps = sample_completions(params, config, [e.prompt for e in exs], 1, max_new_tokens, temperature, 1.0,
                                   rng, backend)
    texts = [completion_text(c) for c in comps]
    acc = accuracy_reward(texts, [e.answer for e in exs], check=task.check)  # (n,)
    fmt = format_reward(texts)                                          # (n,)
    samples = [{"prompt": e.prompt, "completion": t, "answer": e.answer, "correct": bool(a), "formatted": bool(f)}
               for e, t, a, f in zip(exs, texts, acc, fmt, strict=True)]
    return {"accuracy": float(acc.mean()), "format": float(fmt.mean()),
            "mean_length": float(np.mean([len(c) for c in comps])), "samples": samples}


def rejection_sample(params, config, task, n_prompts, G, *, temperature=1.0, top_p=1.0, max_completion_length=48,
                     seed=0, max_per_prompt=None, backend=None):
    """Rejection sampling (DeepSeek-R1 §2.3.3): sample ``G`` completions for each of ``n_prompts``
    fresh training prompts (never held-out ones) and keep the distinct ones that are correct *and*
    well formatted (:func:`refimpl.rl.accuracy_reward`, :func:`refimpl.rl.format_reward`).

    Returns a list of ``(prompt, completion)`` pairs (at most ``max_per_prompt`` per prompt; None =
    all distinct ones), ready for :func:`sft_train`.
    """
    check_policy(params, config)
    check_task(task)
    for name, v in (("n_prompts", n_prompts), ("G", G), ("max_completion_length", max_completion_length)):
        check_integer(name, v, low=1)
    if max_per_prompt is not None:
        check_integer("max_per_prompt", max_per_prompt, low=1)
    rng = np.random.default_rng(seed)
    exs = draw_prompts(task, n_prompts, rng, {e.prompt for e in eval_set(task)})
    _, comps = sample_completions(params, config, [e.prompt for e in exs], G, max_completion_length, temperature,
                                   top_p, rng, backend)
    texts = [completion_text(c) for c in comps]
    ok = (accuracy_reward(texts, [e.answer for e in exs for _ in range(G)], check=task.check) > 0) \
        & (format_reward(texts) > 0)                                    # (n_prompts * G,)
    kept = []
    for i, e in enumerate(exs):
        seen = []
        for j in range(i * G, (i + 1) * G):
            if ok[j] and texts[j] not in seen and (max_per_prompt is None or len(seen) < max_per_prompt):
                seen.append(texts[j])
        kept += [(e.prompt, t) for t in seen]
    return kept
