r"""Train the tiny DeepSeek-V3 twice, in float32 and with FP8-emulated linear layers, and compare the losses.

The "What it costs" chapter's FP8 experiment. DeepSeek-V3 §3.3 reports that training with FP8
GEMMs keeps the loss within 0.25% (relative) of a BF16 run. Here the same tiny model as
:mod:`refimpl.recipes.tiny_v3` (same initial weights, same batches, same optimizer) is trained once
in float32 and once under :func:`refimpl.quant.fp8_autocast`: every linear layer and routed
expert runs its forward, input-gradient and weight-gradient products on E4M3 operands with
``1×tile`` / ``tile×tile`` max-abs scales and float32 accumulation, while the embedding, the output
head (excluded by name), the MoE gate, the norms and attention's core stay in float32, as do the
master weights, the gradients and AdamW's moments. The tiny model's widths (16-128) are smaller
than V3's 128-element tiles, so the tile is configurable (32 by default).

Both runs draw their batches from the same ``default_rng(seed)`` in the same order, so the two
loss curves differ only through the arithmetic, and the relative error is measured step by step.
Yardsticks come with it (``control=True``): a run whose GEMMs take bfloat16 operands
(:func:`refimpl.quant.bf16_autocast`), the baseline V3 compares with; a float64 run from the same
start on the same batches,
whose gap to float32 is what mere float32 rounding does to the curves; a float32 run that sees the
batches in another order, whose final model shows how much two equally good runs differ anyway;
and an evaluation of the final models on freshly drawn problems with float and with FP8 forward
passes, which
separates "FP8 arithmetic reads a model worse" from "FP8 training produced a worse model".
"""

from __future__ import annotations

import time

import numpy as np

from ..model.train import TrainConfig, init_state, train_step
from ..model.transformer import init_params, loss_forward
from ..quant import bf16_autocast, fp8_autocast
from ..tasks import AdditionTask
from ..tree import tree_flatten
from . import _cache
from .tiny_v3 import addition_batches, tiny_v3_config

#: refimpl sources the runs execute (hashed into the cache key, see :mod:`refimpl.recipes._cache`)
FP8_SOURCES = ("core", "attention", "moe", "model", "quant", "tasks", "kernels", "optim.py", "tree.py", "config.py",
               "backend.py", "_validate.py", "recipes/tiny_v3.py", "recipes/fp8_train.py")
#: the result's per-step curves: stored as JSON lists, returned as float64 arrays (None without ``control``)
_CURVES = ("loss_fp32", "loss_fp8", "loss_bf16", "loss_fp64", "relative_error", "relative_error_vs_bf16",
           "bf16_relative_error", "control_relative_error")


def relative_loss_error(loss_fp8, loss_ref, window=1):
    r"""Relative loss error :math:`|L_\text{fp8} - L_\text{ref}| / L_\text{ref}`, per step.

    With ``window > 1`` both curves are first averaged over a trailing window of that many steps
    (a moving average; the first ``window - 1`` steps average what is there).

    Shapes: loss_fp8 (S,), loss_ref (S,) -> (S,).
    """
    a, b = np.asarray(loss_fp8, dtype=np.float64), np.asarray(loss_ref, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"loss_fp8: expected a 1-D array shaped like loss_ref {b.shape}, got {a.shape}")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window: expected a positive integer, got {window!r}")
    if window > 1:
        c = np.arange(1, a.size + 1)                                        # (steps,)
        lo = np.maximum(c - window, 0)                                      # (steps,)
        ca, cb = np.concatenate([[0.0], np.cumsum(a)]), np.concatenate([[0.0], np.cumsum(b)])
        a, b = (ca[c] - ca[lo]) / (c - lo), (cb[c] - cb[lo]) / (c - lo)     # (steps,) trailing means
    return np.abs(a - b) / b


def fp8_train_run(steps=150, seed=0, tile=32, fmt="e4m3", backward=True, batch_size=16, lr=3e-3, max_digits=2,
                  window=10, control=True, progress=True, cache_dir=None):
    """Train the tiny V3 in float32 and in FP8 from the same start on the same batches.

    Parameters are those of :func:`refimpl.recipes.tiny_v3.tiny_v3_run` plus ``tile``, ``fmt`` and
    ``backward`` (see :func:`refimpl.quant.fp8_autocast`), ``window``, the number of final steps
    averaged for ``final_relative_error``, and ``control``, whether to add the yardstick runs
    (BF16 GEMMs, float64, float32 with another batch order).

    Returns a dict: ``loss_fp32``, ``loss_fp8`` (and ``loss_bf16``, ``loss_fp64`` or None) (S,) the
    next-token (LM) loss per step; ``relative_error`` (S,) FP8 vs float32 per step;
    ``final_relative_error`` between the means of the last ``window`` steps;
    ``relative_error_vs_bf16`` (S,) FP8 vs BF16 (V3's comparison) and ``final_relative_error_vs_bf16``,
    ``bf16_relative_error`` (S,) BF16 vs float32, ``control_relative_error`` (S,) float32 vs
    float64, all None without ``control``; ``eval_loss``: the LM loss on 64 freshly drawn problems
    (a dataset of another seed; with at most two digits, some problems recur) of each final model
    (``"fp32 weights"``, ``"fp8 weights"``, and with ``control`` ``"bf16 weights"``,
    ``"fp32 weights, other data order"``), each read with a
    ``"float"`` and an ``"fp8"`` forward pass; ``seconds`` wall time per run (of the run that computed
    the result, when it comes from the cache); ``gemms`` the FP8 GEMMs of one step as
    ``(kind, m, n, k)``; ``config``, ``train_config``, ``tile``, ``fmt``; ``cached``.

    ``cache_dir``: load the result of an earlier call with the same arguments and the same refimpl
    sources from there, or compute and store it (the curves round-trip through JSON exactly).
    """
    if not (isinstance(steps, int) and steps >= window >= 1):
        raise ValueError(f"steps: expected an integer >= window ({window}), got {steps!r}")
    config = tiny_v3_config()
    tc = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(steps // 20, 1), bias_update_speed=1e-3,
                     backend="numpy")
    args = dict(steps=steps, seed=seed, tile=tile, fmt=fmt, backward=backward, batch_size=batch_size, lr=lr,
                max_digits=max_digits, window=window, control=control)
    key = _cache.cache_key("fp8_train", args, FP8_SOURCES)
    hit = None if cache_dir is None else _cache.load(cache_dir, key, config, [])
    if hit is not None:
        meta = hit[1]
    else:
        result = _fp8_train(config, tc, **args, progress=progress)
        meta = _cache.plain({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in result.items()})
        if cache_dir is not None:
            _cache.save(cache_dir, key, {}, meta)
    curves = {k: None if meta[k] is None else np.asarray(meta[k], dtype=np.float64) for k in _CURVES}
    return {**meta, **curves, "config": config, "train_config": tc, "cached": hit is not None}


