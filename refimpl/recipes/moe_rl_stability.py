r"""Why DeepSeek-V3.2 keeps the routing: GRPO on an MoE policy with off-policy updates (arXiv 2512.02556 §3.1).

The chapter "After R1: DeepSeek-V3.2 — stable RL for MoE policies" runs :func:`moe_rl_stability_run`
with a small budget; ``python -m refimpl moe-rl-stability --steps 20 --num-iterations "(1, 2, 4, 8)"``
runs it longer.

**Policy and task.** The R1-Zero miniature of :mod:`refimpl.recipes.r1`: its pretrained base (one
dense and one MoE layer, 8 routed experts, top-2 of V3's group-limited sigmoid router; cached and
shared with the R1-Zero chapter) and its addition task and GRPO settings, with ``num_iterations``
(TRL's μ) AdamW updates per rollout batch, so every update after the first is off-policy.

**Part 0 — engine/trainer mismatch** (:func:`engine_mismatch`). A sampling engine whose weights are
rounded to bfloat16 or FP8 samples and records a batch; the float32 trainer scores it before any
update (μ = 1), with its own routing and with the engine's.

**Part 1 — the mechanism** (:func:`routing_mechanism`). One rollout batch is sampled and recorded
(:func:`~refimpl.rl.stable.sampling_record`); then ``n_updates`` plain GRPO updates are taken on it.
After each, the policy is evaluated on the batch twice *at the same parameters*: with its router's
own choice and with the recorded routes. This isolates what the routing does: the fraction of
tokens whose top-2 set changed (routing drift), and the log importance ratio
:math:`\log\rho=\ell_\theta-\ell_{old}` of the tokens whose experts changed against those whose
experts did not, with and without Keep Routing.

**Part 2 — training** (:func:`stability_sweep`). For each μ, two runs from the same base and seed:
the unmodified recipe (:data:`~refimpl.recipes.r1.GRPO_DEFAULTS`, nucleus sampling at ``top_p``)
and the V3.2 recipe (the same plus Keep Routing, Keep Sampling Mask, off-policy sequence masking
at δ = ``delta`` and the unbiased KL at β = ``beta``; δ and β are not DeepSeek's, whose values are
unpublished). Per update: routing drift, the spread of the importance ratio (its standard
deviation and maximum over the batch's tokens), the masked fraction; per run: the sampled reward
per step and the greedy held-out accuracy before and after.
"""

from __future__ import annotations

import time

import numpy as np

from ..model.generate import generate
from ..model.transformer import model_forward
from ..optim import adamw_init, adamw_update, clip_grad_norm
from ..quant.fp8 import round_to_fp8
from ..quant.fp8_train import round_to_bf16
from ..rl import accuracy_reward, combine_rewards, format_reward, group_advantages
from ..rl.logprobs import logps_entropy_forward
from ..rl.rollout import RolloutBatch
from ..rl.stable import drifted_routes, sampling_record
from ..rl.trainer import evaluate, grpo_objective, grpo_train
from ..tasks import TOKENIZER, make_dataset
from ..tree import tree_map
from .r1 import TASK, pretrain_base, r1_zero_grpo_config

#: the V3.2 options of the sweep's second recipe (δ and β are this miniature's, not DeepSeek's)
V32_OPTIONS = dict(keep_routing=True, keep_sampling_mask=True, use_bias_correction_kl=True)


def rollout_batch(params, config, gc, rng):
    """One scored rollout batch of the R1-Zero task: ``(batch, advantages, rewards)``."""
    exs = make_dataset(TASK, gc.prompts_per_step, rng)
    prompts = [TOKENIZER.encode(e.prompt, add_bos=True) for e in exs for _ in range(gc.num_generations)]
    outs = generate(params, config, prompts, gc.max_completion_length, temperature=gc.temperature, top_p=gc.top_p,
                    rng=rng, stop_tokens=[TOKENIZER.eos_id], pad_id=TOKENIZER.pad_id, backend=gc.backend)
    comps = [o[len(p):] for o, p in zip(outs, prompts, strict=True)]
    texts = [TOKENIZER.decode(c[:-1] if len(c) and c[-1] == TOKENIZER.eos_id else c, skip_special_tokens=False)
             for c in comps]
    answers = [e.answer for e in exs for _ in range(gc.num_generations)]
    scores = np.stack([accuracy_reward(texts, answers, check=TASK.check), format_reward(texts)], axis=1)  # (B, 2)
    rewards = combine_rewards(scores, gc.reward_weights)              # (B,)
    adv, _ = group_advantages(rewards, gc.num_generations, scale_rewards=gc.scale_rewards)  # (B,)
    return RolloutBatch(prompts, comps, gc), adv, rewards


