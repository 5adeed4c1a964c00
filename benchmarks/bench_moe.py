"""DeepSeekMoE layer: refimpl-NumPy vs refimpl-Numba vs torch's usual loop over experts.

Shapes are V2-Lite's MoE layer scaled to half width: N = 4096 tokens, D = 1024, E = 64 routed
experts of width I = 704 (V2-Lite: 2048 and 1408), top-6, 2 shared experts (one MLP of width 2I),
greedy softmax routing with scale 1, float32. Cases:

* ``moe/layer-fwd+bwd`` -- :func:`~refimpl.moe.moe_forward` + :func:`~refimpl.moe.moe_backward`
  vs the same layer in torch written as HF does it (``torch.where`` per expert, ``index_add_``),
  differentiated by autograd. GEMM-bound: FLOPs are declared.
* ``moe/experts-fwd+bwd`` -- only the per-expert GEMMs (forward + backward) on dispatched rows, to
  read the fraction of the GEMM peak the expert loop reaches; the Numba variant runs the SwiGLU
  between the GEMMs as the fused twin (``experts_forward(..., backend="numba")``).
* ``moe/dispatch+combine`` -- the data movement alone: plan, dispatch, combine and their backwards
  (the part with a Numba twin), every output written into a buffer reused from the previous call
  (``out=``; torch: ``out=`` and in-place index assignment), the steady state of a training loop;
  ``moe/dispatch+combine-fresh`` the same with fresh outputs (first-touch page faults included).
* ``moe/select-experts`` -- V3 routing choice: 256 experts in 8 groups, top-4 groups by top-2 sum,
  top-8 (the routing loops' Numba twin), vs torch ops as in HF's ``DeepseekV3TopkRouter``.

The router runs in float32 on both sides, so a near-tie can flip a choice between refimpl and
torch; the data is built so that refimpl's and torch's choices agree (rows that disagree are
redrawn), which makes the elementwise check meaningful.
"""

from __future__ import annotations

import numpy as np

from refimpl.backend import kernel
from refimpl.config import ModelConfig
from refimpl.moe import gate_forward, init_moe_params, moe_backward, moe_forward, select_experts
from refimpl.moe.dispatch import (
    combine,
    combine_backward,
    dispatch,
    dispatch_backward,
    experts_backward,
    experts_forward,
    make_plan,
)

from .harness import NUMBA, NUMPY, TORCH, Case, assert_outputs_close, import_torch, numba_dispatchers, register


def _config(quick):
    cfg = ModelConfig.preset("deepseek-v2-lite").replace(hidden_size=1024, moe_intermediate_size=704)
    if quick:
        cfg = cfg.replace(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16)
    return cfg, (256 if quick else 4096)


def _data(quick):
    cfg, n = _config(quick)
    rng = np.random.default_rng(0)
    params = init_moe_params(cfg, rng, dtype=np.float32, std=0.02)
    params["gate"]["weight"] = (rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size)) /
                                np.sqrt(cfg.hidden_size)).astype(np.float32)
    x = rng.standard_normal((n, cfg.hidden_size)).astype(np.float32)
    torch = import_torch()
    if torch is not None:                     # redraw tokens whose float32 choice differs in torch
        for _ in range(10):
            r, _ = gate_forward(x, params["gate"], cfg)
            s = torch.softmax(torch.from_numpy(x) @ torch.from_numpy(params["gate"]["weight"]).T, -1)
            ti = torch.topk(s, cfg.num_experts_per_tok, -1).indices.numpy()
            bad = np.flatnonzero((np.sort(ti, 1) != np.sort(r.idx, 1)).any(1))
            if not bad.size:
                break
            x[bad] = rng.standard_normal((bad.size, cfg.hidden_size)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return cfg, params, x, dy


def _layer_flops(cfg, n):
    d, i, e, k, ns = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                      cfg.num_experts_per_tok, cfg.n_shared_experts)
    # 3 GEMMs of 2*rows*D*I per expert forward, twice that backward; the gate 2*N*D*E (x3 with backward)
    return 18.0 * n * d * i * (k + ns) + 6.0 * n * d * e


def _torch_layer(torch, cfg, params, x, dy):
    f = torch.nn.functional
    t = lambda a: torch.from_numpy(a).requires_grad_(True)
    wg, ex, sh = t(params["gate"]["weight"]), {k: t(v) for k, v in params["experts"].items()}, \
        {k: t(v) for k, v in params["shared_experts"].items()}
    xt, dyt = t(x), torch.from_numpy(dy)
    leaves = [xt, wg, ex["gate_proj"], ex["up_proj"], ex["down_proj"]]

    def fn():
        s = torch.softmax(xt @ wg.T, -1)
        w, idx = torch.topk(s, cfg.num_experts_per_tok, -1)
        w = w * cfg.routed_scaling_factor
        y = torch.zeros_like(xt)
        for e in range(cfg.n_routed_experts):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                u = xt[rows]
                h = f.silu(u @ ex["gate_proj"][e].T) * (u @ ex["up_proj"][e].T)
                y.index_add_(0, rows, (h @ ex["down_proj"][e].T) * w[rows, slot, None])   # in place, as HF
        y = y + (f.silu(xt @ sh["gate_proj"].T) * (xt @ sh["up_proj"].T)) @ sh["down_proj"].T
        grads = torch.autograd.grad((y * dyt).sum(), leaves)
        return (y.detach(), *grads)
    return fn


