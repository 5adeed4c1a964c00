"""Differential test against PyTorch autograd: the layer (given refimpl's discrete routing) plus a
balance loss, differentiated by torch in float64, must match the hand-written backward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.moe import (
    balance_backward,
    comm_balance_forward,
    expert_balance_forward,
    moe_backward,
    moe_forward,
    seq_balance_forward,
)
from refimpl.testing import tol

from ._cases import moe_cases

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a, grad=True):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def _tree(tree):
    return {k: _tree(v) for k, v in tree.items()} if isinstance(tree, dict) else _t(tree)


def _ffn(u, wg, wu, wd):
    return (F.silu(u @ wg.T) * (u @ wu.T)) @ wd.T


def torch_moe(x, p, cfg, idx, keep):
    """The MoE layer in torch, with the (discrete) expert choice taken from refimpl."""
    u = x.reshape(-1, x.shape[-1])
    logits = u @ p["gate"]["weight"].T
    s = torch.softmax(logits, -1) if cfg.scoring_func == "softmax" else torch.sigmoid(logits)
    idx_t = torch.as_tensor(idx.reshape(u.shape[0], -1))
    sel = s.gather(1, idx_t)
    w = sel / (sel.sum(1, keepdim=True) + 1e-20) if cfg.norm_topk_prob else sel
    w = w * cfg.routed_scaling_factor * torch.as_tensor(keep, dtype=torch.float64)
    y = torch.zeros_like(u)
    ex = p["experts"]
    for e in range(cfg.n_routed_experts):
        rows, slots = torch.where(idx_t == e)
        if rows.numel():
            out = _ffn(u[rows], ex["gate_proj"][e], ex["up_proj"][e], ex["down_proj"][e])
            y = y.index_add(0, rows, out * w[rows, slots, None])
    if cfg.n_shared_experts:
        sh = p["shared_experts"]
        y = y + _ffn(u, sh["gate_proj"], sh["up_proj"], sh["down_proj"])
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], -1)


def torch_balance(kind, s, idx, alpha, n_dev):
    """Expert-level (V2), communication (V2, with M = n_dev) and V3 sequence-wise losses, from the papers."""
    b, t, e = s.shape
    k = idx.shape[-1]
    counts = torch.as_tensor(np.stack([np.bincount(i.reshape(-1), minlength=e) for i in idx]), dtype=torch.float64)
    f = counts * e / (k * t)
    if kind == "seq_v3":
        p = (s / s.sum(-1, keepdim=True)).mean(1)
        return alpha * (f * p).sum() / b
    if kind == "expert":
        return alpha * (f * s.mean(1)).sum() / b
    dev = idx // (e // n_dev)
    sent = np.stack([[np.bincount(np.unique(r), minlength=n_dev) for r in seq] for seq in dev]).sum(1)
    f2 = torch.as_tensor(sent, dtype=torch.float64) * n_dev / (n_dev * t)       # M = n_dev
    p2 = s.mean(1).reshape(b, n_dev, -1).sum(-1)
    return alpha * (f2 * p2).sum() / b


@given(moe_cases(lead=(2, 4)), st.sampled_from(["expert", "comm", "seq_v3"]), st.sampled_from([None, 0.75]))
def test_layer_and_balance_loss_gradients_match_torch_autograd(case, kind, capacity):
    cfg, params, x = case
    rng = np.random.default_rng(0)
    dy = rng.standard_normal(x.shape)
    alpha = 0.7
    y, cache, info = moe_forward(x, params, cfg, capacity_factor=capacity, backend="numpy")
    n_dev = cfg.n_group
    fwd = {"expert": lambda s, i: expert_balance_forward(s, i, alpha),
           "comm": lambda s, i: comm_balance_forward(s, i, n_dev, n_dev, alpha),
           "seq_v3": lambda s, i: seq_balance_forward(s, i, alpha)}[kind]
    loss, lcache = fwd(info["scores"], info["idx"])
    dx, dp = moe_backward(dy, cache, dscores=balance_backward(1.0, lcache))

    xt, pt = _t(x), _tree(params)
    keep = (cache.plan.pos >= 0)
    yt, st_ = torch_moe(xt, pt, cfg, info["idx"], keep)
    lt = torch_balance(kind, st_, info["idx"], alpha, n_dev)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol("torch64"))
    np.testing.assert_allclose(loss, lt.item(), **tol("torch64"))
    ((yt * torch.as_tensor(dy)).sum() + lt).backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol("torch64"))

    def compare(mine, theirs, where):
        for k, v in mine.items():
            if isinstance(v, dict):
                compare(v, theirs[k], f"{where}.{k}")
            else:
                g = theirs[k].grad
                want = np.zeros_like(v) if g is None else g.numpy()     # the bias never enters the graph
                np.testing.assert_allclose(v, want, err_msg=f"{where}.{k}", **tol("torch64"))
    compare(dp, pt, "params")