def routing_mechanism(params, config, gc, n_updates=8, seed=0):
    r"""Part 1 (module docstring): plain GRPO updates on one recorded batch, each followed by the batch's
    log-ratios under the router's own experts and under the recorded ones, at the same parameters.

    Returns ``dict(updates, drift, changed_tokens, abs_log_ratio)``: ``drift[k]`` the fraction of
    (token, MoE layer) pairs whose expert set changed after update ``k`` (k = 0: before any);
    ``abs_log_ratio[mode][group][k]`` the mean :math:`|\log\rho|` over the loss's tokens, ``mode`` in
    ``("own", "kept")`` (routing), ``group`` in ``("changed", "unchanged", "all")`` (NaN if empty);
    ``ratio_std[mode][k]`` the standard deviation of ρ over all the loss's tokens; ``swap_effect[k]``
    the mean :math:`|\ell_{own}-\ell_{kept}|` over the tokens whose experts changed (what Keep Routing
    removes from their log-ratio).
    """
    rng = np.random.default_rng(seed)
    batch, adv, _ = rollout_batch(params, config, gc, rng)
    rec = sampling_record(params, config, batch, gc)
    counted = np.zeros(batch.ids.shape, bool)                          # (B, T) positions the loss reads
    counted[batch.rows, batch.pos] = batch.mask
    opt = adamw_init(params)
    out = {"updates": list(range(n_updates + 1)), "drift": [], "changed_tokens": [],
           "abs_log_ratio": {m: {g: [] for g in ("changed", "unchanged", "all")} for m in ("own", "kept")},
           "ratio_std": {"own": [], "kept": []}, "swap_effect": []}
    for k in range(n_updates + 1):
        if k:
            _, grads, _ = grpo_objective(params, config, batch, adv, rec.logps, None, gc, rec)
            grads, _ = clip_grad_norm(grads, gc.max_grad_norm)
            params, opt = adamw_update(params, grads, opt, lr=gc.lr, betas=tuple(gc.betas))
        changed = np.zeros(batch.ids.shape, bool)                       # (B, T) any MoE layer changed
        for mode, routes in (("own", None), ("kept", rec.routes)):
            logits, _, info = model_forward(batch.ids, params, config, backend=gc.backend, routes=routes)
            lp = logps_entropy_forward(batch.gather(logits), batch.comp, temperature=gc.temperature)[0]  # (B, Tc)
            lr_ = np.abs(lp - rec.logps)                                # (B, Tc) |log rho|
            if mode == "own":
                lp_own = lp                                             # (B, Tc)
            else:
                moved = changed[batch.rows, batch.pos] & batch.mask     # (B, Tc)
                out["swap_effect"].append(float(np.abs(lp - lp_own)[moved].mean()) if moved.any() else float("nan"))
            if mode == "own":
                flags = drifted_routes(info["moe"], rec.routes, params, config)
                changed = np.any([f for f in flags if f is not None], axis=0)  # (B, T)
                out["drift"].append(float(np.mean([f[counted].mean() for f in flags if f is not None]))
                                    if counted.any() else 0.0)
            ch = changed[batch.rows, batch.pos] & batch.mask            # (B, Tc) loss tokens whose experts moved
            un = ~changed[batch.rows, batch.pos] & batch.mask           # (B, Tc)
            for g, sel in (("changed", ch), ("unchanged", un), ("all", batch.mask)):
                out["abs_log_ratio"][mode][g].append(float(lr_[sel].mean()) if sel.any() else float("nan"))
            out["ratio_std"][mode].append(float(np.exp(lp - rec.logps)[batch.mask].std()) if batch.mask.any() else 0.0)
        out["changed_tokens"].append(int((changed[batch.rows, batch.pos] & batch.mask).sum()))
    out["tokens"] = int(batch.mask.sum())
    return out


