r"""The GRPO trainer: rollouts, rewards, group advantages, π_old / π_ref, clipped updates (DeepSeekMath §4.1).

One training step (DeepSeekMath Algorithm 1; DeepSeek-R1 §2.2; TRL ``GRPOTrainer`` semantics):

1. draw ``prompts_per_step`` prompts from the task (never a held-out one, :func:`refimpl.tasks.eval_set`);
2. sample ``num_generations`` (G) completions per prompt with the latent KV cache
   (:func:`refimpl.model.generate`, temperature τ, nucleus ``top_p``, stop at ``<eos>``);
3. score them with the rule-based rewards (:mod:`refimpl.rl.rewards`: accuracy, format, weighted
   by ``reward_weights``) and turn the scores into group-relative advantages
   (:func:`refimpl.rl.group_advantages`); with ``dynamic_sampling`` (DAPO §3.2) groups whose
   rewards are all equal are dropped and more prompts are sampled until the batch is full;
4. compute the log-probs of the sampled tokens under π_old (the sampling policy, only needed
   when ``num_iterations > 1``) and π_ref (only when ``beta != 0``) with
   :func:`refimpl.model.model_forward` at temperature τ;
5. ``num_iterations`` times: forward the policy, :func:`refimpl.rl.grpo_loss_from_logits` gives
   the loss and its gradient with respect to the logits, :func:`refimpl.model.model_backward`
   carries it to every parameter, the global gradient norm is clipped and AdamW
   (:mod:`refimpl.optim`) takes a step.

Sequences are right-padded ``<bos> prompt completion`` rows; position ``p_i + t - 1`` of row ``i``
(prompt length ``p_i``) predicts completion token ``t``, so the trainer gathers those logits into a
(B, T_c, V) block, and the gradient is scattered back. A completion's mask covers its tokens up to
and including ``<eos>``; a completion cut at ``max_completion_length`` without ``<eos>`` is masked
out entirely when ``mask_truncated_completions`` (DAPO §3.4 "overlong filtering").

Deliberate simplifications, each documented where it happens: one process, no gradient
accumulation (so TRL's normalisers are exact, see :mod:`refimpl.rl.grpo`); the MoE router's
``e_score_correction_bias`` stays frozen during RL and no balance loss is added; the MTP modules, if
present, are not trained by RL. Every random draw comes from one ``numpy.random.Generator`` seeded by
``seed``: the same seed gives the same history and parameters, bit for bit.

Rollout helpers, :func:`evaluate` and :func:`rejection_sample` live in :mod:`refimpl.rl.rollout` and
are re-exported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from .._validate import BACKENDS, check_betas, check_bool, check_choice, check_integer, check_real
from ..core import IGNORE_INDEX
from ..model.train import TrainConfig, init_state, train
from ..model.transformer import model_backward, model_forward
from ..optim import adamw_init, adamw_update, clip_grad_norm, default_decay_mask
from ..tasks import EVAL_SIZE, TOKENIZER, eval_set
from ..tree import tree_map
from .advantages import SCALE_REWARDS, group_advantages
from .grpo import IS_LEVELS, KL_ESTIMATORS, grpo_loss_from_logits
from .loss_types import loss_options
from .rewards import accuracy_reward, combine_rewards, format_reward, language_consistency_reward, overlong_penalty
from .rollout import (  # noqa: F401 - evaluate, rejection_sample, RolloutBatch, completion_logps: part of this API
    RolloutBatch,
    _check_policy,
    _check_task,
    _completion_text,
    _draw_prompts,
    _sample_completions,
    completion_logps,
    evaluate,
    rejection_sample,
)
from .stable import (
    check_stable_options,
    policy_logps,
    routing_drift,
    sampling_record,
    uses_stable,
    v32_grpo_loss_from_logits,
)

REWARD_NAMES = ("accuracy", "format")


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings, with TRL ``GRPOConfig`` names where TRL has the option.

    Sampling: ``num_generations`` G completions per prompt, ``prompts_per_step`` prompts per step
    (batch B = prompts_per_step * G), ``max_completion_length`` new tokens at most, ``temperature``
    τ and ``top_p``. Optimisation: ``steps`` generation steps, each followed by ``num_iterations``
    AdamW updates on the same batch (π_old = the sampling policy, reused; TRL's μ), ``lr``,
    ``warmup_steps`` (linear warmup, then constant), ``betas``, ``weight_decay``,
    ``max_grad_norm``. Loss: ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ``beta``,
    ``kl_estimator``, ``importance_sampling_level``, ``entropy_coef`` — as
    :func:`refimpl.rl.grpo_loss`. Rewards: ``reward_weights`` for (accuracy, format),
    ``scale_rewards`` for :func:`refimpl.rl.group_advantages`, ``soft_punish_cache`` > 0 adds
    DAPO's overlong penalty with that buffer. ``dynamic_sampling``: DAPO's filter of zero-std
    groups with at most ``max_resample_rounds`` extra generation rounds per step. ``eval_n``:
    held-out prompts for the periodic greedy evaluation. ``backend``: ``"numpy"``/``"numba"``/None.
    DeepSeek-V3.2 §3.1 (:mod:`refimpl.rl.stable`): ``use_bias_correction_kl``,
    ``off_policy_mask_threshold`` (TRL's names), ``keep_routing``, ``keep_sampling_mask``.
    ``language_weight`` > 0 adds R1's language-consistency reward (§2.3.2) with that weight: the
    share of the ``<think>`` text's characters in ``language_alphabet``
    (:func:`refimpl.rl.language_consistency_reward`).

    Defaults: DAPO's token-level loss and clip-higher (ε_lo 0.2, ε_hi 0.28) with β = 0 (no
    reference model, as DAPO and TRL's default; R1 used β = 0.001), G = 8, and a learning rate
    measured on the ~100k-parameter policy of :mod:`refimpl.recipes.r1` (LLM recipes use ~1e-6;
    at 2e-3 Adam's sign-like first steps wreck the pretrained policy within ten steps).
    """

    num_generations: int = 8
    prompts_per_step: int = 16
    max_completion_length: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    steps: int = 100
    lr: float = 3e-4
    warmup_steps: int = 0
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_iterations: int = 1
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = 0.28
    delta: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    importance_sampling_level: str = "token"
    entropy_coef: float = 0.0
    scale_rewards: str = "group"
    reward_weights: tuple = (1.0, 0.5)
    soft_punish_cache: int = 0
    dynamic_sampling: bool = False
    max_resample_rounds: int = 4
    mask_truncated_completions: bool = True
    eval_n: int = 128
    seed: int = 0
    backend: str | None = "numpy"
    # DeepSeek-V3.2 §3.1 (refimpl.rl.stable): unbiased KL, OPSM's delta, Keep Routing, Keep Sampling Mask
    use_bias_correction_kl: bool = False
    off_policy_mask_threshold: float | None = None
    keep_routing: bool = False
    keep_sampling_mask: bool = False
    language_weight: float = 0.0
    language_alphabet: str = "0123456789+=,"
    loss_options: dict | None = None   # the loss_type's own options (refimpl.rl.loss_types), e.g. SAPO's

    def __post_init__(self):
        check_integer("num_generations", self.num_generations)
        if self.num_generations < 2:
            raise ValueError(f"num_generations: expected >= 2 (a group of one has no baseline; its advantage "
                             f"is always 0 with scale_rewards={self.scale_rewards!r}), got {self.num_generations}")
        for name, low in (("prompts_per_step", 1), ("max_completion_length", 1), ("steps", 0), ("warmup_steps", 0),
                          ("num_iterations", 1), ("soft_punish_cache", 0), ("max_resample_rounds", 0),
                          ("eval_n", 1), ("seed", 0)):
            check_integer(name, getattr(self, name), low=low)
        check_real("temperature", self.temperature, low=0.0, low_open=True)
        check_real("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        for name in ("lr", "weight_decay", "epsilon", "beta", "entropy_coef"):
            check_real(name, getattr(self, name), low=0.0)
        check_real("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.epsilon_high is not None:
            check_real("epsilon_high", self.epsilon_high, low=0.0)
        if self.delta is not None:
            check_real("delta", self.delta, low=0.0, low_open=True)
        check_bool("dynamic_sampling", self.dynamic_sampling)
        check_bool("mask_truncated_completions", self.mask_truncated_completions)
        loss_options(self.loss_type, self.loss_options)   # loss_type in the table, options declared by it
        check_choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS + (True, False))
        if not isinstance(self.reward_weights, tuple | list) or len(self.reward_weights) != len(REWARD_NAMES):
            raise ValueError(f"reward_weights: expected {len(REWARD_NAMES)} finite weights for {REWARD_NAMES}, "
                             f"got {self.reward_weights!r}")
        for name, w in zip(REWARD_NAMES, self.reward_weights, strict=True):
            check_real(f"reward_weights ({name})", w)
        check_betas("betas", self.betas)
        if self.soft_punish_cache > self.max_completion_length:
            raise ValueError(f"soft_punish_cache: expected <= max_completion_length={self.max_completion_length}, "
                             f"got {self.soft_punish_cache}")
        check_choice("backend", self.backend, BACKENDS)
        check_stable_options(self)
        check_real("language_weight", self.language_weight, low=0.0)
        if not isinstance(self.language_alphabet, str) or not self.language_alphabet:
            raise ValueError(f"language_alphabet: expected a non-empty str, got {self.language_alphabet!r}")

    def replace(self, **changes) -> GRPOConfig:
        """A copy with ``changes`` (unknown names raise ValueError)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"changes: unknown GRPOConfig field(s) {unknown}")
        return type(self)(**{**{n: getattr(self, n) for n in names}, **changes})


# ----------------------------------------------------------------------------------------------
# Rollouts and rewards
# ----------------------------------------------------------------------------------------------

def _score(task, texts, answers, lengths, gc):
    """Per-function rewards (B, 2) and their weighted total (B,)."""
    acc = accuracy_reward(texts, answers, check=task.check)            # (B,)
    fmt = format_reward(texts)                                          # (B,)
    total = combine_rewards(np.stack([acc, fmt], axis=1), gc.reward_weights)  # (B,)
    if gc.soft_punish_cache:
        total = total + overlong_penalty(np.asarray(lengths, dtype=np.int64),
                                         max_completion_len=gc.max_completion_length,
                                         soft_punish_cache=gc.soft_punish_cache)
    if gc.language_weight:   # R1 §2.3.2: the share of the CoT in the target language, added to the reward
        total = total + gc.language_weight * language_consistency_reward(texts, alphabet=gc.language_alphabet)
    return acc, fmt, total


def _rollout(params, config, task, gc, rng, banned):
    """Sample, score and (with dynamic sampling) filter one step's batch. Returns the batch pieces
    and the metrics of the *first* generation round (an unbiased sample of the current policy)."""
    P, G = gc.prompts_per_step, gc.num_generations
    kept_ids, kept_comp, kept_r, rounds, first = [], [], [], 0, None
    while True:
        rounds += 1
        exs = _draw_prompts(task, P, rng, banned)
        ids, comps = _sample_completions(params, config, [e.prompt for e in exs], G, gc.max_completion_length,
                                         gc.temperature, gc.top_p, rng, gc.backend)
        texts = [_completion_text(c) for c in comps]
        answers = [e.answer for e in exs for _ in range(G)]
        acc, fmt, total = _score(task, texts, answers, [len(c) for c in comps], gc)
        r = total.reshape(P, G)                                         # (P, G)
        flat = ~(r.max(axis=1) > r.min(axis=1))                         # (P,) zero-std groups
        if first is None:
            lens = np.array([len(c) for c in comps])
            ended = np.array([len(c) > 0 and c[-1] == TOKENIZER.eos_id for c in comps])
            first = {"reward": float(total.mean()), "accuracy": float(acc.mean()), "format": float(fmt.mean()),
                     "completion_length": float(lens.mean()), "truncated": float(np.mean(~ended)),
                     "frac_reward_zero_std": float(flat.mean())}
            sample = {"prompt": exs[0].prompt, "completion": texts[0], "reward": float(total[0])}
        keep = ~flat if gc.dynamic_sampling else np.ones(P, bool)
        for g in np.flatnonzero(keep):
            rows = range(g * G, (g + 1) * G)
            kept_ids += [ids[i] for i in rows]
            kept_comp += [comps[i] for i in rows]
            kept_r.append(total[g * G:(g + 1) * G])
        if not gc.dynamic_sampling or len(kept_r) >= P or rounds > gc.max_resample_rounds:
            break
    kept_r = kept_r[:P]
    n = len(kept_r) * G
    return kept_ids[:n], kept_comp[:n], (np.concatenate(kept_r) if kept_r else np.zeros(0)), rounds, first, sample


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _grads_like(grads, params):
    """Order the gradient tree like ``params`` (zeros for modules RL does not train, e.g. MTP)."""
    return {k: grads[k] if k in grads else tree_map(np.zeros_like, params[k]) for k in params}


def grpo_objective(params, config, batch, advantages, old_logps, ref_logps, gc, record=None):
    r"""The GRPO loss of a rollout batch and its gradient for every parameter (no update).

    :math:`J(\theta)` of :func:`refimpl.rl.grpo_loss_from_logits` (with ``gc``'s loss options and
    the sampling temperature) on the completion-aligned logits of :func:`refimpl.model.model_forward`;
    the gradient goes logits → :meth:`RolloutBatch.scatter` → :func:`refimpl.model.model_backward`.
    ``old_logps`` None means on-policy (ratio 1 in value); ``ref_logps`` is needed when β ≠ 0.
    ``record``: the batch's :class:`~refimpl.rl.stable.SamplingRecord`; with it the V3.2 options of
    ``gc`` apply (:func:`~refimpl.rl.stable.v32_grpo_loss_from_logits`) and ``info`` adds
    ``routing_drift`` (:func:`~refimpl.rl.stable.routing_drift` over the loss's tokens).

    Shapes: advantages (B,), old_logps / ref_logps (B, Tc) or None -> loss (), grads (params' tree), info.
    """
    routes = record.routes if record is not None and gc.keep_routing else None
    logits, cache, minfo = model_forward(batch.ids, params, config, backend=gc.backend, routes=routes)  # (B, T, V)
    kw = dict(temperature=gc.temperature, entropy_coef=gc.entropy_coef, loss_type=gc.loss_type, epsilon=gc.epsilon,
              epsilon_high=gc.epsilon_high, delta=gc.delta, beta=gc.beta, kl_estimator=gc.kl_estimator,
              importance_sampling_level=gc.importance_sampling_level, max_completion_length=gc.max_completion_length,
              **(gc.loss_options or {}))
    args = (batch.gather(logits), batch.comp, old_logps, ref_logps, advantages.astype(logits.dtype), batch.mask)
    if record is None:
        loss, dlc, info = grpo_loss_from_logits(*args, **kw)
    else:
        loss, dlc, info = v32_grpo_loss_from_logits(
            *args, sampling_mask=record.vocab_mask, sampling_logps=record.logps,
            use_bias_correction_kl=gc.use_bias_correction_kl, off_policy_mask_threshold=gc.off_policy_mask_threshold,
            **kw)
        counted = np.zeros(batch.ids.shape, bool)                       # (B, T) positions the loss reads
        counted[batch.rows, batch.pos] = batch.mask
        info["routing_drift"] = routing_drift(minfo["moe"], record.routes, params, config, counted)
    grads = _grads_like(model_backward(batch.scatter(dlc, logits.shape), cache), params)
    return loss, grads, info


def _rl_decay_mask(path, p):
    """AdamW's decay mask during RL: the default one, minus the MTP modules, which RL leaves untouched."""
    return default_decay_mask(path, p) and not path.startswith("mtp.")


def _update(params, opt, config, batch, adv, old, ref, gc, lr, record=None):
    """One AdamW update on a rollout batch: loss and gradients, clip, step."""
    loss, grads, info = grpo_objective(params, config, batch, adv, old, ref, gc, record)
    grads, norm = clip_grad_norm(grads, gc.max_grad_norm)
    params, opt = adamw_update(params, grads, opt, lr=lr, betas=tuple(gc.betas), weight_decay=gc.weight_decay,
                               decay_mask=_rl_decay_mask)
    info.update(loss=float(loss), grad_norm=norm)
    return params, opt, info


ITER_KEYS = ("loss", "ratio_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "entropy", "kl", "grad_norm", "routing_drift", "ratio_std", "ratio_max", "ratio_min",
             "opsm_masked_fraction")


def grpo_train(params, config, task, gc, *, ref_params=None, progress=True, eval_every=25, callback=None):
    """Train ``params`` (a policy with ModelConfig ``config``) on ``task`` with GRPO settings ``gc``.

    ``ref_params``: π_ref for the KL term (default: a copy of the initial ``params``; only used
    when ``gc.beta != 0``). ``eval_every``: greedy held-out evaluation (:func:`evaluate` on
    ``gc.eval_n`` prompts of :func:`refimpl.tasks.eval_set`) before the first step, every that
    many steps and after the last step (0 or None: before the first and after the last only).
    ``callback(step, metrics, params)`` is called after every step; if it returns True the run
    stops there (the final evaluation still runs).

    Returns ``dict(params, history, evals, seconds)``: ``history`` is a list with one metrics dict
    per step, ``step`` = 1, 2, ... (``reward``, ``accuracy``, ``format``, ``completion_length``,
    ``truncated``, ``frac_reward_zero_std`` of the step's first generation round; ``num_groups``
    trained on and ``generation_rounds``; ``loss``, ``kl`` (when β ≠ 0), ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``ratio_mean``, ``entropy``,
    ``grad_norm`` averaged over the step's ``num_iterations`` updates, which are also listed one by
    one in ``iterations``; ``lr``; a ``sample`` completion; and ``eval_accuracy`` / ``eval_format``
    / ``eval_mean_length`` after evaluation steps); ``evals`` lists the evaluations as dicts
    ``step, accuracy, format, mean_length`` (step 0: the policy before training); ``seconds`` is the
    wall time of each step (kept out of ``history``, which is a deterministic function of the seed).
    """
    if not isinstance(gc, GRPOConfig):
        raise TypeError(f"gc: expected a GRPOConfig, got {type(gc).__name__}")
    _check_policy(params, config)
    _check_task(task)
    if ref_params is not None:
        _check_policy(ref_params, config, "ref_params")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0):
        raise ValueError(f"eval_every: expected an int >= 0 or None, got {eval_every!r}")
    if gc.beta != 0 and ref_params is None:
        ref_params = tree_map(np.copy, params)
    rng = np.random.default_rng(gc.seed)
    banned = {e.prompt for e in eval_set(task, max(gc.eval_n, EVAL_SIZE))}
    opt = adamw_init(params)
    history, evals, seconds = [], [], []

    def run_eval(step):
        ev = evaluate(params, config, task, n=gc.eval_n, max_new_tokens=gc.max_completion_length, backend=gc.backend)
        evals.append({"step": step, **{k: v for k, v in ev.items() if k != "samples"}})
        return ev

    run_eval(0)
    bar = None
    if progress:
        from tqdm import tqdm  # plain text: tqdm.auto warns in a kernel without ipywidgets
        bar = tqdm(total=gc.steps, desc="grpo", leave=False)
    for step in range(1, gc.steps + 1):
        t0 = time.perf_counter()
        lr = gc.lr * min(1.0, step / gc.warmup_steps) if gc.warmup_steps else gc.lr
        ids, comps, rewards, rounds, m, sample = _rollout(params, config, task, gc, rng, banned)
        m = {"step": step, **m, "num_groups": len(rewards) // gc.num_generations, "generation_rounds": rounds,
             "lr": lr, "sample": sample}
        iters = []
        if len(rewards):
            batch = RolloutBatch(ids, comps, gc)
            adv, _ = group_advantages(rewards, gc.num_generations, scale_rewards=gc.scale_rewards)  # (B,)
            old = ref = record = None
            if gc.num_iterations > 1 or uses_stable(gc):   # what the sampler knew (refimpl.rl.stable)
                record = sampling_record(params, config, batch, gc)
            if gc.num_iterations > 1:   # pi_old: the sampling policy, fixed for the step's updates
                old = record.logps                                      # (B, Tc)
            if gc.beta != 0:
                ref = policy_logps(ref_params, config, batch, gc, record)  # (B, Tc)
            for _ in range(gc.num_iterations):
                params, opt, info = _update(params, opt, config, batch, adv, old, ref, gc, lr, record)
                iters.append({k: info[k] for k in ITER_KEYS if k in info})
        for k in ITER_KEYS:
            vals = [it[k] for it in iters if k in it]
            m[k] = float(np.mean(vals)) if vals else 0.0
        m["iterations"] = iters
        last = step == gc.steps
        stop = bool(callback(step, m, params)) if callback is not None else False
        if last or stop or (eval_every and step % eval_every == 0):
            ev = run_eval(step)
            m.update(eval_accuracy=ev["accuracy"], eval_format=ev["format"], eval_mean_length=ev["mean_length"])
        history.append(m)
        seconds.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            post = {"reward": f"{m['reward']:.2f}", "acc": f"{m['accuracy']:.2f}"}
            if "eval_accuracy" in m:
                post["eval"] = f"{m['eval_accuracy']:.2f}"
            bar.set_postfix(post)
        if stop:
            break
    if bar is not None:
        bar.close()
    return {"params": params, "history": history, "evals": evals, "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# Supervised fine-tuning (cold start, rejection-sampling SFT, pretraining)
# ----------------------------------------------------------------------------------------------

def _sft_rows(data):
    """Token rows and loss masks for :func:`sft_train`'s two data forms."""
    if isinstance(data, str) or not hasattr(data, "__len__") or len(data) == 0:
        raise ValueError("data: expected a non-empty list of (prompt, completion) pairs or of strings")
    rows, targets = [], []
    for i, item in enumerate(data):
        if isinstance(item, str):
            ids = TOKENIZER.encode(item, add_bos=True, add_eos=True)
            tgt = np.ones(len(ids), bool)
        elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            p = TOKENIZER.encode(item[0], add_bos=True)
            c = TOKENIZER.encode(item[1], add_eos=True)
            ids = np.concatenate([p, c])
            tgt = np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)])
        else:
            raise TypeError(f"data: item {i} is neither a str nor a (prompt, completion) pair of str: {item!r:.80}")
        rows.append(ids)
        targets.append(tgt)
    return rows, targets


