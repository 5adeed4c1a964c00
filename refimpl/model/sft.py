"""Supervised fine-tuning on text: next-token cross-entropy on chosen tokens, on the shared training loop.

The cold-start and rejection-sampling SFT stages of DeepSeek-R1 (§2.3.1, §2.3.3), the SFT that
distils R1 into dense students (§2.4, sequence-level KD) and the toy base models' pretraining are
one function: rows of :data:`refimpl.tasks.TOKENIZER` tokens, the loss on the completion (or on
every token), AdamW through :func:`refimpl.model.train.train_step` (V3's balance loss and bias
update included) on :func:`refimpl.train.run_loop`.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_integer
from ..core import IGNORE_INDEX
from ..tasks import TOKENIZER
from ..train import check_loop_options, init_state, resume_state, run_loop
from .structure import check_params
from .train import TrainConfig, train_step


def sft_rows(data):
    """Token rows and loss masks of :func:`sft_train`'s two data forms.

    Returns ``(rows, targets)``: lists of 1-D int64 token arrays (``<bos>`` ... ``<eos>``) and of
    bool arrays of the same lengths, True where the loss reads the token.
    """
    if isinstance(data, str) or not hasattr(data, "__len__") or len(data) == 0:
        raise ValueError("data: expected a non-empty list of (prompt, completion) pairs or of strings")
    rows, targets = [], []
    for i, item in enumerate(data):
        if isinstance(item, str):
            ids = TOKENIZER.encode(item, add_bos=True, add_eos=True)
            tgt = np.ones(len(ids), bool)
        elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            p = TOKENIZER.encode(item[0], add_bos=True)
            c = TOKENIZER.encode(item[1], add_eos=True)
            ids = np.concatenate([p, c])
            tgt = np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)])
        else:
            raise TypeError(f"data: item {i} is neither a str nor a (prompt, completion) pair of str: {item!r:.80}")
        rows.append(ids)
        targets.append(tgt)
    return rows, targets


def sft_train(params, config, data, *, steps=100, batch_size=32, lr=1e-3, min_lr=None, warmup_steps=0,
              weight_decay=0.0, max_grad_norm=1.0, seed=0, progress=True, backend=None, callback=None,
              checkpoint_path=None, checkpoint_every=0, stop_at=None, resume=None):
    """Supervised fine-tuning by next-token cross-entropy (the cold-start and rejection-sampling SFT
    stages of DeepSeek-R1 §2.3.1, §2.3.3; also the base model's pretraining).

    ``data``: a list of ``(prompt, completion)`` string pairs — rows ``<bos> prompt completion
    <eos>`` with the loss on the completion and ``<eos>`` only — or a list of strings — rows
    ``<bos> text <eos>`` with the loss on every token. Batches of ``batch_size`` rows are drawn with
    replacement (``default_rng(seed)``) and padded to their longest row, for ``steps`` AdamW steps
    (:func:`refimpl.optim.warmup_cosine_lr`: linear warmup, cosine decay to ``min_lr``, default
    ``lr / 10``) through :func:`refimpl.model.train.train_step`. ``backend``: None (the
    ``REFIMPL_BACKEND`` default), ``"auto"``, ``"numpy"`` or ``"numba"``.

    Loop options (:func:`refimpl.train.run_loop`): ``callback(step, row, params)`` returning True
    stops; ``checkpoint_path`` / ``checkpoint_every`` save the state; ``stop_at`` ends after that
    many steps (of the ``steps``-step schedule); ``resume``: a checkpoint path or a
    :class:`~refimpl.train.TrainState` to continue from, bit for bit (``params`` then only fixes the
    structure).

    Returns ``dict(params, history, tokens, seconds, state)``: ``history`` a
    :class:`~refimpl.train.History` (per step ``step``, :data:`refimpl.model.train.HISTORY`,
    ``seconds``), ``tokens`` the real tokens trained on (for compute accounting), ``seconds`` the
    wall time of each step, ``state`` the final :class:`~refimpl.train.TrainState`.
    """
    check_params(params, config)
    if config.vocab_size < TOKENIZER.vocab_size:
        raise ValueError(f"config.vocab_size: expected >= {TOKENIZER.vocab_size} (refimpl.tasks.TOKENIZER), "
                         f"got {config.vocab_size}")
    rows, targets = sft_rows(data)
    check_integer("steps", steps, low=0)
    check_integer("batch_size", batch_size, low=1)
    check_integer("warmup_steps", warmup_steps, low=0, high=steps)
    check_loop_options(stop_at=stop_at, checkpoint_every=checkpoint_every)
    longest = max(len(r) for r in rows)
    if longest > config.max_position_embeddings:
        raise ValueError(f"data: a row has {longest} tokens, more than max_position_embeddings="
                         f"{config.max_position_embeddings}")
    lens = np.array([len(r) for r in rows])                            # (N,)
    ids = np.zeros((len(rows), longest), dtype=np.int64)                # (N, L) right-padded
    labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)  # (N, L) IGNORE_INDEX = no loss
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, :len(r)] = r
        labels[i, :len(r)] = np.where(t, r, IGNORE_INDEX)
    tc = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10 if min_lr is None else min_lr, warmup_steps=warmup_steps,
                     weight_decay=weight_decay, max_grad_norm=max_grad_norm, backend=backend)

    def step_fn(state):
        pick = state.rng.integers(0, len(rows), batch_size)             # (b,)
        width = int(lens[pick].max())
        new = train_step(state, config, (ids[pick, :width], labels[pick, :width]), tc)
        return new._replace(extra={**new.extra, "tokens": new.extra.get("tokens", 0) + int(lens[pick].sum())})

    state = init_state(params, seed, extra={"tokens": 0}) if resume is None else resume_state(resume, config)
    state = run_loop(state, step_fn, end=steps if stop_at is None else min(stop_at, steps), desc="sft",
                     progress=progress, postfix=lambda row: {"loss": f"{row['loss']:.4f}"}, callback=callback,
                     checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, config=config)
    return {"params": state.params, "history": state.history, "tokens": state.extra.get("tokens", 0),
            "seconds": [r["seconds"] for r in state.history], "state": state}
