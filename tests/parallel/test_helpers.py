"""The parts of refimpl.parallel that need no MPI launch: row splits, fingerprints, byte sums, and the
global normalisation of data-parallel gradients (checked by splitting one batch in-process)."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.model.transformer import loss_backward, loss_forward
from refimpl.parallel import (
    cross_node_bytes,
    fingerprint,
    globalize_loss_cache,
    intra_node_bytes,
    local_rows,
    shard_experts,
    shard_params,
)
from refimpl.parallel.data_parallel import _counts
from refimpl.parallel.worker import make_layer_case
from refimpl.recipes.tiny_v3 import tiny_v3_config
from refimpl.testing import strategies as rst
from refimpl.testing.tolerances import tol
from refimpl.tree import tree_flatten, tree_map


@given(st.integers(0, 60), st.integers(1, 9))
def test_local_rows_partition_the_rows(n, size):
    parts = [local_rows(n, r, size) for r in range(size)]
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
    lengths = [p.stop - p.start for p in parts]
    assert max(lengths) - min(lengths) <= 1


def test_fingerprint_sees_every_difference():
    cfg = ModelConfig.preset("tiny")
    assert fingerprint(cfg) == fingerprint(ModelConfig.preset("tiny"))
    assert fingerprint(cfg) != fingerprint(cfg.replace(num_experts_per_tok=3))
    a = np.zeros(5)
    b = a.copy()
    b[3] = 1e-300
    assert fingerprint({"w": a}) != fingerprint({"w": b})
    assert fingerprint({"w": a}) != fingerprint({"w": a.astype(np.float32)})
    assert fingerprint({"m": float("-inf")}) == fingerprint({"m": -np.inf})


@given(rst.seeds(), st.sampled_from([(4, 1), (4, 2), (6, 3), (8, 4), (8, 8)]))
def test_node_byte_sums_match_their_definition(rng, shape):
    ranks, per_node = shape
    m = rng.integers(0, 100, (ranks, ranks))
    cross = sum(int(m[i, j]) for i in range(ranks) for j in range(ranks) if i // per_node != j // per_node)
    intra = sum(int(m[i, j]) for i in range(ranks) for j in range(ranks) if i // per_node == j // per_node and i != j)
    assert cross_node_bytes(m, per_node) == cross and intra_node_bytes(m, per_node) == intra
    assert cross + intra + int(np.trace(m)) == int(m.sum())


@settings(max_examples=4)
@given(rst.seeds(), st.integers(2, 3))
def test_globalized_shares_sum_to_the_global_gradient(rng, parts):
    """Split one batch by sequences; each part's backward on its globalized cache, summed, is the
    gradient of the whole batch (LM mean over all targets, balance mean over all sequences, MTP)."""
    from refimpl.model.transformer import init_params
    config = tiny_v3_config(vocab_size=24, max_position_embeddings=16, aux_loss_alpha=0.05)
    params = init_params(config, rng, np.float64)
    params["model"]["layers"][1]["mlp"]["gate"]["e_score_correction_bias"] = 0.1 * rng.standard_normal(8)
    b, t = 5, 10
    ids = rng.integers(0, 24, (b, t))
    labels = np.where(rng.random((b, t)) < 0.4, -100, ids)               # ranks hold different target counts
    _, cache, _ = loss_forward(ids, params, config, labels)
    full = loss_backward(1.0, cache, params)
    bounds = np.sort(rng.choice(np.arange(1, b), parts - 1, replace=False))
    rows = np.split(np.arange(b), bounds)
    caches = [loss_forward(ids[r], params, config, labels[r])[1] for r in rows]
    locals_ = [_counts(c) for c in caches]
    total = np.sum(locals_, axis=0)
    shares = [loss_backward(1.0, globalize_loss_cache(c, lo, total), params)
              for c, lo in zip(caches, locals_, strict=True)]
    summed = tree_map(lambda *g: sum(g), *shares)
    for a, g in zip(tree_flatten(summed)[0], tree_flatten(full)[0], strict=True):
        np.testing.assert_allclose(a, g, **tol("equiv64"))
    # the mean of per-part means is a different (wrong) gradient whenever the parts' counts differ
    if len({int(lo[0]) for lo in locals_}) > 1:
        naive = tree_map(lambda *g: sum(g) / parts, *[loss_backward(1.0, c, params) for c in caches])
        diff = max(float(np.max(np.abs(a - g))) for a, g in zip(tree_flatten(naive)[0], tree_flatten(full)[0],
                                                                  strict=True))
        assert diff > 1e-6


def test_package_imports_and_reports_unavailable_without_mpi4py():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import refimpl.parallel as p\n"
            "assert not p.mpi_available()\n"
            "try:\n    p.Comm()\nexcept ImportError as e:\n    assert 'mpi' in str(e)\n"
            "else:\n    raise SystemExit(1)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@given(st.sampled_from([1, 2, 4, 8]))
def test_shards_are_contiguous_blocks_that_rebuild_the_experts(size):
    cfg, params, _, _ = make_layer_case("v3", tokens=[2], experts=8)
    shards = [shard_params(params, r, size) for r in range(size)]
    for name, w in params["experts"].items():
        parts = [sh["experts"][name] for sh in shards]
        assert all(p.shape == (8 // size,) + w.shape[1:] and p.flags.c_contiguous for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), w)          # rank r holds [r E/R, (r+1) E/R)
    assert all(sh["gate"] is params["gate"] and sh["shared_experts"] is params["shared_experts"] for sh in shards)
    assert params["experts"]["gate_proj"].shape[0] == cfg.n_routed_experts   # the input is left whole


@pytest.mark.parametrize("args,exc,start", [
    ((3, 2), ValueError, "rank: expected 0 <= rank < 2"),
    ((-1, 2), ValueError, "rank: expected 0 <= rank < 2"),
    ((0, 3), ValueError, "size: expected a divisor of the 8 experts"),
    ((0, 0), ValueError, "size: expected a divisor"),
    ((0, 2.0), TypeError, "size: expected an integer"),
    ((True, 2), TypeError, "rank: expected an integer"),
])
def test_shard_experts_rejects_bad_rank_and_size(args, exc, start):
    _, params, _, _ = make_layer_case("v3", tokens=[2], experts=8)
    with pytest.raises(exc, match="^" + start):
        shard_experts(params["experts"], *args)
    with pytest.raises(ValueError, match="^experts: expected the dict"):
        shard_experts([params["experts"]["gate_proj"]], 0, 1)


def test_local_check_reads_this_ranks_experts():
    """mpi_moe's local check is moe.layer.check_moe_params on the E/size experts a rank holds."""
    from refimpl.parallel.mpi_moe import _check_local
    cfg, params, x, _ = make_layer_case("v3", tokens=(2, 2), experts=8, n_group=2, topk_group=1)
    local = shard_params(params, 0, 2)
    _check_local(x[:2], local, cfg, 2)                                   # 4 of 8 experts: fine
    with pytest.raises(ValueError, match=r"^params\['experts'\]\['gate_proj'\]: .*E/ranks = 4 experts"):
        _check_local(x[:2], params, cfg, 2)                              # all 8: not sharded
    bad = {**local, "experts": {k: v for k, v in local["experts"].items() if k != "up_proj"}}
    with pytest.raises(ValueError, match=r"missing 'up_proj'"):
        _check_local(x[:2], bad, cfg, 2)
    with pytest.raises(TypeError, match="^params: expected a dict"):
        _check_local(x[:2], [], cfg, 2)
