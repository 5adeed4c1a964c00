"""Expert- and data-parallel code under a real MPI launch (``mpiexec -n k``), against one process.

Each test launches ``python -m refimpl.parallel.worker`` on 1, 2 or 4 ranks with a timeout, lets rank
0 write the gathered results to an .npz, and compares them here with the single-process layer /
training loop on the concatenated inputs. Skipped cleanly when mpi4py or mpiexec is missing
(``pip install -e '.[mpi]'`` or ``make test MPI=1``).
"""

import json
import subprocess

import numpy as np
import pytest

from refimpl.moe import all_to_all_stats, moe_backward, moe_forward, node_limited_comparison
from refimpl.parallel import cross_node_bytes, intra_node_bytes, local_rows, mpi_available, run_mpi
from refimpl.parallel.worker import layer_dscores, make_layer_case, train_start
from refimpl.testing.tolerances import tol

pytestmark = pytest.mark.skipif(not mpi_available(), reason="mpi4py/mpiexec not installed (the 'mpi' extra)")

TIMEOUT = 90
WORKER = ["-m", "refimpl.parallel.worker"]


def launch(n, *args, out=None):
    res = run_mpi(n, [*WORKER, *map(str, args)] + (["--out", out] if out else []), timeout=TIMEOUT)
    if res.returncode != 0:
        raise AssertionError(f"mpiexec -n {n} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


CASES = [  # (ranks, routing, tokens per rank, idle experts, devices per node, two-hop dispatch)
    (1, "v2", "6", False, 1, False),
    (1, "v3", "5", True, 1, True),
    (2, "v2", "3,5", False, 1, False),
    (2, "v3", "0,6", True, 2, False),           # rank 0 holds no tokens
    (2, "v3", "5,3", False, 1, True),
    (4, "v2", "3,0,5,2", True, 2, False),       # rank 1 holds no tokens; rank 3's experts get none
    (4, "v3", "2,3,1,4", True, 2, False),
    (4, "v3-unlimited", "4,4,4,4", False, 2, False),
    (4, "v3", "3,0,5,2", True, 2, True),
    (4, "v2", "4,2,3,3", False, 2, True),
]


def two_hop_matrices(idx, home, n_experts, ranks, per_node):
    """Expected copies of the two-hop dispatch: (source, node-hop target) once per target node, then
    (forwarding rank, expert rank) once per target rank; the forwarder has the source's in-node index."""
    dev = idx // (n_experts // ranks)                                      # (N, K)
    inter, intra = np.zeros((ranks, ranks), np.int64), np.zeros((ranks, ranks), np.int64)
    for t in range(idx.shape[0]):
        h = home[t]
        for node in set((dev[t] // per_node).tolist()):
            inter[h, node * per_node + h % per_node] += 1
        for d in set(dev[t].tolist()):
            intra[(d // per_node) * per_node + h % per_node, d] += 1
    return inter, intra


@pytest.mark.parametrize("ranks,routing,tokens,idle,per_node,two_hop", CASES)
def test_expert_parallel_layer_equals_single_process(tmp_path, ranks, routing, tokens, idle, per_node, two_hop):
    counts = [int(t) for t in tokens.split(",")]
    out = tmp_path / "ep.npz"
    launch(ranks, "layer", "--routing", routing, "--tokens", tokens, "--devices-per-node", per_node,
           *(["--idle"] if idle else []), *(["--two-hop"] if two_hop else []), "--dscores", out=str(out))
    r = load(out)
    cfg, params, x, dy = make_layer_case(routing, tokens=counts, idle=idle)
    y, cache, info = moe_forward(x, params, cfg)
    # with a gradient at the router scores too (balance losses reach the gate through it)
    dx, grads = moe_backward(dy, cache, layer_dscores(0, x.shape[0], cfg.n_routed_experts))
    np.testing.assert_array_equal(r["idx"], info["idx"])                 # routing identical
    np.testing.assert_allclose(r["y"], y, **tol("equiv64"))
    np.testing.assert_allclose(r["dx"], dx, **tol("equiv64"))
    for part, tree in grads.items():
        for name, g in tree.items():
            np.testing.assert_allclose(r[f"d.{part}.{name}"], g, **tol("equiv64"), err_msg=f"{part}.{name}")
    load_e = np.bincount(info["idx"].reshape(-1), minlength=cfg.n_routed_experts)
    if idle:                                                               # the case exercises idle experts
        assert load_e[-2:].sum() == 0
        np.testing.assert_array_equal(r["d.experts.down_proj"][-2:], 0.0)
    # measured bytes = the simulation's prediction, exactly
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    home = np.repeat(np.arange(ranks), counts)
    sim = all_to_all_stats(info["idx"], cfg.n_routed_experts, ranks, per_node, token_device=home, hidden_size=d,
                           bytes_per_value=8)
    rows = sim["a2a_tokens"]
    if two_hop:
        inter, intra = two_hop_matrices(info["idx"], home, cfg.n_routed_experts, ranks, per_node)
        np.testing.assert_array_equal(r["traffic.inter/dispatch/x"], inter * d * 8)
        np.testing.assert_array_equal(r["traffic.intra/dispatch/x"], intra * d * 8)
        assert cross_node_bytes(r["traffic.inter/dispatch/x"], per_node) == sim["cross_node_bytes"]  # tokens x D x 8
        assert cross_node_bytes(r["traffic.intra/dispatch/x"], per_node) == 0
        assert intra.sum() == rows.sum()                                   # one copy per (token, expert rank)
        for a, b in (("dispatch/x", "combine/y"), ("dispatch/x", "combine_bwd/dy"), ("dispatch/x", "dispatch_bwd/dx")):
            for hop in ("inter", "intra"):
                m_a, m_b = r[f"traffic.{hop}/{a}"], r[f"traffic.{hop}/{b}"]
                np.testing.assert_array_equal(m_b, m_a.T if b in ("combine/y", "dispatch_bwd/dx") else m_a)
        return
    np.testing.assert_array_equal(r["traffic.dispatch/x"], rows * d * 8)
    np.testing.assert_array_equal(r["traffic.dispatch/slots"], rows * k * 8)
    np.testing.assert_array_equal(r["traffic.dispatch/weights"], rows * k * 8)
    np.testing.assert_array_equal(r["traffic.combine/y"], rows.T * d * 8)   # the reverse all-to-all
    np.testing.assert_array_equal(r["traffic.combine_bwd/dy"], r["traffic.dispatch/x"])  # mirrors
    np.testing.assert_array_equal(r["traffic.dispatch_bwd/dx"], r["traffic.combine/y"])
    np.testing.assert_array_equal(r["traffic.dispatch/counts"], np.full((ranks, ranks), 8))
    assert cross_node_bytes(r["traffic.dispatch/x"], per_node) == sim["cross_node_tokens_per_device"] * d * 8
    assert intra_node_bytes(r["traffic.dispatch/x"], per_node) == sim["intra_node_tokens"] * d * 8
    if ranks == 4 and idle:                                                # rank 3 received nothing
        assert r["traffic.dispatch/x"][:, 3].sum() == 0


def test_node_limited_routing_caps_measured_cross_node_bytes(tmp_path):
    """4 ranks on 2 nodes, 16 experts, top-4; V3 routing limited to 1 node vs unlimited, one-hop
    (once per rank) and two-hop (once per node) dispatch."""
    args = ["--experts", 16, "--k", 4, "--n-group", 2, "--topk-group", 1, "--devices-per-node", 2,
            "--tokens", "12,12,12,12", "--hidden", 8]
    measured = {}
    for routing in ("v3", "v3-unlimited"):
        for hops in ((), ("--two-hop",)):
            path = tmp_path / f"{routing}{len(hops)}.npz"
            launch(4, "layer", "--routing", routing, *args, *hops, out=str(path))
            r = load(path)
            measured[routing, bool(hops)] = r["traffic.inter/dispatch/x" if hops else "traffic.dispatch/x"]
    cfg, params, x, _ = make_layer_case("v3", tokens=[12] * 4, experts=16, k=4, n_group=2, topk_group=1, hidden=8)
    sim = node_limited_comparison(x, params["gate"], cfg, n_devices=4, devices_per_node=2, bytes_per_value=8)
    for routing, name in (("v3", "limited"), ("v3-unlimited", "unlimited")):
        one, two = measured[routing, False], measured[routing, True]
        np.testing.assert_array_equal(one, sim[name]["a2a_tokens"] * 8 * 8)
        assert cross_node_bytes(one, 2) == sim[name]["cross_node_tokens_per_device"] * 8 * 8
        assert cross_node_bytes(two, 2) == sim[name]["cross_node_bytes"] == sim[name]["cross_node_tokens"] * 8 * 8
        assert cross_node_bytes(two, 2) <= cross_node_bytes(one, 2)
    assert sim["limited"]["max_nodes_per_token"] == 1 < sim["unlimited"]["max_nodes_per_token"]
    assert cross_node_bytes(measured["v3", False], 2) < cross_node_bytes(measured["v3-unlimited", False], 2)
    # two-hop: a token crosses at most once per remote node (here 1 of 2): <= 48 tokens x 8 values x 8 bytes;
    # the limit keeps more tokens on their home node
    assert cross_node_bytes(measured["v3", True], 2) < cross_node_bytes(measured["v3-unlimited", True], 2) <= 48 * 64


@pytest.mark.parametrize("ranks", [2, 4])
def test_data_parallel_training_equals_one_process(tmp_path, ranks):
    from refimpl.model.train import train
    from refimpl.tree import tree_flatten, tree_paths
    steps, batch, length = 3, 4, 32
    out = tmp_path / "dp.npz"
    launch(ranks, "train", "--steps", steps, "--batch", batch, "--length", length, out=str(out))
    r = load(out)
    assert float(r["replica_spread"]) == 0.0                               # replicas bitwise identical
    state, config, batch_fn, tc = train_start(steps, batch, length)
    state = train(state, config, batch_fn, tc, progress=False)
    # the batches mask prompts and padding, so ranks hold different numbers of targets: a mean of
    # per-rank means would differ from the global mean; the bias moved, so the global load was used
    _, labels = batch_fn(np.random.default_rng(0), 0)
    per_rank = [int(np.sum(labels[local_rows(batch, q, ranks), 1:] != -100)) for q in range(ranks)]
    assert len(set(per_rank)) > 1, per_rank
    hist = json.loads(bytes(r["history"]).decode())
    np.testing.assert_allclose(hist["loss"], state.history["loss"], **tol("equiv64"))
    np.testing.assert_allclose(hist["grad_norm"], state.history["grad_norm"], **tol("equiv64"))
    moved = 0
    for p, a in zip(tree_paths(state.params), tree_flatten(state.params)[0], strict=True):
        np.testing.assert_allclose(r[f"p.{p}"], a, **tol("equiv64"), err_msg=p)
        moved += p.endswith("e_score_correction_bias") and bool(np.any(a != 0))
    assert moved >= 1


BAD = [  # (kind, ranks, argument named first in the message)
    ("divisibility", 2, "config.n_routed_experts"),
    ("divisibility", 4, "config.n_routed_experts"),
    ("config", 2, "config: differs across ranks"),
    ("config", 4, "config: differs across ranks"),
    ("shape", 2, "x: expected last axis"),
    ("batch", 2, "input_ids: expected values <"),    # data parallel: one rank's batch is bad
]


@pytest.mark.parametrize("kind,ranks,start", BAD)
def test_bad_input_raises_the_same_error_on_every_rank(tmp_path, kind, ranks, start):
    out = tmp_path / "bad"
    try:
        res = run_mpi(ranks, [*WORKER, "bad", "--kind", kind, "--out", out], timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:   # a hang is the failure this test exists to catch
        raise AssertionError(f"{kind}: ranks hung instead of raising") from e
    assert res.returncode != 0, res.stdout + res.stderr
    # each rank writes its own line (stdout lines of several ranks can interleave)
    lines = [(tmp_path / f"bad.{q}").read_text().strip() for q in range(ranks)]
    assert all(ln.startswith(f"ERROR {q} ") for q, ln in enumerate(lines)), lines
    messages = {ln.split(" ", 2)[2] for ln in lines}
    assert len(messages) == 1, messages                                    # the same error everywhere
    msg = messages.pop()
    assert msg.split(": ", 1)[1].startswith(start), msg
