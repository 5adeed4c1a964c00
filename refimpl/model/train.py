r"""Training loop: AdamW + global-norm clipping + warmup-cosine, V3's bias update, checkpoints, exact resume.

One step (DeepSeek-V3 §2.1.2, §4.2): forward and hand-written backward of
:func:`~refimpl.model.transformer.loss_forward` (next-token CE + balance loss + MTP), clip the
global gradient norm, AdamW with decoupled weight decay at the scheduled learning rate, then, for
every ``noaux_tc`` MoE layer (main and MTP), the auxiliary-loss-free bias update
:math:`b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\overline{c} - c_i)` from that layer's expert
load over the batch (outside the gradient; the bias is never decayed or moved by AdamW, as its
gradient is zero).

Determinism: the only randomness is the ``numpy.random.Generator`` in :class:`TrainState` that the
data function draws batches from; its bit-generator state is saved with the parameters, the AdamW
moments and the step, so :func:`load_checkpoint` + :func:`train` reproduce an uninterrupted run
bit for bit. Checkpoints are ``.npz`` files read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from .._validate import BACKENDS, check_betas, check_choice, check_integer, check_real
from ..config import ModelConfig
from ..fileio import atomic_write
from ..moe import bias_update, max_violation
from ..optim import AdamWState, adamw_init, adamw_update, clip_grad_norm, warmup_cosine_lr
from ..tree import tree_flatten, tree_paths
from .structure import check_params
from .transformer import loss_backward, loss_forward


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


class TrainState(NamedTuple):
    params: dict
    opt: AdamWState
    step: int
    rng: np.random.Generator
    history: dict      # lists per metric, one entry per step


HISTORY = ("loss", "lm_loss", "balance_loss", "mtp_loss", "grad_norm", "lr", "max_vio")


def init_state(params, seed=0):
    """Step 0: fresh AdamW moments and ``default_rng(seed)`` for the data."""
    return TrainState(params, adamw_init(params), 0, np.random.default_rng(seed), {k: [] for k in HISTORY})


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
    from ``info["load"]`` (and ``"mtp_load"``), and the history row; ``losses`` = (loss, lm_loss,
    balance_loss, mtp_loss). Shared by :func:`train_step` and the data-parallel step
    (:func:`refimpl.parallel.dp_train_step`), which passes global gradients, loads and losses."""
    grads, norm = clip_grad_norm(grads, tc.max_grad_norm)
    lr = warmup_cosine_lr(state.step, lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                          min_lr=tc.min_lr)
    params, opt = adamw_update(state.params, grads, state.opt, lr=lr, betas=tc.betas,
                               weight_decay=tc.weight_decay)
    params = _update_biases(params, config, info, tc.bias_update_speed)
    vio = float(np.mean([max_violation(ld) for ld in info["load"]])) if info["load"] else 0.0
    hist = {k: list(v) for k, v in state.history.items()}
    for k, v in zip(("loss", "lm_loss", "balance_loss", "mtp_loss", "grad_norm", "lr", "max_vio"),
                    (*map(float, losses), norm, lr, vio), strict=True):
        hist[k].append(v)
    return TrainState(params, opt, state.step + 1, state.rng, hist)


def train_step(state, config, batch, tc):
    """One optimisation step on ``batch = (input_ids, labels or None)``; returns the new state."""
    ids, labels = batch
    loss, cache, info = loss_forward(ids, state.params, config, labels, balance=tc.balance, mtp_lambda=tc.mtp_lambda,
                                     backend=tc.backend)
    grads = loss_backward(1.0, cache, state.params)
    losses = (loss, info["lm_loss"], info["balance_loss"], info["mtp_loss"])
    return apply_gradients(state, config, grads, info, losses, tc)


