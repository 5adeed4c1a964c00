r"""Routing collapse and three cures, on a toy regression problem (the "DeepSeekMoE" chapter's experiment).

An MoE layer (V3-style sigmoid router with ``e_score_correction_bias``, no group limit, no shared
experts) is trained with hand-written gradients to imitate a piecewise-linear teacher: tokens come
from ``n_clusters`` clusters around a common offset (real hidden states share a large common
direction too) and each cluster has its own linear map. Three runs differ only in balancing:

* ``"none"`` — plain MSE. The experts that win the first steps get trained, become better and
  win more: the load collapses onto a few experts ("routing collapse", Shazeer et al. 2017;
  DeepSeek-V2 §2.2.3).
* ``"aux"`` — MSE plus an auxiliary balance loss :math:`\alpha\sum_i f_i P_i`, here V3's
  normalised-score form (eq. 17-20) computed over the whole batch, with a toy-sized ``aux_alpha``.
* ``"bias"`` — MSE only, with V3's auxiliary-loss-free bias update
  :math:`b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\bar c - c_i)` after every step (§2.1.2).

Every run records per-expert load, MaxVio and the loss at every step. The optimiser is
:func:`refimpl.optim.adamw_update` with betas (0.9, 0.999) and no weight decay (plain Adam). Runs
are deterministic given ``seed``.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..moe import (
    balance_backward,
    bias_update,
    init_moe_params,
    max_violation,
    moe_backward,
    moe_forward,
    seq_balance_forward,
)
from ..optim import adamw_init, adamw_update

MODES = ("none", "aux", "bias")


def toy_config(n_experts=16, top_k=2, hidden=16, inter=16, scoring_func="sigmoid", norm_topk_prob=True):
    """The layer used by :func:`moe_balance_run`: V3 router (sigmoid, bias, renormalised), no groups."""
    return ModelConfig.preset("tiny").replace(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n_experts, num_experts_per_tok=top_k,
        n_group=1, topk_group=1, n_shared_experts=0, topk_method="noaux_tc", scoring_func=scoring_func,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=1.0)


def _teacher(rng, hidden, n_clusters, offset):
    centers = rng.standard_normal((n_clusters, hidden))                   # (n_clusters, D)
    maps = rng.standard_normal((n_clusters, hidden, hidden)) / np.sqrt(hidden)  # (n_clusters, D, D)
    common = np.full(hidden, float(offset))                               # (D,) shared direction
    return centers, maps, common


def _batch(rng, teacher, batch):
    centers, maps, common = teacher
    c = rng.integers(0, centers.shape[0], batch)                          # (N,)
    x = common + centers[c] + 0.3 * rng.standard_normal((batch, centers.shape[1]))  # (N, D)
    y = np.einsum("nij,nj->ni", maps[c], x - common)                      # (N, D)
    return x, y


def moe_balance_run(steps=300, *, modes=MODES, n_experts=16, top_k=2, hidden=16, inter=16, n_clusters=16,
                    batch=512, offset=2.0, lr=3e-3, aux_alpha=0.3, gamma=0.01, seed=0, progress=True,
                    scoring_func="sigmoid", norm_topk_prob=False, gate_std=0.1):
    """Train the toy MoE under each balancing mode; return the histories.

    The default router is V3's sigmoid + bias selection *without* renormalising the kept scores
    (``norm_topk_prob=False``): then every chosen expert's score is rewarded directly when it helps,
    and collapse is fast and complete in a few hundred steps. With V3's renormalisation and K = 2
    the gate's gradient only shifts weight between the two chosen experts, so at this toy scale the
    load becomes skewed but does not fully collapse (pass ``norm_topk_prob=True`` to see it).
    ``aux_alpha`` (0.3) and ``gamma`` (0.01) are toy-sized: V3 uses 1e-4 and 1e-3 over ~10^5 steps.

    Returns ``{"config": ModelConfig, "runs": {mode: {"load": (steps, E) int64 selections per expert,
    "maxvio": (steps,), "loss": (steps,) MSE, "bias": (E,) final correction bias}}}``.
    Every mode starts from the same parameters and sees the same batches.
    """
    from tqdm import tqdm  # plain text: tqdm.auto warns (TqdmWarning) in a kernel without ipywidgets

    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes: expected a subset of {MODES}, got {m!r}")
    cfg = toy_config(n_experts, top_k, hidden, inter, scoring_func, norm_topk_prob)
    teacher = _teacher(np.random.default_rng(seed), hidden, n_clusters, offset)
    init = init_moe_params(cfg, np.random.default_rng(seed + 1), std=0.1)
    init["gate"]["weight"] *= gate_std / 0.1
    runs = {}
    for mode in modes:
        params = {k: {kk: vv.copy() for kk, vv in v.items()} for k, v in init.items()}
        data_rng = np.random.default_rng(seed + 2)
        state, hist = adamw_init(params), {"load": [], "maxvio": [], "loss": []}
        for _ in tqdm(range(steps), desc=f"moe_balance[{mode}]", disable=not progress, leave=False):
            x, y_true = _batch(data_rng, teacher, batch)
            y, cache, info = moe_forward(x, params, cfg, backend="numpy")
            err = y - y_true                                              # (N, D)
            loss = 0.5 * float(np.mean(np.sum(err * err, axis=-1)))
            dscores = None
            if mode == "aux":
                _, bcache = seq_balance_forward(info["scores"][None], info["idx"][None], aux_alpha)
                dscores = balance_backward(1.0, bcache)[0]                # (N, E)
            _, grads = moe_backward(err / batch, cache, dscores=dscores)
            bias = params["gate"]["e_score_correction_bias"]
            params, state = adamw_update(params, grads, state, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
            params["gate"]["e_score_correction_bias"] = bias              # not a trained parameter
            if mode == "bias":
                params["gate"]["e_score_correction_bias"] = bias_update(bias, info["load"], gamma)
            hist["load"].append(info["load"])
            hist["maxvio"].append(max_violation(info["load"]))
            hist["loss"].append(loss)
        runs[mode] = {"load": np.array(hist["load"]), "maxvio": np.array(hist["maxvio"]),
                      "loss": np.array(hist["loss"]), "bias": params["gate"]["e_score_correction_bias"].copy()}
    return {"config": cfg, "runs": runs}
