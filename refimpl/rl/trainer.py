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

The steps run on the shared loop of :mod:`refimpl.train` (one state, one history format, progress,
callback, evaluation hook, checkpoints every N steps): a run stopped and resumed from its
checkpoint gives the same history and parameters, bit for bit, as one run, because the sampling
RNG, the AdamW state, π_ref and the evaluations are all in the checkpoint, and π_old is recomputed
from the current policy at the start of every step. Rollout helpers (:func:`~refimpl.rl.rollout.collect_rollouts`),
:func:`evaluate` and :func:`rejection_sample` live in :mod:`refimpl.rl.rollout`;
:func:`~refimpl.model.sft_train` lives in :mod:`refimpl.model.sft`; both are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .._validate import BACKENDS, check_betas, check_bool, check_choice, check_integer, check_real
from ..model.sft import sft_train  # noqa: F401 - re-exported: refimpl.rl.trainer.sft_train is public API
from ..model.transformer import model_backward, model_forward
from ..optim import adamw_update, clip_grad_norm, default_decay_mask, warmup_cosine_lr
from ..tasks import EVAL_SIZE, eval_set
from ..train import append_row, check_loop_options, init_state, resume_state, run_loop
from ..tree import tree_map
from .advantages import SCALE_REWARDS, group_advantages
from .grpo import IS_LEVELS, KL_ESTIMATORS, grpo_loss_from_logits
from .loss_types import loss_options
from .rollout import (  # noqa: F401 - evaluate, rejection_sample, RolloutBatch, completion_logps: part of this API
    RolloutBatch,
    check_policy,
    check_task,
    collect_rollouts,
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
    ``warmup_steps`` (linear warmup, then constant: :func:`refimpl.optim.warmup_cosine_lr` with
    ``min_lr = lr``), ``betas``, ``weight_decay``,
    ``max_grad_norm``. Loss: ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ``beta``,
    ``kl_estimator``, ``importance_sampling_level``, ``entropy_coef`` — as
    :func:`refimpl.rl.grpo_loss`. Rewards: ``reward_weights`` for (accuracy, format),
    ``scale_rewards`` for :func:`refimpl.rl.group_advantages`, ``soft_punish_cache`` > 0 adds
    DAPO's overlong penalty with that buffer. ``dynamic_sampling``: DAPO's filter of zero-std
    groups with at most ``max_resample_rounds`` extra generation rounds per step. ``eval_n``:
    held-out prompts for the periodic greedy evaluation. ``backend``: None (the ``REFIMPL_BACKEND``
    default), ``"auto"``, ``"numpy"`` or ``"numba"``, for the model and the loss's log-prob pass (with
    None that pass stays on the reference unless ``REFIMPL_BACKEND`` is set: :mod:`refimpl.backend`,
    "Sites whose default is the reference"; the V3.2 loss of :mod:`refimpl.rl.stable` always does).
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
    backend: str | None = None
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
# Training
# ----------------------------------------------------------------------------------------------

def _grads_like(grads, params):
    """Order the gradient tree like ``params`` (zeros for modules RL does not train, e.g. MTP)."""
    return {k: grads[k] if k in grads else tree_map(np.zeros_like, params[k]) for k in params}


