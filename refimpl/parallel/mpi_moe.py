r"""Expert-parallel DeepSeekMoE over MPI ranks: dispatch and combine with ``Alltoallv``, hand-written backward.

DeepSeek-V2 (§2.2.2, §3.1.2) and V3 (§2.1.2, §3.2.2) train with *expert parallelism*: the ``E``
routed experts of a layer are spread over devices (V3: 256 experts over 64 GPUs on 8 nodes), each
device keeps its own tokens (data-parallel attention), and every MoE layer moves token copies to the
devices that hold their experts and the results back. Here ``R`` MPI ranks play the devices:

* rank ``r`` holds experts ``[r E/R, (r+1) E/R)`` (contiguous shards, as
  :func:`refimpl.moe.traffic.expert_placement`), the whole router and the shared experts;
* routing is the single-process router (:func:`refimpl.moe.gating.gate_forward`), per token, so V2's
  device-limited and V3's node-limited top-k hold unchanged (with ``n_group`` = devices or nodes);
* **dispatch**: each token is sent *once per destination rank* that holds at least one of its K
  experts: an ``Alltoall`` of row counts, then ``Alltoallv`` of the hidden rows, of the local expert
  slot ids and of the gate weights;
* each rank runs :func:`refimpl.moe.dispatch.make_plan` / ``experts_forward`` on what it received and
  forms, per received row, the weighted sum of its local experts' outputs;
* **combine**: the reverse ``Alltoallv`` returns one partial sum per (token, rank), which the token's
  home rank adds up, then adds the shared experts, computed locally.

With ``two_hop=True`` the dispatch goes in two stages, as V3's kernels do (§3.2.2): a token crosses
to each remote *node* that holds one of its experts **once** (to the rank with the same index within
that node, labels ``inter/...``), and that rank forwards it within the node to the ranks holding the
experts (labels ``intra/...``); the combine returns along the same two hops, each rank summing the
partial results it forwarded. Cross-node traffic then equals
:func:`refimpl.moe.traffic.all_to_all_stats`' ``cross_node_tokens``, which node-limited routing
caps at M per token; the one-hop dispatch's equals its ``cross_node_tokens_per_device``.

The backward mirrors the forward: the output gradient goes out like a dispatch (the combine's
adjoint), each rank back-propagates through its experts, and the input and gate-weight gradients
come home like a combine (the dispatch's adjoint). Outputs and input gradients equal
:func:`refimpl.moe.layer.moe_forward` / ``moe_backward`` on the concatenated tokens to float64
round-off; each rank's expert gradients are complete for its shard, while the router and shared-expert
gradients are this rank's partial sums (a data-parallel all-reduce adds them up).

Simplification: no token dropping (V3 drops none; V2's device capacity needs a global view).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_integer, check_shape
from ..backend import resolve_backend
from ..core.activations import swiglu_mlp_backward, swiglu_mlp_forward
from ..moe.balance import expert_load
from ..moe.dispatch import (
    combine,
    combine_backward,
    dispatch,
    dispatch_backward,
    experts_backward,
    experts_forward,
    make_plan,
)
from ..moe.gating import check_gate_params, check_router_config, gate_backward, gate_forward
from ..moe.layer import check_moe_params


class Hop(NamedTuple):
    rows: np.ndarray        # (Ns,) int64 local row of each copy sent, sorted by destination rank
    sendcounts: np.ndarray  # (R,) int64 copies sent to each rank
    recvcounts: np.ndarray  # (R,) int64 copies received from each rank


class EPCache(NamedTuple):
    gate: object           # GateCache of the local tokens
    inter: Hop | None      # the node hop of the two-hop dispatch, or None
    hop: Hop               # the hop to the ranks that hold the experts
    n_mid: int             # rows between the hops (the tokens themselves without two_hop)
    plan: object           # DispatchPlan of the received rows over the local experts
    experts: object        # ExpertsCache of the local experts
    ys: np.ndarray         # (A, D) local expert outputs, expert-sorted
    wr: np.ndarray         # (Nr, K) received gate weights (0 for slots held by other ranks)
    shared: object | None  # SwiGLUMLPCache or None
    shape: tuple           # shape of x
    comm: object           # refimpl.parallel.comm.Comm
    backend: str | None


def shard_experts(experts, rank, size):
    """Rank ``rank``'s contiguous block of stacked experts: each ``(E, ...)`` array -> ``(E/size, ...)``."""
    if not isinstance(experts, dict) or "gate_proj" not in experts:
        raise ValueError("experts: expected the dict of stacked expert arrays (gate_proj (E, I, D), ...)")
    e = np.shape(experts["gate_proj"])[0]
    size, rank = check_integer("size", size), check_integer("rank", rank)
    if size < 1 or e % size:
        raise ValueError(f"size: expected a divisor of the {e} experts, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank: expected 0 <= rank < {size}, got {rank}")
    n = e // size
    return {k: np.ascontiguousarray(v[rank * n:(rank + 1) * n]) for k, v in experts.items()}


