r"""Data-parallel training of the tiny model over MPI ranks, equal to one process on the whole batch.

Data parallelism (used with expert parallelism by DeepSeek-V3, §3.2: ZeRO-1 data parallelism plus
EP) gives each rank a slice of the global batch, runs forward and backward locally and all-reduces
the gradients. Two details make ``R`` ranks give *the same parameters* as one process on the
concatenated batch, not merely similar ones:

* **Global normalisation.** The next-token loss is a mean over the non-ignored targets of the whole
  batch, so rank ``r``'s gradient must be divided by the *global* count, not its own: the mean of the
  ranks' means is wrong as soon as ranks hold different numbers of targets (padding, prompts masked
  with -100). Likewise the balance loss is a mean over all sequences and each MTP depth a mean over
  its own targets. :func:`globalize_loss_cache` rewrites the local loss cache's normalisers with the
  all-reduced counts, so that :func:`refimpl.model.transformer.loss_backward` returns this rank's
  share of the global gradient, and the all-reduce *sum* of the shares is the global gradient.
* **The V3 bias update** (§2.1.2) uses the expert load over the whole batch: each layer's load is
  all-reduced before :func:`refimpl.moe.balance.bias_update`, so every rank moves its biases alike.

Clipping uses the norm of the all-reduced gradient and AdamW then runs identically on every rank,
so the replicas never drift apart (checked bitwise in the tests).
"""

from __future__ import annotations

import numpy as np

from ..model.train import apply_gradients
from ..model.transformer import loss_backward, loss_forward
from ..train import run_loop
from ..tree import tree_flatten


def local_rows(n, rank, size):
    """Contiguous slice of ``n`` rows for ``rank`` (the first ``n % size`` ranks get one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def allreduce_tree(comm, tree):
    """Sum a tree of arrays over ranks with one ``MPI_Allreduce`` on the concatenated leaves."""
    leaves, rebuild = tree_flatten(tree)
    if not leaves:
        return tree
    dtype = np.result_type(*leaves)
    flat = np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in leaves])  # (size,)
    total = comm.allreduce_sum(flat)                                      # (size,)
    out, at = [], 0
    for a in leaves:
        out.append(total[at:at + a.size].reshape(a.shape).astype(a.dtype, copy=False))
        at += a.size
    return rebuild(out)


def _counts(cache):
    """Local normalisers: LM targets, sequences, targets of each MTP depth."""
    depths = cache.mtp.depths if cache.mtp is not None else []
    n_seq = cache.ce.dlogits.shape[0] if cache.ce.dlogits.ndim > 1 else 1
    return np.array([cache.ce.n_valid, n_seq] + [c.ce.n_valid for c in depths], dtype=np.int64)


def _global_ce(ce, total):
    """A CE gradient made with this rank's mean (1 / local count), rescaled to the global mean (1 / total)."""
    g = ce.dlogits * ce.dlogits.dtype.type(max(ce.n_valid, 1) / max(total, 1))  # (..., V)
    return ce._replace(dlogits=g, n_valid=total)


def globalize_loss_cache(cache, local, total):
    """Rewrite a :class:`~refimpl.model.transformer.LossCache` so that its backward is this rank's
    share of the gradient of the *global* loss: CE caches get the global target counts, the balance
    coefficients the global number of sequences. ``local``/``total``: the counts of :func:`_counts`
    on this rank and summed over ranks."""
    ce = _global_ce(cache.ce, int(total[0]))
    balance = [(n, cb._replace(coef=cb.coef * (local[1] / total[1]))) for n, cb in cache.balance]
    mtp = cache.mtp
    if mtp is not None:
        depths = [c._replace(ce=_global_ce(c.ce, int(total[2 + i]))) for i, c in enumerate(mtp.depths)]
        mtp = mtp._replace(depths=depths)
    return cache._replace(ce=ce, balance=balance, mtp=mtp)


def dp_train_step(state, config, batch, tc, comm):
    """One data-parallel step on this rank's ``batch = (input_ids, labels or None)`` slice.

    Equivalent to :func:`refimpl.model.train.train_step` on the concatenation of every rank's batch
    (in rank order), to float64 round-off; the history records the global loss values.
    """
    ids, labels = batch

    def forward():
        if np.ndim(ids) != 2 or np.shape(ids)[0] < 1:
            raise ValueError(f"batch: expected input_ids of shape (B_local, T) with B_local >= 1 on every rank, "
                             f"got {np.shape(ids)}")
        return loss_forward(ids, state.params, config, labels, balance=tc.balance, mtp_lambda=tc.mtp_lambda,
                            backend=tc.backend)
    # a bad batch on one rank raises on every rank instead of leaving the others in the all-reduce
    _, cache, info = comm.agree(forward)
    local = _counts(cache)
    total = comm.allreduce_sum(local)
    grads = loss_backward(1.0, globalize_loss_cache(cache, local, total), state.params)
    grads = allreduce_tree(comm, grads)
    # global loss values, for the history: each part re-weighted by this rank's share of its count
    parts = np.array([info["lm_loss"] * local[0], info["balance_loss"] * local[1]]
                     + [lk * n for lk, n in zip(info["mtp_losses"], local[2:], strict=False)], dtype=np.float64)
    parts = comm.allreduce_sum(parts) / np.maximum(total[:parts.size], 1)
    lm, bal = float(parts[0]), float(parts[1])
    mtp = float(tc.mtp_lambda / len(parts[2:]) * parts[2:].sum()) if len(parts) > 2 else 0.0
    # V3's bias update from the load over the global batch
    ginfo = {"load": [comm.allreduce_sum(ld) for ld in info["load"]],
             "mtp_load": [comm.allreduce_sum(ld) for ld in info.get("mtp_load", [])]}
    return apply_gradients(state, config, grads, ginfo, (lm + bal + mtp, lm, bal, mtp), tc)


def dp_train(state, config, batch_fn, tc, comm, *, stop_at=None):
    """Run steps ``state.step .. tc.steps - 1`` (or to ``stop_at``) data-parallel: every rank draws the
    same global batch ``batch_fn(state.rng, step)`` (the RNG is identical on all ranks) and trains on
    its :func:`local_rows`. Same result as :func:`refimpl.model.train.train` with one process.
    Config, train config and initial parameters are checked to be identical on every rank."""
    comm.check_same("config", config)
    comm.check_same("tc", tc)
    comm.check_same("params", state.params)
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)

    def step_fn(s):
        ids, labels = batch_fn(s.rng, s.step)
        rows = local_rows(np.shape(ids)[0], comm.rank, comm.size)
        return dp_train_step(s, config, (ids[rows], None if labels is None else labels[rows]), tc, comm)
    return run_loop(state, step_fn, end=end, progress=False)     # the shared loop of refimpl.train
