r"""Pretraining step and loop: AdamW + global-norm clipping + warmup-cosine, V3's bias update, exact resume.

One step (DeepSeek-V3 §2.1.2, §4.2): forward and hand-written backward of
:func:`~refimpl.model.transformer.loss_forward` (next-token CE + balance loss + MTP), clip the
global gradient norm, AdamW with decoupled weight decay at the scheduled learning rate, then, for
every ``noaux_tc`` MoE layer (main and MTP), the auxiliary-loss-free bias update
:math:`b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\overline{c} - c_i)` from that layer's expert
load over the batch (outside the gradient; the bias is never decayed or moved by AdamW, as its
gradient is zero).

The loop, state, history and checkpoints are the shared ones of :mod:`refimpl.train` (re-exported
here: :class:`~refimpl.train.TrainState`, :func:`~refimpl.train.init_state`,
:func:`~refimpl.train.save_checkpoint`, :func:`~refimpl.train.load_checkpoint`). Determinism: the
only randomness is the ``numpy.random.Generator`` in the state that the data function draws batches
from; its bit-generator state is saved with the parameters, the AdamW moments and the step, so
:func:`load_checkpoint` + :func:`train` reproduce an uninterrupted run bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .._validate import BACKENDS, check_betas, check_choice, check_integer, check_real
from ..moe import bias_update, max_violation
from ..optim import adamw_update, clip_grad_norm, warmup_cosine_lr
from ..train import (  # noqa: F401 - TrainState, init_state, save/load_checkpoint: part of this API
    TrainState,
    append_row,
    check_loop_options,
    init_state,
    lm_loss_grads,
    load_checkpoint,
    run_loop,
    save_checkpoint,
)
from .structure import check_params
from .transformer import loss_forward


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are V3's (§4.2) except the step counts and learning rate."""
    steps: int = 100
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    bias_update_speed: float = 1e-3
    mtp_lambda: float = 0.3
    balance: str = "auto"
    backend: str | None = None

    def __post_init__(self):
        check_integer("steps", self.steps, low=0)
        check_integer("warmup_steps", self.warmup_steps, low=0, high=self.steps)
        check_real("lr", self.lr, low=0.0)
        check_real("min_lr", self.min_lr, low=0.0, high=self.lr)
        check_betas("betas", self.betas)
        for name in ("weight_decay", "bias_update_speed", "mtp_lambda"):
            check_real(name, getattr(self, name), low=0.0)
        check_real("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_choice("balance", self.balance, ("auto", "seq", "expert", "none"))
        check_choice("backend", self.backend, BACKENDS)


HISTORY = ("loss", "lm_loss", "balance_loss", "mtp_loss", "grad_norm", "lr", "max_vio")


def _update_biases(params, config, info, gamma):
    """V3 aux-loss-free balancing on every noaux_tc MoE layer (main layers, then MTP blocks)."""
    if config.topk_method != "noaux_tc" or gamma == 0:
        return params
    loads = iter(list(info["load"]) + list(info.get("mtp_load", [])))
    layers = params["model"]["layers"] + (params.get("mtp") or [])
    used = len(info["load"]) + len(info.get("mtp_load", []))
    moe_layers = [lp for lp in layers if "gate" in lp["mlp"]][:used]
    for lp in moe_layers:
        gate = lp["mlp"]["gate"]
        gate["e_score_correction_bias"] = bias_update(gate["e_score_correction_bias"], next(loads), gamma)
    return params


def apply_gradients(state, config, grads, info, losses, tc):
    """The optimiser half of a step: clip, warmup + cosine learning rate, AdamW, V3's bias update
    from ``info["load"]`` (and ``"mtp_load"``), and the history row (``step`` and :data:`HISTORY`);
    ``losses`` = (loss, lm_loss, balance_loss, mtp_loss). Shared by :func:`train_step` and the
    data-parallel step (:func:`refimpl.parallel.dp_train_step`), which passes global gradients,
    loads and losses."""
    grads, norm = clip_grad_norm(grads, tc.max_grad_norm)
    lr = warmup_cosine_lr(state.step, lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                          min_lr=tc.min_lr)
    params, opt = adamw_update(state.params, grads, state.opt, lr=lr, betas=tc.betas,
                               weight_decay=tc.weight_decay)
    params = _update_biases(params, config, info, tc.bias_update_speed)
    vio = float(np.mean([max_violation(ld) for ld in info["load"]])) if info["load"] else 0.0
    row = {"step": state.step + 1, **dict(zip(HISTORY, (*map(float, losses), norm, lr, vio), strict=True))}
    return state._replace(params=params, opt=opt, step=state.step + 1, history=append_row(state, row))


def train_step(state, config, batch, tc):
    """One optimisation step on ``batch = (input_ids, labels or None)``; returns the new state."""
    ids, labels = batch
    loss, cache, info = loss_forward(ids, state.params, config, labels, balance=tc.balance, mtp_lambda=tc.mtp_lambda,
                                     backend=tc.backend)
    grads = lm_loss_grads(cache, state.params)
    losses = (loss, info["lm_loss"], info["balance_loss"], info["mtp_loss"])
    return apply_gradients(state, config, grads, info, losses, tc)


def train(state, config, batch_fn, tc, *, checkpoint_path=None, checkpoint_every=0, stop_at=None, progress=True,
          callback=None):
    """Run steps ``state.step .. tc.steps - 1`` (or up to ``stop_at``) on the shared loop
    (:func:`refimpl.train.run_loop`), drawing each batch as ``batch_fn(state.rng, step)``.

    Saves a checkpoint every ``checkpoint_every`` steps and at the end when ``checkpoint_path`` is
    given; ``callback(step, row, params)`` returning True stops the run. Resume: pass the state of
    :func:`load_checkpoint`. Returns the final :class:`~refimpl.train.TrainState` (its ``history``
    has one row per step: ``step``, :data:`HISTORY`, ``seconds``).
    """
    if not isinstance(tc, TrainConfig):
        raise TypeError(f"tc: expected a TrainConfig, got {type(tc).__name__}")
    check_params(state.params, config, "state.params")
    check_loop_options(stop_at=stop_at, checkpoint_every=checkpoint_every)
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    return run_loop(state, lambda s: train_step(s, config, batch_fn(s.rng, s.step), tc), end=end, desc="train",
                    progress=progress, postfix=lambda row: {"loss": f"{row['loss']:.4f}"}, callback=callback,
                    checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, config=config)


def train_config_dict(tc):
    """The settings as a plain dict (for logs)."""
    return asdict(tc)