def grpo_objective(params, config, batch, advantages, old_logps, ref_logps, cfg, record=None):
    r"""The GRPO loss of a rollout batch and its gradient for every parameter (no update).

    :math:`J(\theta)` of :func:`refimpl.rl.grpo_loss_from_logits` (with ``cfg``'s loss options and
    the sampling temperature) on the completion-aligned logits of :func:`refimpl.model.model_forward`;
    the gradient goes logits → :meth:`RolloutBatch.scatter` → :func:`refimpl.model.model_backward`.
    ``old_logps`` None means on-policy (ratio 1 in value); ``ref_logps`` is needed when β ≠ 0.
    ``record``: the batch's :class:`~refimpl.rl.stable.SamplingRecord`; with it the V3.2 options of
    ``cfg`` apply (:func:`~refimpl.rl.stable.v32_grpo_loss_from_logits`) and ``info`` adds
    ``routing_drift`` (:func:`~refimpl.rl.stable.routing_drift` over the loss's tokens).

    Shapes: advantages (B,), old_logps / ref_logps (B, Tc) or None -> loss (), grads (params' tree), info.
    """
    routes = record.routes if record is not None and cfg.keep_routing else None
    logits, cache, minfo = model_forward(batch.ids, params, config, backend=cfg.backend, routes=routes)  # (B, T, V)
    kw = dict(temperature=cfg.temperature, entropy_coef=cfg.entropy_coef, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
              epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
              importance_sampling_level=cfg.importance_sampling_level, max_completion_length=cfg.max_completion_length,
              **(cfg.loss_options or {}))
    args = (batch.gather(logits), batch.comp, old_logps, ref_logps, advantages.astype(logits.dtype), batch.mask)
    if record is None:
        loss, dlc, info = grpo_loss_from_logits(*args, backend=cfg.backend, **kw)
    else:
        loss, dlc, info = v32_grpo_loss_from_logits(
            *args, sampling_mask=record.vocab_mask, sampling_logps=record.logps,
            use_bias_correction_kl=cfg.use_bias_correction_kl, off_policy_mask_threshold=cfg.off_policy_mask_threshold,
            **kw)
        counted = np.zeros(batch.ids.shape, bool)                       # (B, T) positions the loss reads
        counted[batch.rows, batch.pos] = batch.mask
        info["routing_drift"] = routing_drift(minfo["moe"], record.routes, params, config, counted)
    grads = _grads_like(model_backward(batch.scatter(dlc, logits.shape), cache), params)
    return loss, grads, info


def _rl_decay_mask(path, p):
    """AdamW's decay mask during RL: the default one, minus the MTP modules, which RL leaves untouched."""
    return default_decay_mask(path, p) and not path.startswith("mtp.")


def _update(params, opt, config, batch, adv, old, ref, cfg, lr, record=None):
    """One AdamW update on a rollout batch: loss and gradients, clip, step."""
    loss, grads, info = grpo_objective(params, config, batch, adv, old, ref, cfg, record)
    grads, norm = clip_grad_norm(grads, cfg.max_grad_norm)
    params, opt = adamw_update(params, grads, opt, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                               decay_mask=_rl_decay_mask)
    info.update(loss=float(loss), grad_norm=norm)
    return params, opt, info


ITER_KEYS = ("loss", "ratio_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "entropy", "kl", "grad_norm", "routing_drift", "ratio_std", "ratio_max", "ratio_min",
             "opsm_masked_fraction")