def engine_weights(params, precision):
    """The sampling engine's copy of ``params``: every float tensor rounded to bfloat16
    (:func:`~refimpl.quant.fp8_train.round_to_bf16`) or to e4m3 FP8 with one scale per tensor
    (amax / 448; :func:`~refimpl.quant.fp8.round_to_fp8`), returned as float32."""
    if precision == "bf16":
        return tree_map(lambda a: round_to_bf16(a) if a.dtype.kind == "f" else a, params)
    if precision == "fp8":
        def q(a):
            s = np.float32(max(float(np.abs(a).max()), 1e-12) / 448.0)
            return (round_to_fp8((a / s).astype(np.float32)) * s).astype(np.float32)
        return tree_map(lambda a: q(a) if a.dtype.kind == "f" else a, params)
    raise ValueError(f"precision: expected 'bf16' or 'fp8', got {precision!r}")


def engine_mismatch(params, config, gc, seed=0, precision="fp8"):
    r"""Part 0: an inference engine whose weights are rounded to ``precision`` (:func:`engine_weights`)
    samples and records a batch; the float32 trainer then scores it *before any update* (μ = 1), with
    its own routing and with the engine's (Keep Routing).

    Returns ``dict(drift, tokens, abs_log_ratio, ratio_std)``: ``drift`` the fraction of the loss's
    (token, MoE layer) pairs routed differently by trainer and engine; ``abs_log_ratio[mode][group]``
    and ``ratio_std[mode]`` as in :func:`routing_mechanism` (one value each).
    """
    engine = engine_weights(params, precision)
    rng = np.random.default_rng(seed)
    batch, _, _ = rollout_batch(engine, config, gc, rng)
    rec = sampling_record(engine, config, batch, gc)                    # what the engine returns
    counted = np.zeros(batch.ids.shape, bool)                          # (B, T) positions the loss reads
    counted[batch.rows, batch.pos] = batch.mask
    out = {"abs_log_ratio": {}, "ratio_std": {}, "tokens": int(batch.mask.sum())}
    for mode, routes in (("own", None), ("kept", rec.routes)):
        logits, _, info = model_forward(batch.ids, params, config, backend=gc.backend, routes=routes)
        lp = logps_entropy_forward(batch.gather(logits), batch.comp, temperature=gc.temperature)[0]  # (B, Tc)
        if mode == "own":
            flags = [f for f in drifted_routes(info["moe"], rec.routes, params, config) if f is not None]
            changed = np.any(flags, axis=0)[batch.rows, batch.pos]      # (B, Tc)
            out["drift"] = float(np.mean([f[counted].mean() for f in flags])) if counted.any() else 0.0
        a = np.abs(lp - rec.logps)                                      # (B, Tc) |log rho| at mu = 1
        out["abs_log_ratio"][mode] = {g: float(a[sel].mean()) if sel.any() else float("nan") for g, sel in
                                      (("changed", changed & batch.mask), ("unchanged", ~changed & batch.mask),
                                       ("all", batch.mask))}
        out["ratio_std"][mode] = float(np.exp(lp - rec.logps)[batch.mask].std()) if batch.mask.any() else 0.0
    return out