def shard_params(params, rank, size):
    """The MoE params a rank holds: router and shared experts whole, routed experts sharded."""
    out = dict(params)
    out["experts"] = shard_experts(params["experts"], rank, size)
    return out


def _check_local(x, params, config, size):
    """Local validation (run under Comm.agree so that every rank raises the same error): the router
    config, ``x``, the router's parameters and this rank's ``E / size`` experts, checked by
    :func:`refimpl.moe.layer.check_moe_params` as the experts of an ``E / size``-expert layer."""
    check_router_config(config)
    e = config.n_routed_experts
    if e % size:
        raise ValueError(f"config.n_routed_experts: expected a multiple of the {size} ranks (each rank holds "
                         f"a contiguous block of E/ranks experts), got {e}")
    check_float("x", x, min_ndim=1)
    if x.shape[-1] != config.hidden_size:
        raise ValueError(f"x: expected last axis hidden_size={config.hidden_size}, got shape {x.shape}")
    local = dataclasses.replace(config, n_routed_experts=e // size)     # this rank's layer (not re-validated)
    try:
        check_moe_params(params, local, x.dtype)
    except ValueError as err:
        raise ValueError(f"{err} (this rank holds E/ranks = {e // size} experts; see shard_params)") from None
    check_gate_params(x.reshape(-1, x.shape[-1]), params["gate"], config)


def _scatter_add(out, rows, vals):
    """out[rows[j]] += vals[j]; ``rows`` may repeat (one row per destination rank)."""
    np.add.at(out, rows, vals)
    return out


def _plan_hop(comm, dest, label):
    """Copies to send: one per (row, distinct destination rank) of ``dest`` (M, K) (-1: no slot).

    Exchanges the counts (``<label>/counts``) and returns the :class:`Hop` and ``mine`` (S, K), the
    slots of each copy that its destination is responsible for."""
    m, r = dest.shape[0], comm.size
    sent = np.zeros((m, r + 1), dtype=bool)                               # (Nm, R + 1), column R: no slot
    np.put_along_axis(sent, np.where(dest >= 0, dest, r), True, axis=1)
    to, rows = np.nonzero(sent[:, :r].T)                                  # (Ns,), (Ns,) sorted by rank, then row
    sendcounts = np.bincount(to, minlength=r).astype(np.int64)            # (R,)
    recvcounts = comm.exchange_counts(sendcounts, f"{label}/counts")      # (R,)
    return Hop(rows, sendcounts, recvcounts), dest[rows] == to[:, None]   # (Ns, K)


def _out(comm, hop, a, label):
    """Send ``a[hop.rows]`` along the hop (dispatch direction)."""
    return comm.alltoallv(a[hop.rows], hop.sendcounts, hop.recvcounts, label)


def _back(comm, hop, a, n_rows, label):
    """Return rows along the hop (combine direction) and add them into their ``n_rows`` sources."""
    got = comm.alltoallv(a, hop.recvcounts, hop.sendcounts, label)        # (Ns, ...)
    return _scatter_add(np.zeros((n_rows,) + a.shape[1:], dtype=a.dtype), hop.rows, got)


def ep_moe_forward(x, params, config, comm, *, two_hop=False, mask_value=-np.inf, backend=None):
    r"""Expert-parallel DeepSeekMoE output (without the residual) for this rank's tokens.

    .. math:: y_t = \sum_{i=1}^{E_s}\mathrm{FFN}^{(s)}_i(u_t)
              + \sum_{r=0}^{R-1} \underbrace{\sum_{i \in \mathcal{T}_t \cap \mathcal{E}_r}
                g_{i,t}\,\mathrm{FFN}^{(r)}_i(u_t)}_{\text{computed on rank } r}

    (DeepSeek-V3 §2.1.2 eq. 12; the routed combine of the single-process layer, split by rank):
    :math:`\mathcal{T}_t` are token t's K routed experts, :math:`\mathcal{E}_r` rank r's experts.

    Every rank must call it (collective); bad input on any rank raises the same error on all.

    Parameters
    ----------
    x : ndarray
        (..., D) this rank's tokens (any number, also none).
    params : dict
        This rank's MoE params (see :func:`shard_params`): ``gate`` and ``shared_experts`` whole,
        ``experts`` the (E/R, ...) shard holding experts ``rank*E/R`` to ``(rank+1)*E/R - 1``.
        The router and shared experts must be the same on every rank; shapes are checked on every
        call, values are not (:func:`refimpl.parallel.data_parallel.dp_train` checks them once).
    config : ModelConfig
        The same on every rank (checked by fingerprint).
    comm : Comm
        A :class:`refimpl.parallel.comm.Comm`; its log receives the bytes of every all-to-all, and
        its ``devices_per_node`` groups the ranks into nodes.
    two_hop : bool
        Dispatch once per remote node, then forward within the node (V3 §3.2.2; see the module).

    Returns
    -------
    y : ndarray
        (..., D) the layer output for this rank's tokens.
    cache : EPCache
        For :func:`ep_moe_backward`.
    info : dict
        ``idx``, ``weights``, ``scores`` of the local tokens (as :func:`refimpl.moe.layer.moe_forward`),
        ``load`` (E,) selections by the local tokens, ``expert_rows`` (E/R,) rows computed by each
        local expert, ``sendcounts`` and ``recvcounts`` (R,) of the hop to the experts.
    """
    comm.check_same("config", {"config": config, "ranks": comm.size, "devices_per_node": comm.devices_per_node,
                               "two_hop": bool(two_hop), "mask_value": float(mask_value),
                               "dtype": str(getattr(x, "dtype", None))})
    comm.agree(_check_local, x, params, config, comm.size)
    e, k, dpn = config.n_routed_experts, config.num_experts_per_tok, comm.devices_per_node
    n_loc = e // comm.size
    u = x.reshape(-1, x.shape[-1])                                        # (N, D)
    backend = resolve_backend(backend, work=max(u.size * k, 1))
    routing, gcache = gate_forward(u, params["gate"], config, mask_value=mask_value, backend=backend)
    xm, em, wm = u, routing.idx, routing.weights                          # (Nm, D), (Nm, K), (Nm, K) rows to route
    inter, pre = None, ""
    if two_hop:
        # hop 1: once per target node, to the rank with this rank's index within that node
        node = routing.idx // (n_loc * dpn)                               # (N, K) node of each chosen expert
        inter, mine = _plan_hop(comm, node * dpn + comm.rank % dpn, "inter/dispatch")
        xm = _out(comm, inter, u, "inter/dispatch/x")                     # (Nm, D)
        em = comm.alltoallv(np.where(mine, routing.idx[inter.rows], -1), inter.sendcounts, inter.recvcounts,
                            "inter/dispatch/experts")                     # (Nm, K) global ids on this node, else -1
        wm = comm.alltoallv(np.where(mine, routing.weights[inter.rows], 0.0), inter.sendcounts, inter.recvcounts,
                            "inter/dispatch/weights")                     # (Nm, K)
        pre = "intra/"
    # hop to the experts: once per rank holding at least one of the row's experts
    owner = np.where(em >= 0, em // n_loc, -1)                            # (Nm, K) rank of each slot's expert
    hop, mine = _plan_hop(comm, owner, pre + "dispatch")
    xr = _out(comm, hop, xm, pre + "dispatch/x")                          # (Nr, D)
    lid = comm.alltoallv(np.where(mine, em[hop.rows] - owner[hop.rows] * n_loc, -1), hop.sendcounts,
                         hop.recvcounts, pre + "dispatch/slots")          # (Nr, K) local expert id or -1
    wr = comm.alltoallv(np.where(mine, wm[hop.rows], 0.0).astype(u.dtype), hop.sendcounts, hop.recvcounts,
                        pre + "dispatch/weights")                         # (Nr, K)
    # local experts on the received rows: the single-process machinery
    keep = lid >= 0                                                       # (Nr, K)
    plan = make_plan(np.where(keep, lid, 0), n_loc, keep, backend=backend)
    xs = dispatch(xr, plan, backend=backend)                              # (A, D)
    ys, ecache = experts_forward(xs, params["experts"], plan.offsets)     # (A, D)
    yr = combine(ys, wr, plan, backend=backend)                           # (Nr, D) partial sum per row
    # combine: the reverse all-to-alls, each sender adding up the partial sums of its rows
    y = _back(comm, hop, yr, xm.shape[0], pre + "combine/y")              # (Nm, D)
    if two_hop:
        y = _back(comm, inter, y, u.shape[0], "inter/combine/y")          # (N, D)
    scache = None
    if config.n_shared_experts:
        y_shared, scache = swiglu_mlp_forward(u, params["shared_experts"])  # (N, D)
        y = y + y_shared                                                  # (N, D)
    lead = x.shape[:-1]
    info = {"idx": routing.idx.reshape(*lead, k), "weights": routing.weights.reshape(*lead, k),
            "scores": routing.scores.reshape(*lead, e), "load": expert_load(routing.idx, e),
            "expert_rows": np.diff(plan.offsets), "sendcounts": hop.sendcounts, "recvcounts": hop.recvcounts}
    cache = EPCache(gcache, inter, hop, xm.shape[0], plan, ecache, ys, wr, scache, x.shape, comm, backend)
    return y.reshape(x.shape), cache, info


def ep_moe_backward(dy, cache, dscores=None):
    """Gradients of :func:`ep_moe_forward`; its all-to-alls run in mirror order (collective).

    Returns ``dx`` (..., D) for this rank's tokens and ``dparams``: ``experts`` complete for this
    rank's shard; ``gate`` and ``shared_experts`` this rank's partial sums (sum them over ranks).
    ``dscores`` (..., E): optional gradient at ``info["scores"]`` (balance losses).
    """
    gcache, inter, hop, n_mid, plan, ecache, ys, wr, scache, shape, comm, backend = cache
    e = gcache.scores.shape[1]
    pre = "intra/" if inter is not None else ""

    def check():
        check_float("dy", dy)
        check_shape("dy", dy, shape, "the shape of x")
        if dscores is not None:
            check_shape("dscores", np.asarray(dscores), shape[:-1] + (e,), "(..., E), like info['scores']")
    comm.agree(check)
    dyf = dy.reshape(-1, shape[-1])                                       # (N, D)
    dparams = {}
    dx = np.zeros_like(dyf)                                               # (N, D)
    if scache is not None:
        # forward: y = y_routed + shared(u)
        dx_shared, dparams["shared_experts"] = swiglu_mlp_backward(dyf, scache)  # (N, D)
        dx += dx_shared
    # forward: y[rows] += returned partial sums (combine)    so: send dy out along the same hops
    dym = dyf if inter is None else _out(comm, inter, dyf, "inter/combine_bwd/dy")  # (Nm, D)
    dyr = _out(comm, hop, dym, pre + "combine_bwd/dy")                    # (Nr, D)
    # forward: yr = combine(ys, wr)
    dys, dwr = combine_backward(dyr, ys, wr, plan, backend=backend)       # (A, D), (Nr, K)
    # forward: ys = experts(xs)
    dxs, dparams["experts"] = experts_backward(dys, ecache)               # (A, D)
    # forward: xs = dispatch(xr)
    dxr = dispatch_backward(dxs, plan, backend=backend)                   # (Nr, D)
    # forward: xr, wr = rows and weights sent out (dispatch)    so: send the gradients home, adding copies
    dxm = _back(comm, hop, dxr, n_mid, pre + "dispatch_bwd/dx")           # (Nm, D)
    dwm = _back(comm, hop, dwr, n_mid, pre + "dispatch_bwd/weights")      # (Nm, K), 0 on other ranks' slots
    if inter is not None:
        dxm = _back(comm, inter, dxm, dyf.shape[0], "inter/dispatch_bwd/dx")        # (N, D)
        dwm = _back(comm, inter, dwm, dyf.shape[0], "inter/dispatch_bwd/weights")   # (N, K)
    dx += dxm
    # forward: weights, scores = gate(u)
    if dscores is not None:
        dscores = np.asarray(dscores).reshape(-1, e)                      # (N, E)
    dx_gate, dparams["gate"] = gate_backward(dwm, gcache, dscores)        # (N, D)
    dx += dx_gate
    return dx.reshape(shape), {k: dparams[k] for k in ("gate", "experts", "shared_experts") if k in dparams}