@register("moe/layer-fwd+bwd")
def moe_layer(quick: bool) -> Case:
    cfg, params, x, dy = _data(quick)
    n = x.shape[0]
    case = Case(params={"N": n, "D": cfg.hidden_size, "E": cfg.n_routed_experts, "K": cfg.num_experts_per_tok,
                        "I": cfg.moe_intermediate_size, "shared": cfg.n_shared_experts, "dtype": "float32"},
                description="DeepSeekMoE layer forward + backward (V2-Lite-like, half width): softmax top-6 router, "
                            "sparse dispatch, per-expert SwiGLU GEMMs, weighted combine, 2 shared experts.",
                flops=_layer_flops(cfg, n))

    def refimpl(backend):
        def fn():
            y, cache, _ = moe_forward(x, params, cfg, backend=backend)
            dx, dp = moe_backward(dy, cache)
            ex = dp["experts"]
            return y, dx, dp["gate"]["weight"], ex["gate_proj"], ex["up_proj"], ex["down_proj"]
        return fn
    case.add(NUMPY, refimpl("numpy"))
    case.add(NUMBA, refimpl("numba"), jit=numba_dispatchers(kernel("moe_nb")))
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        case.add(TORCH, _torch_layer(torch, cfg, params, x, dy))
    labels = ("y", "dx", "dgate", "dgate_proj", "dup_proj", "ddown_proj")
    # float32 sums of a few thousand terms in different orders on each side
    case.check = lambda outs: assert_outputs_close(outs, rtol=1e-3, atol_scale=1e-4, labels=labels)
    return case


def _plan_data(quick):
    cfg, params, x, dy = _data(quick)
    r, _ = gate_forward(x, params["gate"], cfg)
    return cfg, params, x, dy, r


@register("moe/experts-fwd+bwd")
def moe_experts(quick: bool) -> Case:
    cfg, params, x, dy, r = _plan_data(quick)
    plan = make_plan(r.idx, cfg.n_routed_experts, backend="numpy")
    xs = dispatch(x, plan, backend="numpy")
    dys = np.random.default_rng(1).standard_normal(xs.shape).astype(np.float32)
    rows = xs.shape[0]
    case = Case(params={"rows": rows, "D": cfg.hidden_size, "E": cfg.n_routed_experts,
                        "I": cfg.moe_intermediate_size, "dtype": "float32"},
                description="Routed experts only: one SwiGLU FFN per expert on its block of dispatched rows, "
                            "forward + backward (3 + 6 GEMMs per expert).",
                flops=18.0 * rows * cfg.hidden_size * cfg.moe_intermediate_size)

    def refimpl(backend):
        def fn():
            ys, c = experts_forward(xs, params["experts"], plan.offsets, backend=backend)
            dxs, dex = experts_backward(dys, c)
            return ys, dxs, dex["gate_proj"], dex["down_proj"]
        return fn
    case.add(NUMPY, refimpl("numpy"))
    # the same GEMMs; the SwiGLU between them is the fused twin (refimpl.kernels.activations_nb)
    case.add(NUMBA, refimpl("numba"), jit=numba_dispatchers(kernel("activations_nb")))
    # float32 SwiGLU values differ by a few ulp (exp32 vs NumPy's tanh form), then go through GEMMs
    case.check = lambda outs: assert_outputs_close(outs, rtol=1e-4, atol_scale=1e-5,
                                                   labels=("ys", "dxs", "dgate_proj", "ddown_proj"))
    return case


