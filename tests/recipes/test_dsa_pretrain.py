"""The V3.2 continued-pretraining miniature: task, stage isolation, measurements, determinism."""

import numpy as np

from refimpl.model import init_params
from refimpl.optim import adamw_init
from refimpl.recipes.dsa_pretrain import (
    N_PLAIN,
    attended_fraction,
    dsa_config,
    dsa_pretrain_run,
    indexer_step,
    retrieval_batch,
    with_topk,
)
from refimpl.tree import tree_flatten, tree_paths


def test_retrieval_batch_has_one_marked_answer_before_the_queries():
    ids, labels = retrieval_batch(np.random.default_rng(0), 8, 32, n_query=4)
    marked = ids >= N_PLAIN
    assert np.all(marked.sum(1) == 1)
    pos = marked.argmax(1)
    assert np.all(pos < 32 - 4 - 1)
    np.testing.assert_array_equal(labels[:, -4:], (ids[np.arange(8), pos] - N_PLAIN)[:, None].repeat(4, 1))
    assert np.all(labels[:, :-4] == -100)


def test_warmup_step_changes_only_the_indexers():
    cfg = dsa_config(seq_len=16, topk=4)
    params = init_params(cfg, np.random.default_rng(0))
    ix = [lp["self_attn"]["indexer"] for lp in params["model"]["layers"]]
    ids, _ = retrieval_batch(np.random.default_rng(1), 2, 16, n_query=2)
    new, _, loss, _ = indexer_step(params, with_topk(cfg, 16), ids, adamw_init(ix), 1e-2)
    assert loss > 0
    for path, a, b in zip(tree_paths(params), tree_flatten(params)[0], tree_flatten(new)[0], strict=True):
        if ".indexer." in path:
            assert not np.array_equal(a, b), path
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)


def test_attended_fraction():
    assert attended_fraction(16, 16, n_query=4) == 1.0
    np.testing.assert_allclose(attended_fraction(12, 2, n_query=2), np.mean([2 / 10, 2 / 11]))


def test_small_run_is_deterministic_and_reports_every_stage():
    kw = dict(seq_len=16, topk=4, batch_size=4, pretrain_steps=3, warmup_steps=2, sparse_steps=2, eval_every=1,
              n_query=2)
    a, b = dsa_pretrain_run(**kw), dsa_pretrain_run(**kw)
    assert a["accuracy"] == b["accuracy"] and a["recall"] == b["recall"]
    assert set(a["accuracy"]) == {"dense", "sparse_untrained", "sparse_after_warmup", "sparse_final", "dense_final"}
    assert [s for s, _ in a["recall"]] == [0, 1, 2, 3, 4]
    assert len(a["index_loss"]) == 4 and len(a["lm_loss"]) == 5
    assert all(0 <= r <= 1 for _, r in a["recall"])


def test_cache_returns_the_computed_result(tmp_path):
    """With ``cache_dir`` a second call with the same arguments loads the first one's measurements and
    final weights, equal to the bit; other arguments miss the cache."""
    kw = dict(seq_len=16, topk=4, batch_size=4, pretrain_steps=3, warmup_steps=2, sparse_steps=2, eval_every=1,
              n_query=2, cache_dir=tmp_path)
    a, b = dsa_pretrain_run(**kw), dsa_pretrain_run(**kw)
    assert (a["cached"], b["cached"]) == (False, True)
    for k in a.keys() - {"cached", "params"}:
        assert a[k] == b[k], k
    pa, pb = dict(zip(tree_paths(a["params"]), tree_flatten(a["params"])[0], strict=True)), \
        dict(zip(tree_paths(b["params"]), tree_flatten(b["params"])[0], strict=True))
    assert pa.keys() == pb.keys() and any("indexer" in p for p in pa)
    for p in pa:
        assert pa[p].dtype == pb[p].dtype and pa[p].tobytes() == pb[p].tobytes(), p
    assert not dsa_pretrain_run(**{**kw, "seed": 1})["cached"]
