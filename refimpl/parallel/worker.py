"""MPI entry points, run as ``mpiexec -n k python -m refimpl.parallel.worker <task> ...``.

Each task builds its inputs deterministically (:func:`make_layer_case`, so a single process can
rebuild the same case and compare), runs the distributed code, and rank 0 writes the gathered
results to ``--out`` (``.npz``, no pickle). Tasks:

* ``layer``: expert-parallel MoE forward + backward; saves outputs, gradients, routing and the
  all-to-all traffic matrices (bytes per label) for the comparison with the single-process layer
  and with :func:`refimpl.moe.traffic.all_to_all_stats`.
* ``train``: data-parallel training of the tiny V3 for a few steps; saves the final parameters.
* ``bad``: deliberately bad input (``--kind divisibility|config|shape|batch``); every rank prints
  ``ERROR <rank> <message>`` (also written to ``<out>.<rank>``) and exits with status 3.
* ``bench``: times ``--repeats`` forward+backward calls, with the all-to-all time apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..fileio import atomic_write

ROUTINGS = ("v2", "v3", "v3-unlimited")


def make_layer_case(routing="v3", *, tokens=(4, 4), seed=0, experts=8, k=3, n_group=4, topk_group=2, hidden=16,
                    inter=8, idle=False, dtype=np.float64):
    """``(config, params, x, dy)`` for an MoE layer; ``x``/``dy`` (sum(tokens), D) are all ranks' tokens
    concatenated in rank order (rank ``r`` holds ``tokens[r]`` of them).

    ``routing``: ``"v2"`` softmax, device-limited (group max, top ``topk_group`` groups), no
    renormalisation; ``"v3"`` sigmoid + bias, node-limited (top-2 sum per group), renormalised;
    ``"v3-unlimited"`` the same with ``topk_group = n_group``. ``idle``: the last quarter of the
    experts gets strongly negative affinities, so they (and with 4 ranks the last rank) get no tokens.
    """
    from ..config import ModelConfig
    from ..moe import init_moe_params
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    common = dict(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts, num_experts_per_tok=k,
                  n_group=n_group, topk_group=n_group if routing == "v3-unlimited" else topk_group, n_shared_experts=1)
    if routing == "v2":
        cfg = ModelConfig.preset("tiny").replace(topk_method="group_limited_greedy", scoring_func="softmax",
                                                 norm_topk_prob=False, routed_scaling_factor=16.0, **common)
    else:
        cfg = ModelConfig.preset("tiny").replace(topk_method="noaux_tc", scoring_func="sigmoid",
                                                 norm_topk_prob=True, routed_scaling_factor=2.5, **common)
    rng = np.random.default_rng(seed)
    params = init_moe_params(cfg, rng, std=0.3, dtype=dtype)
    params["gate"]["weight"] = (1.5 / np.sqrt(hidden) * rng.standard_normal((experts, hidden))).astype(dtype)
    if cfg.topk_method == "noaux_tc":
        params["gate"]["e_score_correction_bias"] = (0.1 * rng.standard_normal(experts)).astype(dtype)
    n = int(sum(tokens))
    x = rng.standard_normal((n, hidden)).astype(dtype)
    dy = rng.standard_normal((n, hidden)).astype(dtype)
    if idle:
        x[:, 0] = 3.0 + 0.1 * x[:, 0]                                     # a shared direction ...
        params["gate"]["weight"][-max(experts // 4, 1):, 0] = -4.0        # ... the last experts avoid
    return cfg, params, x, dy


def layer_dscores(seed, n, n_experts):
    """A gradient (N, E) arriving at the router scores (as from a balance loss), for ``--dscores``."""
    return np.random.default_rng(seed + 1).standard_normal((n, n_experts))


def _comm(args):
    from .comm import Comm
    return Comm(devices_per_node=args.devices_per_node)


def _save(comm, path, arrays):
    if comm.rank == 0 and path:
        with atomic_write(path) as f:
            np.savez(f, **arrays)


def _gather_rows(comm, a):
    parts = comm.comm.gather(a, root=0)
    return np.concatenate(parts) if comm.rank == 0 else None


def task_layer(args):
    from .data_parallel import allreduce_tree
    from .mpi_moe import ep_moe_backward, ep_moe_forward, shard_params
    comm = _comm(args)
    tokens = [int(t) for t in args.tokens.split(",")]
    if len(tokens) == 1:
        tokens = tokens * comm.size
    if len(tokens) != comm.size:
        raise SystemExit(f"--tokens: expected 1 or {comm.size} comma-separated counts, got {args.tokens!r}")
    cfg, params, x, dy = make_layer_case(args.routing, tokens=tokens, seed=args.seed, experts=args.experts, k=args.k,
                                         n_group=args.n_group, topk_group=args.topk_group, hidden=args.hidden,
                                         inter=args.inter, idle=args.idle)
    start = int(np.sum(tokens[:comm.rank]))
    rows = slice(start, start + tokens[comm.rank])
    local = shard_params(params, comm.rank, comm.size)
    y, cache, info = ep_moe_forward(x[rows], local, cfg, comm, two_hop=args.two_hop)
    dscores = layer_dscores(args.seed, x.shape[0], cfg.n_routed_experts)[rows] if args.dscores else None
    dx, grads = ep_moe_backward(dy[rows], cache, dscores)
    out = {"y": _gather_rows(comm, y), "dx": _gather_rows(comm, dx), "idx": _gather_rows(comm, info["idx"]),
           "tokens": np.array(tokens)}
    reduced = allreduce_tree(comm, {"gate": grads["gate"], "shared_experts": grads["shared_experts"]})
    for part, tree in reduced.items():
        for name, g in tree.items():
            out[f"d.{part}.{name}"] = g
    for name, g in grads["experts"].items():
        out[f"d.experts.{name}"] = _gather_rows(comm, g)
    for label in comm.labels():
        out[f"traffic.{label}"] = comm.traffic(label)
    _save(comm, args.out, out)


def task_train(args):
    from .data_parallel import dp_train
    comm = _comm(args)
    state, config, batch_fn, tc = train_start(args.steps, args.batch, args.length, seed=args.seed)
    state = dp_train(state, config, batch_fn, tc, comm)
    from ..tree import tree_flatten, tree_paths
    leaves = tree_flatten(state.params)[0]
    flat = np.concatenate([a.reshape(-1) for a in leaves])
    spread = comm.allreduce_sum(np.abs(flat - comm.comm.bcast(flat, root=0)))  # bitwise replica check
    out = {f"p.{p}": a for p, a in zip(tree_paths(state.params), leaves, strict=True)}
    out["history"] = np.frombuffer(json.dumps(state.history.columns()).encode(), dtype=np.uint8)
    out["replica_spread"] = np.array(float(spread.max()))
    _save(comm, args.out, out)


def train_case(batch, length):
    """The tiny V3 (MLA + MoE with bias + MTP, float64) and a batch function for addition prompts."""
    from ..recipes.tiny_v3 import addition_batches, tiny_v3_config
    from ..tasks import AdditionTask
    config = tiny_v3_config(max_position_embeddings=max(length, 8))
    return config, addition_batches(AdditionTask(min_digits=1, max_digits=2), batch, n_train=64, length=length)


def train_start(steps, batch, length, *, seed=0):
    """Everything the ``train`` task starts from: ``(state, config, batch_fn, tc)``.

    The initial float64 state of :func:`train_case`'s model and the :class:`~refimpl.model.train.TrainConfig`
    of ``steps`` steps, so that a single process (tests, the expert-parallelism chapter) reruns exactly
    what the ranks ran with :func:`refimpl.model.train.train`.
    """
    from ..model.train import TrainConfig, init_state
    from ..model.transformer import init_params
    config, batch_fn = train_case(batch, length)
    tc = TrainConfig(steps=steps, lr=3e-3, warmup_steps=1, bias_update_speed=1e-2)
    state = init_state(init_params(config, np.random.default_rng(seed), np.float64), seed=seed)
    return state, config, batch_fn, tc


def task_bad(args):
    from .mpi_moe import ep_moe_forward, shard_params
    comm = _comm(args)
    cfg, params, x, _ = make_layer_case("v3", tokens=(2,) * comm.size, experts=8, n_group=2, topk_group=1)
    try:
        if args.kind == "divisibility":   # 2R+1 experts cannot be split over R >= 2 ranks
            odd = 2 * comm.size + 1
            cfg, params, x, _ = make_layer_case("v3", tokens=(2,) * comm.size, experts=odd, n_group=1, topk_group=1)
            ep_moe_forward(x[:2], params, cfg, comm)
        elif args.kind == "config":       # the last rank uses a different top-k
            bad = cfg.replace(num_experts_per_tok=2 if comm.rank == comm.size - 1 else 3)
            ep_moe_forward(x[:2], shard_params(params, comm.rank, comm.size), bad, comm)
        elif args.kind == "shape":        # rank 1 passes tokens of the wrong width
            xr = x[:2, :-1] if comm.rank == min(1, comm.size - 1) else x[:2]
            ep_moe_forward(xr, shard_params(params, comm.rank, comm.size), cfg, comm)
        elif args.kind == "batch":        # data parallel: the last rank's token ids exceed the vocabulary
            from ..model.train import TrainConfig, init_state
            from ..model.transformer import init_params
            from .data_parallel import dp_train_step
            config, batch_fn = train_case(2, 32)
            state = init_state(init_params(config, np.random.default_rng(0), np.float64))
            ids, labels = batch_fn(np.random.default_rng(0), 0)
            if comm.rank == comm.size - 1:
                ids = ids + config.vocab_size
            dp_train_step(state, config, (ids, labels), TrainConfig(steps=1, warmup_steps=1), comm)
        else:
            raise SystemExit(f"--kind: unknown {args.kind!r}")
    except (ValueError, TypeError) as e:
        _report(args, comm.rank, f"ERROR {comm.rank} {type(e).__name__}: {e}")
        comm.comm.Barrier()          # every rank has reported before any exits non-zero (mpiexec then kills)
        sys.exit(3)
    _report(args, comm.rank, f"OK {comm.rank}")


def _report(args, rank, line):
    """Print ``line``, and write it to ``<out>.<rank>`` (ranks' stdout lines can interleave)."""
    print(line, flush=True)
    if args.out:
        with atomic_write(f"{args.out}.{rank}", "w") as f:
            f.write(line + "\n")


def task_bench(args):
    """Forward+backward of the expert-parallel layer, ``--repeats`` times; rank 0 prints JSON with the
    best total time, the time inside the all-to-alls and the time waiting for other ranks before
    them (each the max over ranks)."""
    from mpi4py import MPI

    from .comm import Comm
    from .data_parallel import local_rows
    from .mpi_moe import ep_moe_backward, ep_moe_forward, shard_params

    class TimedComm(Comm):
        """Times each all-to-all in two parts: a barrier first (waiting for slower ranks: load
        imbalance and contention), then the exchange itself."""
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.wait, self.a2a = 0.0, 0.0

        def _timed(self, fn, *a, **kw):
            t0 = time.perf_counter()
            self.comm.Barrier()
            t1 = time.perf_counter()
            out = fn(*a, **kw)
            self.wait += t1 - t0
            self.a2a += time.perf_counter() - t1
            return out

        def exchange_counts(self, *a, **kw):
            return self._timed(super().exchange_counts, *a, **kw)

        def alltoallv(self, *a, **kw):
            return self._timed(super().alltoallv, *a, **kw)

    comm = TimedComm(devices_per_node=args.devices_per_node)
    n = args.tokens_total
    tokens = [local_rows(n, r, comm.size).stop - local_rows(n, r, comm.size).start for r in range(comm.size)]
    cfg, params, x, dy = make_layer_case(args.routing, tokens=tokens, seed=args.seed, experts=args.experts, k=args.k,
                                         n_group=args.n_group, topk_group=args.topk_group, hidden=args.hidden,
                                         inter=args.inter, dtype=np.float32)
    rows = local_rows(n, comm.rank, comm.size)
    local = shard_params(params, comm.rank, comm.size)
    xs, dys = x[rows], dy[rows]
    best = {"best_s": np.inf}
    for rep in range(args.repeats + 1):         # the first call warms up
        comm.comm.Barrier()
        comm.wait, comm.a2a = 0.0, 0.0
        t = time.perf_counter()
        y, cache, _ = ep_moe_forward(xs, local, cfg, comm, two_hop=args.two_hop)
        ep_moe_backward(dys, cache)
        comm.comm.Barrier()
        dt = comm.comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
        wait = comm.comm.allreduce(comm.wait, op=MPI.MAX)
        a2a = comm.comm.allreduce(comm.a2a, op=MPI.MAX)
        if rep > 0 and dt < best["best_s"]:
            best = {"best_s": dt, "a2a_s": a2a, "wait_s": wait}
        comm.log.clear()
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "tokens": n, **best}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m refimpl.parallel.worker", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["layer", "train", "bad", "bench"])
    p.add_argument("--routing", default="v3", choices=ROUTINGS)
    p.add_argument("--tokens", default="4", help="layer: tokens of each rank, comma-separated, or one count for all")
    p.add_argument("--tokens-total", type=int, default=4096, help="bench: global tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--n-group", type=int, default=4)
    p.add_argument("--topk-group", type=int, default=2)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--inter", type=int, default=8)
    p.add_argument("--idle", action="store_true")
    p.add_argument("--devices-per-node", type=int, default=1)
    p.add_argument("--two-hop", action="store_true", help="dispatch once per node, then within the node")
    p.add_argument("--dscores", action="store_true", help="layer: also a gradient at the router scores")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kind", default="divisibility")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    {"layer": task_layer, "train": task_train, "bad": task_bad, "bench": task_bench}[args.task](args)


if __name__ == "__main__":
    main()