def _dispatch_combine(quick: bool, reuse: bool) -> Case:
    cfg, params, x, dy, r = _plan_data(quick)
    rng = np.random.default_rng(2)
    ys = rng.standard_normal((x.shape[0] * cfg.num_experts_per_tok, x.shape[1])).astype(np.float32)
    n, d = x.shape
    case = Case(params={"N": n, "D": d, "E": cfg.n_routed_experts, "K": cfg.num_experts_per_tok,
                        "outputs": "reused" if reuse else "fresh", "dtype": "float32"},
                # least traffic: x, y, dy, dx once each (N x D) and xs, ys (twice), dys (twice) (A x D)
                bytes_moved=4 * x.nbytes + 5 * ys.nbytes,
                description="Data movement of the sparse layer: plan (sort copies by expert), dispatch (gather), "
                            "combine (weighted gather-sum) and the backward of both; "
                            + ("every output written into a buffer reused from the previous call (out=), "
                               "as a training loop would" if reuse else
                               "every output a fresh array (first-touch page faults included)") + ".")

    def buffers():                          # one set per variant: the check compares first-call outputs
        if not reuse:
            return None
        return (np.empty_like(ys), np.empty_like(x), np.empty_like(ys), np.empty_like(r.weights), np.empty_like(x))

    def refimpl(backend):
        b = buffers()

        def fn():
            plan = make_plan(r.idx, cfg.n_routed_experts, backend=backend)
            xs = dispatch(x, plan, backend=backend, out=b and b[0])
            y = combine(ys, r.weights, plan, backend=backend, out=b and b[1])
            dys, dw = combine_backward(dy, ys, r.weights, plan, backend=backend, out=b and b[2:4])
            dx = dispatch_backward(dys, plan, backend=backend, out=b and b[4])
            return xs, y, dys, dw, dx
        return fn
    case.add(NUMPY, refimpl("numpy"))
    case.add(NUMBA, refimpl("numba"), jit=numba_dispatchers(kernel("moe_nb")))
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        it, xt, yst, wt, dyt = (torch.from_numpy(a) for a in (r.idx, x, ys, r.weights, dy))
        tb = buffers()
        tb = tb and tuple(torch.from_numpy(a) for a in tb)

        def torch_fn():
            k = it.shape[1]
            order = torch.sort(it.reshape(-1), stable=True).indices
            pos = torch.empty_like(order)
            pos[order] = torch.arange(order.numel())
            pos = pos.view_as(it)
            if tb is None:
                xs = xt.index_select(0, order // k)
                y = (yst[pos] * wt[..., None]).sum(1)
                dys = torch.empty_like(yst)
                dys[pos.reshape(-1)] = (wt[..., None] * dyt[:, None, :]).reshape(-1, d)
                dw = (yst[pos] * dyt[:, None, :]).sum(-1)
                dx = dys[pos].sum(1)
                return xs, y, dys, dw, dx
            xs, y, dys, dw, dx = tb
            torch.index_select(xt, 0, order // k, out=xs)
            torch.sum(yst[pos] * wt[..., None], 1, out=y)
            dys[pos.reshape(-1)] = (wt[..., None] * dyt[:, None, :]).reshape(-1, d)
            torch.sum(yst[pos] * dyt[:, None, :], -1, out=dw)
            torch.sum(dys[pos], 1, out=dx)
            return xs, y, dys, dw, dx
        case.add(TORCH, torch_fn)
    case.check = lambda outs: assert_outputs_close(outs, rtol=1e-5, atol_scale=1e-6,
                                                   labels=("xs", "y", "dys", "dweights", "dx"))
    return case


@register("moe/dispatch+combine")
def moe_dispatch_combine(quick: bool) -> Case:
    """The training-loop steady state: outputs written into buffers reused from call to call."""
    return _dispatch_combine(quick, reuse=True)


@register("moe/dispatch+combine-fresh")
def moe_dispatch_combine_fresh(quick: bool) -> Case:
    """The same with a fresh array for every output (what a caller without ``out=`` gets)."""
    return _dispatch_combine(quick, reuse=False)


@register("moe/select-experts")
def moe_select(quick: bool) -> Case:
    n, e, groups, topk_group, k = (256, 64, 8, 4, 8) if quick else (4096, 256, 8, 4, 8)
    sel = np.random.default_rng(3).random((n, e)).astype(np.float32)
    case = Case(params={"N": n, "E": e, "n_group": groups, "topk_group": topk_group, "K": k, "dtype": "float32"},
                bytes_moved=sel.nbytes + n * k * 8,
                description="V3 routing choice: group score = sum of the top-2 biased scores, keep the best "
                            "topk_group groups (others -inf), top-K experts.")
    kw = dict(n_group=groups, topk_group=topk_group, group_score="top2_sum")
    case.add(NUMPY, lambda: np.sort(select_experts(sel, k, backend="numpy", **kw), 1))
    case.add(NUMBA, lambda: np.sort(select_experts(sel, k, backend="numba", **kw), 1),
             jit=numba_dispatchers(kernel("moe_nb")))
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        st = torch.from_numpy(sel)

        def torch_fn():                                 # the ops of HF's DeepseekV3TopkRouter
            g = st.view(n, groups, -1).topk(2, -1)[0].sum(-1)
            gi = torch.topk(g, topk_group, -1, sorted=False)[1]
            mask = torch.zeros_like(g).scatter_(1, gi, 1).unsqueeze(-1).expand(n, groups, e // groups).reshape(n, e)
            idx = torch.topk(st.masked_fill(~mask.bool(), float("-inf")), k, -1, sorted=False)[1]
            return torch.sort(idx, 1).values
        case.add(TORCH, torch_fn)
    case.check = lambda outs: assert_outputs_close(outs, rtol=0.0, labels=("idx",))
    return case