def grpo_train(params, config, task, cfg, *, ref_params=None, progress=True, eval_every=25, callback=None,
               checkpoint_path=None, checkpoint_every=0, stop_at=None, resume=None):
    """Train ``params`` (a policy with ModelConfig ``config``) on ``task`` with GRPO settings ``cfg``.

    ``ref_params``: π_ref for the KL term (default: a copy of the initial ``params``; only used
    when ``cfg.beta != 0``, and then kept in the state's ``frozen`` trees, so checkpoints hold it).
    ``eval_every``: greedy held-out evaluation (:func:`evaluate` on ``cfg.eval_n`` prompts of
    :func:`refimpl.tasks.eval_set`) before the first step, every that many steps and after step
    ``cfg.steps`` (0 or None: before the first and after the last only). ``callback(step, metrics,
    params)`` is called after every step; if it returns True the run stops there (the final
    evaluation still runs). Loop options (:func:`refimpl.train.run_loop`): ``checkpoint_path`` /
    ``checkpoint_every`` save the state, ``stop_at`` ends after that many steps (no final
    evaluation: the run is not over), ``resume`` (a checkpoint path or a
    :class:`~refimpl.train.TrainState`) continues a run bit for bit.

    Returns ``dict(params, history, evals, seconds, state)``: ``history`` is a
    :class:`~refimpl.train.History` with one metrics dict per step, ``step`` = 1, 2, ...
    (``reward``, ``accuracy``, ``format``, ``completion_length``, ``truncated``,
    ``frac_reward_zero_std`` of the step's first generation round; ``num_groups`` trained on and
    ``generation_rounds``; ``loss``, ``kl`` (when β ≠ 0), ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``ratio_mean``, ``entropy``,
    ``grad_norm`` averaged over the step's ``num_iterations`` updates, which are also listed one by
    one in ``iterations``; ``lr``; a ``sample`` completion; ``eval_accuracy`` / ``eval_format`` /
    ``eval_mean_length`` after evaluation steps; ``seconds``, the step's wall time); ``evals`` lists
    the evaluations as dicts ``step, accuracy, format, mean_length`` (step 0: the policy before
    training); ``seconds`` the wall time of each step (the history's column, which its ``==``
    ignores: everything else is a deterministic function of the seed); ``state`` the final
    :class:`~refimpl.train.TrainState`.
    """
    if not isinstance(cfg, GRPOConfig):
        raise TypeError(f"cfg: expected a GRPOConfig, got {type(cfg).__name__}")
    check_policy(params, config)
    check_task(task)
    if ref_params is not None:
        check_policy(ref_params, config, "ref_params")
    if eval_every is not None:
        check_integer("eval_every", eval_every, low=0)
    check_loop_options(stop_at=stop_at, checkpoint_every=checkpoint_every)
    banned = {e.prompt for e in eval_set(task, max(cfg.eval_n, EVAL_SIZE))}

    def run_eval(state):
        ev = evaluate(state.params, config, task, n=cfg.eval_n, max_new_tokens=cfg.max_completion_length,
                      backend=cfg.backend)
        row = {"step": state.step, **{k: v for k, v in ev.items() if k != "samples"}}
        return state._replace(extra={**state.extra, "evals": [*state.extra.get("evals", []), row]}), ev

    if resume is None:
        state = init_state(params, cfg.seed, extra={"evals": []})
        if cfg.beta != 0:
            ref_params = tree_map(np.copy, params) if ref_params is None else ref_params
        state = run_eval(state)[0]
    else:
        state = resume_state(resume, config)
        ref_params = state.frozen.get("ref_params") if ref_params is None else ref_params
        if cfg.beta != 0 and ref_params is None:
            raise ValueError("resume: the state holds no π_ref (frozen 'ref_params') and cfg.beta != 0; "
                             "pass ref_params")
    if cfg.beta != 0:
        state = state._replace(frozen={**state.frozen, "ref_params": ref_params})

    def step_fn(state):
        step = state.step + 1
        lr = warmup_cosine_lr(state.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                              total_steps=max(cfg.steps, cfg.warmup_steps), min_lr=cfg.lr)
        ids, comps, rewards, rounds, m, sample = collect_rollouts(state.params, config, task, cfg, state.rng, banned)
        m = {"step": step, **m, "num_groups": len(rewards) // cfg.num_generations, "generation_rounds": rounds,
             "lr": lr, "sample": sample}
        params, opt, iters = state.params, state.opt, []
        if len(rewards):
            batch = RolloutBatch(ids, comps, cfg)
            adv, _ = group_advantages(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)  # (B,)
            old = ref = record = None
            if cfg.num_iterations > 1 or uses_stable(cfg):   # what the sampler knew (refimpl.rl.stable)
                record = sampling_record(params, config, batch, cfg)
            if cfg.num_iterations > 1:   # pi_old: the sampling policy, fixed for the step's updates
                old = record.logps                                      # (B, Tc)
            if cfg.beta != 0:
                ref = policy_logps(ref_params, config, batch, cfg, record)  # (B, Tc)
            for _ in range(cfg.num_iterations):
                params, opt, info = _update(params, opt, config, batch, adv, old, ref, cfg, lr, record)
                iters.append({k: info[k] for k in ITER_KEYS if k in info})
        for k in ITER_KEYS:
            vals = [it[k] for it in iters if k in it]
            m[k] = float(np.mean(vals)) if vals else 0.0
        m["iterations"] = iters
        return state._replace(params=params, opt=opt, step=step, history=append_row(state, m))

    def eval_hook(state, stopped):
        if state.step == cfg.steps or stopped or (eval_every and state.step % eval_every == 0):
            state, ev = run_eval(state)
            return state, {"eval_accuracy": ev["accuracy"], "eval_format": ev["format"],
                           "eval_mean_length": ev["mean_length"]}
        return state, None

    def postfix(m):
        post = {"reward": f"{m['reward']:.2f}", "acc": f"{m['accuracy']:.2f}"}
        if "eval_accuracy" in m:
            post["eval"] = f"{m['eval_accuracy']:.2f}"
        return post

    state = run_loop(state, step_fn, end=cfg.steps if stop_at is None else min(stop_at, cfg.steps), desc="grpo",
                     progress=progress, postfix=postfix, callback=callback, eval_hook=eval_hook,
                     checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, config=config)
    return {"params": state.params, "history": state.history, "evals": state.extra["evals"],
            "seconds": [r["seconds"] for r in state.history], "state": state}