def sft_train(params, config, data, *, steps=100, batch_size=32, lr=1e-3, min_lr=None, warmup_steps=0,
              weight_decay=0.0, max_grad_norm=1.0, seed=0, progress=True, backend="numpy"):
    """Supervised fine-tuning by next-token cross-entropy (the cold-start and rejection-sampling SFT
    stages of DeepSeek-R1 §2.3.1, §2.3.3; also the base model's pretraining).

    ``data``: a list of ``(prompt, completion)`` string pairs — rows ``<bos> prompt completion
    <eos>`` with the loss on the completion and ``<eos>`` only — or a list of strings — rows
    ``<bos> text <eos>`` with the loss on every token. Batches of ``batch_size`` rows are drawn with
    replacement (``default_rng(seed)``) and padded to their longest row, for ``steps`` AdamW steps
    (linear warmup, cosine decay to ``min_lr``, default ``lr / 10``) through
    :func:`refimpl.model.train.train` (V3's balance loss and bias update included).

    Returns ``dict(params, history, tokens)`` (``history``: per-metric lists, see
    :data:`refimpl.model.train.HISTORY`; ``tokens``: real tokens trained on, for compute accounting).
    """
    _check_policy(params, config)
    rows, targets = _sft_rows(data)
    for name, v, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    if warmup_steps > steps:
        raise ValueError(f"warmup_steps: expected <= steps={steps}, got {warmup_steps}")
    longest = max(len(r) for r in rows)
    if longest > config.max_position_embeddings:
        raise ValueError(f"data: a row has {longest} tokens, more than max_position_embeddings="
                         f"{config.max_position_embeddings}")
    lens = np.array([len(r) for r in rows])                            # (N,)
    ids = np.zeros((len(rows), longest), dtype=np.int64)                # (N, L) right-padded
    labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)  # (N, L) no loss
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, :len(r)] = r
        labels[i, :len(r)] = np.where(t, r, IGNORE_INDEX)

    tokens = [0]

    def batch_fn(rng, step):
        pick = rng.integers(0, len(rows), batch_size)                   # (b,)
        width = int(lens[pick].max())
        tokens[0] += int(lens[pick].sum())
        return ids[pick, :width], labels[pick, :width]

    tc = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10 if min_lr is None else min_lr, warmup_steps=warmup_steps,
                     weight_decay=weight_decay, max_grad_norm=max_grad_norm, backend=backend)
    state = train(init_state(params, seed), config, batch_fn, tc, progress=progress)
    return {"params": state.params, "history": state.history, "tokens": tokens[0]}