def stability_sweep(params, config, num_iterations=(1, 2, 4), steps=5, seed=0, *, delta=0.05, beta=0.01,
                    progress=True, **overrides):
    """Part 2 (module docstring): for each μ in ``num_iterations``, the unmodified and the V3.2 recipe.

    Returns ``{mu: {"grpo": run, "v32": run}}`` with ``run`` = ``dict(reward, drift, ratio_std,
    ratio_max, masked, eval_before, eval_after, seconds)``: ``reward`` the sampled reward per step,
    the next four per update (μ per step, in order), ``eval_*`` the greedy held-out accuracy.
    """
    out = {}
    before = None
    for mu in num_iterations:
        out[mu] = {}
        for name, extra in (("grpo", {}), ("v32", dict(V32_OPTIONS, off_policy_mask_threshold=delta, beta=beta))):
            gc = r1_zero_grpo_config(steps, seed, num_iterations=mu, **{**overrides, **extra})
            t0 = time.perf_counter()
            res = grpo_train(params, config, TASK, gc, progress=progress, eval_every=0)
            its = [it for h in res["history"] for it in h["iterations"]]
            before = res["evals"][0]["accuracy"] if before is None else before
            # an on-policy run without a V3.2 option records nothing: its drift is 0 and its ratio 1 by definition
            get = lambda key, default: [it.get(key, default) for it in its]  # noqa: E731, B023
            out[mu][name] = {"reward": [h["reward"] for h in res["history"]], "drift": get("routing_drift", 0.0),
                             "ratio_std": get("ratio_std", 0.0), "ratio_max": get("ratio_max", 1.0),
                             "masked": get("opsm_masked_fraction", 0.0),
                             "eval_before": res["evals"][0]["accuracy"], "eval_after": res["evals"][-1]["accuracy"],
                             "seconds": time.perf_counter() - t0}
    return out


def moe_rl_stability_run(steps=5, num_iterations=(1, 2, 4), seed=0, progress=True, cache_dir=None, *,
                         base_steps=2000, n_updates=8, prompts_per_step=8, top_p=0.95, eval_n=64, delta=0.05,
                         beta=0.01, stress_lr=1e-3, stress_num_iterations=(8,), stress_steps=4, **overrides):
    """Both parts of the experiment (module docstring) from the R1-Zero miniature's base model.

    ``steps`` GRPO steps per run of the sweep, for each μ in ``num_iterations``; ``n_updates``
    updates in the mechanism part; ``prompts_per_step`` prompts of G = 8 samples per batch, nucleus
    ``top_p``; ``eval_n`` held-out prompts for the greedy evaluations; ``delta``, ``beta``: the V3.2
    recipe's δ and β; ``overrides``: other :class:`~refimpl.rl.trainer.GRPOConfig` fields (e.g. ``lr``).
    A second, *stressed* sweep runs ``stress_steps`` steps at learning rate ``stress_lr`` for each μ in
    ``stress_num_iterations`` (``stress_lr=None`` skips it). The base model is
    :func:`~refimpl.recipes.r1.pretrain_base` (``base_steps``, cached in ``cache_dir``).

    Returns ``dict(config, grpo_config, mechanism, mismatch, sweep, stress, stress_lr, base_eval, seconds)``.
    """
    t0 = time.perf_counter()
    opts = dict(prompts_per_step=prompts_per_step, top_p=top_p, eval_n=eval_n, **overrides)
    gc = r1_zero_grpo_config(1, seed, num_iterations=max(n_updates, 1), **opts)  # bad options fail before training
    base = pretrain_base(base_steps, seed, eval_n=128, progress=progress, cache_dir=cache_dir)
    config, params = base["config"], base["params"]
    mech = routing_mechanism(params, config, gc, n_updates, seed)
    mismatch = {p: engine_mismatch(params, config, gc, seed, p) for p in ("bf16", "fp8")}
    sweep = stability_sweep(params, config, tuple(num_iterations), steps, seed, delta=delta, beta=beta,
                            progress=progress, **opts)
    stress = None
    if stress_lr is not None:
        stress = stability_sweep(params, config, tuple(stress_num_iterations), stress_steps, seed, delta=delta,
                                 beta=beta, progress=progress, **{**opts, "lr": stress_lr})
    ev = evaluate(params, config, TASK, n=eval_n, max_new_tokens=gc.max_completion_length)
    return {"config": config, "grpo_config": gc, "mechanism": mech, "mismatch": mismatch, "sweep": sweep,
            "stress": stress,
            "stress_lr": stress_lr, "base_eval": ev["accuracy"], "seconds": time.perf_counter() - t0}
