r"""A miniature of DeepSeek-V3.2's continued pre-training: dense warm-up of the indexer, then sparse training.

DeepSeek-V3.2 (arXiv 2512.02556 §2.1.1; V3.2-Exp report §2.1) starts from a dense model
(V3.1-Terminus), adds a lightning indexer to every layer and trains in two stages:

1. **dense warm-up**: attention stays dense and everything but the indexer is frozen; the indexer
   learns to imitate the main attention, :math:`\sum_t\mathrm{KL}(p_{t,:}\,\|\,\mathrm{Softmax}(I_{t,:}))`
   with :math:`p` the head-summed, normalised attention (eq. 3), 1000 steps at lr 1e-3;
2. **sparse training**: top-k selection is on (k = 2048), the main model learns from the LM loss
   and the indexer from the same KL over the selected keys (eq. 4), its inputs detached.

Here, in miniature: a tiny V3 (:func:`~refimpl.recipes.tiny_v3.tiny_v3_config`, no MTP) is first
trained densely on a long-context retrieval task (stage 0, standing in for V3.1-Terminus), then
the two stages run with ``index_topk`` = ``topk`` keys out of ``seq_len``. The task
(:func:`retrieval_batch`): a sequence of random "filler" tokens holds exactly one *marked* token
(its own id range); the last ``n_query`` positions must output the marked token's plain id. The
answer sits anywhere in the context, so a query needs one specific far-away key: dense attention
learns to find it, and sparse attention keeps the accuracy only if the indexer selects it.

Warm-up with dense attention is sparse training with ``index_topk >= T`` (the selection is then
every causal key, and the KL support is the causal set), so the stages differ only in the config.
Measured along the way: answer accuracy (dense, sparse with the untrained indexer, sparse after
warm-up, sparse after sparse training), the indexer's **recall** of the dense attention's top-k
keys (fraction of the k keys with the largest head-mean attention probability that the indexer
also selects, over the query rows), and the fraction of causal keys a query row attends to.
Indexer init, loss reduction, optimiser and all sizes are choices of this miniature (unpublished).
"""

from __future__ import annotations

import numpy as np

from ..attention import select_topk
from ..attention.dsa import attention_target, dsa_indexer_loss
from ..core import IGNORE_INDEX
from ..model.transformer import init_params, loss_backward, loss_forward, model_forward
from ..optim import adamw_init, adamw_update, clip_grad_norm
from . import _cache
from .tiny_v3 import tiny_v3_config

#: refimpl sources the run executes (hashed into the cache key, see :mod:`refimpl.recipes._cache`)
DSA_SOURCES = ("core", "attention", "moe", "model", "kernels", "optim.py", "tree.py", "config.py", "backend.py",
               "_validate.py", "recipes/tiny_v3.py", "recipes/dsa_pretrain.py")

N_PLAIN = 16                  # plain token ids 0..15; marked copies 16..31


def dsa_config(seq_len=64, topk=8, index_n_heads=4, index_head_dim=16):
    """The tiny V3 of :mod:`.tiny_v3` (no MTP) with a DeepSeek-V3.2 lightning indexer in both layers."""
    cfg = tiny_v3_config(vocab_size=2 * N_PLAIN, num_nextn_predict_layers=0, max_position_embeddings=seq_len,
                         aux_loss_alpha=0.0)
    cfg.extra.update(model_type="deepseek_v32", index_topk=topk, index_n_heads=index_n_heads,
                     index_head_dim=index_head_dim)
    return cfg


def with_topk(config, topk):
    """The same config with another ``index_topk`` (``>= seq_len``: dense attention)."""
    cfg = config.replace()
    cfg.extra["index_topk"] = int(topk)
    return cfg