def train(state, config, batch_fn, tc, *, checkpoint_path=None, checkpoint_every=0, stop_at=None, progress=True):
    """Run steps ``state.step .. tc.steps - 1`` (or up to ``stop_at``), drawing each batch as
    ``batch_fn(state.rng, step)``. Saves a checkpoint every ``checkpoint_every`` steps and at the end
    when ``checkpoint_path`` is given. Returns the final :class:`TrainState`."""
    if not isinstance(tc, TrainConfig):
        raise TypeError(f"tc: expected a TrainConfig, got {type(tc).__name__}")
    check_params(state.params, config, "state.params")
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    bar = None
    if progress:
        from tqdm import tqdm  # plain text: tqdm.auto warns in a kernel without ipywidgets
        bar = tqdm(total=end - state.step, desc="train", leave=False)
    while state.step < end:
        state = train_step(state, config, batch_fn(state.rng, state.step), tc)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{state.history['loss'][-1]:.4f}")
        if checkpoint_path is not None and checkpoint_every and state.step % checkpoint_every == 0:
            save_checkpoint(checkpoint_path, state, config)
    if bar is not None:
        bar.close()
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, state, config)
    return state


def _text(obj):
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def save_checkpoint(path, state, config):
    """Parameters, AdamW moments and step, data-RNG state, history and config in one ``.npz``.

    The write is atomic (:func:`refimpl.fileio.atomic_write`): until the new file is complete the
    previous checkpoint at ``path`` stays intact, so a run killed during a save resumes from it.
    """
    arrays = {}
    for prefix, tree in (("params", state.params), ("m", state.opt.m), ("v", state.opt.v)):
        for p, a in zip(tree_paths(tree), tree_flatten(tree)[0], strict=True):
            arrays[f"{prefix}/{p}"] = a
    arrays["meta"] = _text({"step": state.step, "opt_step": state.opt.step, "rng": state.rng.bit_generator.state,
                            "history": state.history, "config": config.to_dict()})
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _unflatten(items):
    root = {}
    for path, a in items:
        keys = path.split(".")
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = a

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [fix(node[str(i)]) for i in range(len(node))]
        return {k: fix(v) for k, v in node.items()}
    return fix(root)


def load_checkpoint(path):
    """Inverse of :func:`save_checkpoint`: ``(TrainState, ModelConfig)`` (no pickle).

    A file that is not a complete checkpoint (truncated, empty, another ``.npz``), a missing or
    extra tensor, a parameter shaped unlike the stored config, or an AdamW moment unlike its
    parameter raises ValueError naming the file and the tensor.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise ValueError("no 'meta' entry")
            meta = json.loads(bytes(z["meta"]).decode())
            trees = {pre: _unflatten([(k[len(pre) + 1:], z[k]) for k in z.files if k.startswith(pre + "/")])
                     for pre in ("params", "m", "v")}
            for k in ("step", "opt_step", "rng", "history", "config"):
                if k not in meta:
                    raise ValueError(f"meta has no {k!r}")
            check_integer("step", meta["step"], low=0)
            check_integer("opt_step", meta["opt_step"], low=0)
            config = ModelConfig.from_dict(meta["config"])
            rng = np.random.Generator(getattr(np.random, meta["rng"]["bit_generator"])())
            rng.bit_generator.state = meta["rng"]
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, zipfile.BadZipFile,
            UnicodeDecodeError) as e:
        raise ValueError(f"path: {path} is not a readable refimpl training checkpoint "
                         f"({type(e).__name__}: {e})") from e
    check_params(trees["params"], config, f"path: {path}: params")
    for pre in ("m", "v"):
        check_params(trees[pre], config, f"path: {path}: AdamW moment {pre}")
        if bool(trees[pre].get("mtp")) != bool(trees["params"].get("mtp")):
            raise ValueError(f"path: {path}: AdamW moment {pre}: its MTP modules do not match the parameters'")
    state = TrainState(trees["params"], AdamWState(meta["opt_step"], trees["m"], trees["v"]), meta["step"], rng,
                       meta["history"])
    return state, config


def train_config_dict(tc):
    """The settings as a plain dict (for logs)."""
    return asdict(tc)