def _fp8_train(config, tc, *, steps, seed, tile, fmt, backward, batch_size, lr, max_digits, window, control,
               progress):
    """The runs of :func:`fp8_train_run`; returns its result without ``config``, ``train_config``
    and ``cached`` (curves as arrays, the rest plain Python)."""
    task = AdditionTask(min_digits=1, max_digits=max_digits)
    batch_fn = addition_batches(task, batch_size, seed=seed)
    modes = ("fp32", "fp8", "bf16", "fp64", "fp32-reordered") if control else ("fp32", "fp8")
    losses, seconds, gemms, finals = {}, {}, [], {}
    bar = None
    if progress:
        from tqdm import tqdm  # plain text: tqdm.auto warns in a kernel without ipywidgets
        bar = tqdm(total=len(modes) * steps, desc=" + ".join(modes), leave=False)
    for mode in modes:
        params = init_params(config, np.random.default_rng(seed), np.float32)
        if mode == "fp64":                                              # the same start, widened
            leaves, rebuild = tree_flatten(params)
            params = rebuild([a.astype(np.float64) if a.dtype == np.float32 else a for a in leaves])
        state = init_state(params, seed + 1 if mode == "fp32-reordered" else seed)
        start = time.perf_counter()
        for step in range(steps):
            batch = batch_fn(state.rng, state.step)
            if mode == "fp8":
                with fp8_autocast(tile, fmt, exclude=[state.params["lm_head"]], backward=backward,
                                  log=gemms if step == 0 else None):
                    state = train_step(state, config, batch, tc)
            elif mode == "bf16":
                with bf16_autocast(exclude=[state.params["lm_head"]]):
                    state = train_step(state, config, batch, tc)
            else:
                state = train_step(state, config, batch, tc)
            if bar is not None:
                bar.update(1)
        seconds[mode] = time.perf_counter() - start
        losses[mode] = np.array(state.history["lm_loss"])
        finals[mode] = state.params
    if bar is not None:
        bar.close()
    rel = relative_loss_error(losses["fp8"], losses["fp32"])
    final = float(relative_loss_error(losses["fp8"][-window:], losses["fp32"][-window:], window)[-1])
    fresh = addition_batches(task, 64, seed=10_000 + seed)(np.random.default_rng(seed), 0)  # another dataset
    evals = {}
    names = {"fp32": "fp32 weights", "fp8": "fp8 weights", "bf16": "bf16 weights",
             "fp32-reordered": "fp32 weights, other data order"}
    for mode in (m for m in modes if m in names):
        p = finals[mode]
        evals[names[mode]] = {
            "float": _eval_loss(p, config, fresh),
            "fp8": _eval_loss(p, config, fresh, fp8=dict(tile=tile, fmt=fmt, exclude=[p["lm_head"]]))}
    vs_bf16 = {}
    if control:
        vs_bf16 = {"relative_error_vs_bf16": relative_loss_error(losses["fp8"], losses["bf16"]),
                   "final_relative_error_vs_bf16": float(relative_loss_error(
                       losses["fp8"][-window:], losses["bf16"][-window:], window)[-1]),
                   "bf16_relative_error": relative_loss_error(losses["bf16"], losses["fp32"]),
                   "control_relative_error": relative_loss_error(losses["fp32"], losses["fp64"])}
    return {"loss_fp32": losses["fp32"], "loss_fp8": losses["fp8"], "loss_bf16": losses.get("bf16"),
            "loss_fp64": losses.get("fp64"), "relative_error": rel, "final_relative_error": final,
            "relative_error_vs_bf16": None, "final_relative_error_vs_bf16": None, "bf16_relative_error": None,
            "control_relative_error": None, **vs_bf16,
            "eval_loss": evals, "seconds": seconds, "gemms": gemms, "tile": tile, "fmt": fmt}


def _eval_loss(params, config, batch, fp8=None):
    """LM loss on ``batch = (ids, labels)`` (forward only), optionally under :func:`fp8_autocast`."""
    ids, labels = batch
    if fp8 is None:
        return float(loss_forward(ids, params, config, labels, mtp_lambda=0.0)[2]["lm_loss"])
    with fp8_autocast(**fp8):
        return float(loss_forward(ids, params, config, labels, mtp_lambda=0.0)[2]["lm_loss"])
