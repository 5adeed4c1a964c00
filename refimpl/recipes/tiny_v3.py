r"""Train a tiny DeepSeek-V3 (MLA, DeepSeekMoE with aux-loss-free balancing, MTP) on toy addition.

The "A tiny DeepSeek-V3" chapter's experiment. A 2-layer model (one dense layer, one MoE layer with
8 routed experts + 1 shared, V3's sigmoid router with ``e_score_correction_bias`` and group-limited
top-2) plus one MTP depth module learns to write ``<think>``-style column addition for
``refimpl.tasks`` prompts, character by character (:class:`~refimpl.tasks.CharTokenizer`). Every
gradient is hand-written (:mod:`refimpl.model`); the optimiser is :mod:`refimpl.optim`'s AdamW with
warmup + cosine, V3's bias update runs after each step (:mod:`refimpl.model.train`). Deterministic
for a seed. The defaults finish in about a minute on a laptop CPU; raise ``steps`` for accuracy.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..core import IGNORE_INDEX
from ..model.generate import generate
from ..model.train import TrainConfig, init_state, train
from ..model.transformer import init_params
from ..tasks import TOKENIZER, AdditionTask, make_dataset, reference_completion


def tiny_v3_config(vocab_size=TOKENIZER.vocab_size, **changes):
    """A ~100k-parameter V3: d=64, 4 heads, Dq=32, Dc=16, 8 routed experts (top-2 of 2 groups), MTP D=1."""
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  num_nextn_predict_layers=1, max_position_embeddings=96, initializer_range=0.05,
                  aux_loss_alpha=1e-3)
    fields.update(changes)
    return ModelConfig.preset("tiny").replace(**fields)


def addition_batches(task, batch_size, *, n_train=2000, seed=0, length=64):
    """``batch_fn(rng, step) -> (ids, labels)``: ``<bos> prompt completion <eos>`` right-padded; the
    loss is on the completion only (prompt and padding labelled -100)."""
    data = make_dataset(task, n_train, np.random.default_rng(seed))
    rows, masks = [], []
    for ex in data:
        p = TOKENIZER.encode(ex.prompt, add_bos=True)
        c = TOKENIZER.encode(reference_completion(task, ex), add_eos=True)
        rows.append(np.concatenate([p, c]))
        masks.append(np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)]))
    ids, _ = _pad(rows, length)
    target = _pad(masks, length)[0].astype(bool)
    labels = np.where(target, ids, IGNORE_INDEX)

    def batch_fn(rng, step):
        pick = rng.integers(0, len(ids), batch_size)
        return ids[pick], labels[pick]
    return batch_fn


def _pad(seqs, length):
    from ..tasks import pad_sequences
    return pad_sequences([np.asarray(s, dtype=np.int64) for s in seqs], pad_id=0, length=length)


def answer_accuracy(params, config, task, n=32, seed=1):
    """Exact-match accuracy of greedy completions (cached decoding, ragged prompt batch)."""
    examples = make_dataset(task, n, np.random.default_rng(10_000 + seed))
    prompts = [TOKENIZER.encode(e.prompt, add_bos=True) for e in examples]
    outs = generate(params, config, prompts, 40, stop_tokens=[TOKENIZER.eos_id])
    texts = [TOKENIZER.decode(o[len(p):]) for o, p in zip(outs, prompts, strict=True)]
    correct = [task.check(_answer(t), e.answer) for t, e in zip(texts, examples, strict=True)]
    return float(np.mean(correct)), texts


def _answer(text):
    a, b = text.find("<answer>"), text.find("</answer>")
    return text[a + 8:b] if 0 <= a < b else ""


def tiny_v3_run(steps=300, batch_size=16, seed=0, lr=3e-3, max_digits=2, dtype=np.float32, progress=True, **changes):
    """Train and return ``{"config", "state", "task", "train_config"}`` (history in ``state.history``)."""
    task = AdditionTask(min_digits=1, max_digits=max_digits)
    config = tiny_v3_config(**changes)
    params = init_params(config, np.random.default_rng(seed), dtype)
    tc = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(steps // 20, 1), bias_update_speed=1e-3,
                     backend="numpy")
    state = train(init_state(params, seed), config, addition_batches(task, batch_size, seed=seed), tc,
                  progress=progress)
    return {"config": config, "state": state, "task": task, "train_config": tc}