def retrieval_batch(rng, batch_size, seq_len, n_query=8):
    """``(ids, labels)``: filler ids in [0, 16), one marked id 16 + v before the query zone, labels v
    on the last ``n_query`` positions (-100 elsewhere; position t is trained to predict label t + 1)."""
    ids = rng.integers(0, N_PLAIN, (batch_size, seq_len))                # (B, T)
    pos = rng.integers(0, seq_len - n_query - 1, batch_size)             # (B,)
    val = rng.integers(0, N_PLAIN, batch_size)                           # (B,)
    ids[np.arange(batch_size), pos] = N_PLAIN + val
    labels = np.full((batch_size, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, seq_len - n_query:] = val[:, None]                         # (B, n_query)
    return ids, labels


def answer_accuracy(params, config, ids, labels):
    """Fraction of labelled positions whose argmax next-token prediction is the answer."""
    logits = model_forward(ids, params, config)[0]                       # (B, T, V)
    tgt = np.concatenate([labels[:, 1:], np.full((len(ids), 1), IGNORE_INDEX)], axis=1)  # (B, T)
    keep = tgt != IGNORE_INDEX
    return float((logits.argmax(-1)[keep] == tgt[keep]).mean())


def indexer_recall(params, config, ids, topk, n_query=8):
    """Mean over layers and query rows of (keys in both the indexer's and the dense attention's top-k) / k."""
    t = ids.shape[1]
    cache = model_forward(ids, params, with_topk(config, t))[1]
    rec = []
    for bc in cache.blocks:
        sel = select_topk(bc.attn.scores, topk)[:, t - n_query - 1:]    # (B, n_query, T)
        top = select_topk(attention_target(bc.attn), topk)[:, t - n_query - 1:]  # (B, n_query, T)
        rec.append((sel & top).sum(-1) / topk)
    return float(np.mean(rec))


def attended_fraction(seq_len, topk, n_query=8):
    """Mean fraction of causal keys a query row reads: min(k, t+1) / (t+1) over the query rows."""
    t = np.arange(seq_len - n_query - 1, seq_len - 1)
    return float(np.mean(np.minimum(topk, t + 1) / (t + 1)))


def _indexers(params):
    return [lp["self_attn"]["indexer"] for lp in params["model"]["layers"]]


def _main(params):
    """The parameter tree without the indexers (shallow copies; arrays shared)."""
    layers = [{**lp, "self_attn": {k: v for k, v in lp["self_attn"].items() if k != "indexer"}}
              for lp in params["model"]["layers"]]
    return {**params, "model": {**params["model"], "layers": layers}}


def _merge(main, indexers):
    """The full tree from the main weights and the indexers (new dicts; ``main`` is not modified)."""
    layers = [{**lp, "self_attn": {**lp["self_attn"], "indexer": ix}}
              for lp, ix in zip(main["model"]["layers"], indexers, strict=True)]
    return {**main, "model": {**main["model"], "layers": layers}}


def indexer_step(params, config, ids, opt, lr):
    """Indexer KL loss summed over layers (its inputs and target detached) and one AdamW step on the indexers."""
    _, cache, _ = loss_forward(ids, params, config, balance="none", mtp_lambda=0.0)
    losses, grads = zip(*(dsa_indexer_loss(bc.attn) for bc in cache.model.blocks), strict=True)
    new, opt = adamw_update(_indexers(params), list(grads), opt, lr=lr, weight_decay=0.0)
    return _merge(_main(params), new), opt, float(sum(losses)), cache


def dsa_pretrain_run(seq_len=64, topk=8, batch_size=16, pretrain_steps=200, warmup_steps=60, sparse_steps=60,
                     lr=1e-2, index_lr=1e-2, n_query=8, eval_every=10, seed=0, dtype=np.float32, progress=True,
                     cache_dir=None):
    """Stage 0 (dense LM), 1 (indexer warm-up), 2 (sparse LM + indexer KL); returns a dict of the measurements.

    ``accuracy``: answer accuracy on a held-out batch for ``dense`` (after stage 0),
    ``sparse_untrained`` (top-k with the random indexer), ``sparse_after_warmup`` and
    ``sparse_final`` (dense attention re-measured at the end too, ``dense_final``). ``recall``:
    ``[step, indexer recall]`` pairs over stages 1-2; ``index_loss`` and ``lm_loss`` per step;
    ``attended_fraction``; ``stages`` (steps per stage); ``config``; ``params`` (the final weights);
    ``cached``.

    ``progress``: a progress bar over the steps of the three stages. ``cache_dir``: load the result
    of an earlier call with the same arguments and the same refimpl sources from there, or compute
    and store it.
    """
    cfg = dsa_config(seq_len, topk)
    args = dict(seq_len=seq_len, topk=topk, batch_size=batch_size, pretrain_steps=pretrain_steps,
                warmup_steps=warmup_steps, sparse_steps=sparse_steps, lr=lr, index_lr=index_lr, n_query=n_query,
                eval_every=eval_every, seed=seed, dtype=np.dtype(dtype).name)
    key = _cache.cache_key("dsa_pretrain", args, DSA_SOURCES)
    hit = None if cache_dir is None else _cache.load(cache_dir, key, cfg, ["params"])
    if hit is not None:
        params, meta = hit[0]["params"], hit[1]
    else:
        result = _dsa_pretrain(cfg, **{**args, "dtype": dtype}, progress=progress)
        params = result.pop("params")
        meta = _cache.plain(result)
        if cache_dir is not None:
            _cache.save(cache_dir, key, {"params": params}, meta)
    return {**meta, "config": cfg, "params": params, "cached": hit is not None}


def _dsa_pretrain(cfg, *, seq_len, topk, batch_size, pretrain_steps, warmup_steps, sparse_steps, lr, index_lr,
                  n_query, eval_every, seed, dtype, progress):
    """The three stages of :func:`dsa_pretrain_run`; returns its result without ``config`` and ``cached``."""
    bar = None
    if progress:
        from tqdm import tqdm  # plain text: tqdm.auto warns in a kernel without ipywidgets
        bar = tqdm(total=pretrain_steps + warmup_steps + sparse_steps, desc="dense, warm-up, sparse", leave=False)
    tick = bar.update if bar is not None else (lambda n=1: None)
    rng = np.random.default_rng(seed)
    dense = with_topk(cfg, seq_len)
    params = init_params(cfg, np.random.default_rng(seed), dtype)
    ev_ids, ev_lab = retrieval_batch(np.random.default_rng(10_000 + seed), 128, seq_len, n_query)
    rec_ids = ev_ids[:32]
    # stage 0: a dense model (V3.1-Terminus stands here): LM loss on every non-indexer weight
    main, mopt = _main(params), adamw_init(_main(params))
    lm = []
    for _ in range(pretrain_steps):
        ids, labels = retrieval_batch(rng, batch_size, seq_len, n_query)
        loss, cache, _ = loss_forward(ids, params, dense, labels, balance="none", mtp_lambda=0.0)
        g, _ = clip_grad_norm(_main(loss_backward(1.0, cache, params)), 1.0)
        main, mopt = adamw_update(main, g, mopt, lr=lr, weight_decay=0.0)
        params = _merge(main, _indexers(params))
        lm.append(float(loss))
        tick()
    acc = {"dense": answer_accuracy(params, dense, ev_ids, ev_lab),
           "sparse_untrained": answer_accuracy(params, cfg, ev_ids, ev_lab)}
    recall, index_loss = [(0, indexer_recall(params, cfg, rec_ids, topk, n_query))], []
    # stage 1: dense warm-up, indexer only (KL to the dense attention over all causal keys)
    iopt = adamw_init(_indexers(params))
    for s in range(1, warmup_steps + 1):
        ids, _ = retrieval_batch(rng, batch_size, seq_len, n_query)
        params, iopt, li, _ = indexer_step(params, dense, ids, iopt, index_lr)
        index_loss.append(li)
        tick()
        if s % eval_every == 0:
            recall.append((s, indexer_recall(params, cfg, rec_ids, topk, n_query)))
    acc["sparse_after_warmup"] = answer_accuracy(params, cfg, ev_ids, ev_lab)
    # stage 2: sparse training; LM loss -> main weights, KL over the selected keys -> indexer
    main = _main(params)
    for s in range(warmup_steps + 1, warmup_steps + sparse_steps + 1):
        ids, labels = retrieval_batch(rng, batch_size, seq_len, n_query)
        loss, cache, _ = loss_forward(ids, params, cfg, labels, balance="none", mtp_lambda=0.0)
        g, _ = clip_grad_norm(_main(loss_backward(1.0, cache, params)), 1.0)
        losses, ig = zip(*(dsa_indexer_loss(bc.attn) for bc in cache.model.blocks), strict=True)
        new_ix, iopt = adamw_update(_indexers(params), list(ig), iopt, lr=index_lr, weight_decay=0.0)
        main, mopt = adamw_update(main, g, mopt, lr=lr / 3, weight_decay=0.0)
        params = _merge(main, new_ix)
        lm.append(float(loss))
        index_loss.append(float(sum(losses)))
        tick()
        if s % eval_every == 0:
            recall.append((s, indexer_recall(params, cfg, rec_ids, topk, n_query)))
    acc["sparse_final"] = answer_accuracy(params, cfg, ev_ids, ev_lab)
    acc["dense_final"] = answer_accuracy(params, dense, ev_ids, ev_lab)
    if bar is not None:
        bar.close()
    return {"params": params, "accuracy": acc, "recall": recall, "index_loss": index_loss,
            "lm_loss": lm, "attended_fraction": attended_fraction(seq_len, topk, n_query),
            "stages": {"pretrain": pretrain_steps, "warmup": warmup_steps, "sparse": sparse_steps}}
