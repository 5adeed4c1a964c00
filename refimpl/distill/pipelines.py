r"""Distillation pipelines: GKD on-policy / off-policy distillation and sequence-level KD with rejection.

Two ways to move a teacher's skill into a student that shares its tokenizer but not its
architecture (here: a DeepSeek-V3-style MoE + MLA teacher and a dense Llama-style student with
standard attention, :func:`refimpl.recipes.distill.dense_student_config`):

* **Sequence-level KD** (Kim & Rush 2016, §3), what DeepSeek-R1's distilled models are (R1 §2.4):
  the teacher answers training prompts (:func:`teacher_generations`), answers the task's checker
  rejects are dropped (the rejection sampling of R1 §2.3.3), and the student is fine-tuned on the
  rest by next-token cross-entropy (:func:`sequence_kd_train`).
* **GKD** (Agarwal et al. 2024, §3; TRL ``GKDTrainer`` semantics, :func:`gkd_train`): at every
  step a batch of prompts gets completions from one of three sources and the student is trained to
  match the teacher's *token distributions* on those completions with the generalized JSD
  (:func:`refimpl.distill.generalized_jsd_loss`, mixture weight ``beta`` on the teacher). With
  probability ``lmbda`` the completions are the student's own samples (on-policy: the student
  learns on the states it visits, the fix for exposure bias); otherwise they are the dataset's
  completions, or the teacher's own generations when ``seq_kd`` is set. As in TRL, the coin is
  tossed once per step for the whole batch, ``seq_kd`` replaces the dataset completions before
  the coin, and the student samples at the generation ``temperature`` (TRL default 0.9) while the
  loss uses ``loss_temperature`` (TRL's ``compute_loss`` uses 1).

Every gradient is hand-written: the loss gives the gradient with respect to the student logits,
:func:`refimpl.model.model_backward` carries it to every student parameter; the teacher gets
none. All randomness comes from one ``numpy.random.Generator`` seeded by ``seed``, so a run is a
deterministic function of its arguments. Both trainers run on the shared loop of
:mod:`refimpl.train` (one state, one history format with ``seconds`` per step, checkpoints, exact
resume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .._validate import BACKENDS, check_betas, check_bool, check_choice, check_integer, check_real
from ..core.cross_entropy import IGNORE_INDEX
from ..model.generate import generate
from ..model.sft import sft_train
from ..model.transformer import model_backward, model_forward, shift_labels
from ..optim import adamw_update, clip_grad_norm, warmup_cosine_lr
from ..rl.rollout import completion_text  # the one decoder of completions (also public here)
from ..tasks import TOKENIZER, make_dataset, pad_sequences, reference_completion
from ..train import append_row, check_loop_options, init_state, resume_state, run_loop
from ..tree import tree_map
from .divergences import divergence_options as check_divergence_options
from .divergences import get_divergence
from .losses import divergence_loss

SOURCES = ("dataset", "teacher", "student")


@dataclass(frozen=True)
class GKDConfig:
    """GKD settings with TRL ``GKDConfig`` names (``lmbda``, ``beta``, ``temperature``, ``seq_kd``,
    ``max_new_tokens``) plus the optimiser's: ``steps``, ``batch_size`` prompts per step, ``lr``
    (warmup + cosine to ``min_lr``, default ``lr / 10``), ``warmup_steps``, ``betas``,
    ``weight_decay``, ``max_grad_norm``; ``seed`` drives every random draw. ``backend``: None (the
    ``REFIMPL_BACKEND`` default), ``"auto"``, ``"numpy"`` or ``"numba"``. Validated when built."""

    lmbda: float = 0.5
    beta: float = 0.5
    temperature: float = 0.9
    loss_temperature: float = 1.0
    seq_kd: bool = False
    max_new_tokens: int = 48
    top_p: float = 1.0
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int = 0
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    backend: str | None = None
    divergence: str = "generalized_jsd"      # an entry of refimpl.distill.divergences.DIVERGENCES
    divergence_options: dict | None = None   # its options (beta comes from the beta field)

    def __post_init__(self):
        for name in ("lmbda", "beta"):
            check_real(name, getattr(self, name), low=0.0, high=1.0)
        check_real("temperature", self.temperature, low=0.0)     # 0 = greedy
        check_real("loss_temperature", self.loss_temperature, low=0.0, low_open=True)
        check_real("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_real("lr", self.lr, low=0.0, low_open=True)
        if self.min_lr is not None:
            check_real("min_lr", self.min_lr, low=0.0, high=self.lr)
        for name in ("steps", "batch_size", "max_new_tokens"):
            check_integer(name, getattr(self, name), low=1)
        check_integer("warmup_steps", self.warmup_steps, low=0, high=self.steps)
        check_integer("seed", self.seed, low=0)
        check_real("weight_decay", self.weight_decay, low=0.0)
        check_real("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_betas("betas", self.betas)
        check_bool("seq_kd", self.seq_kd)
        check_choice("backend", self.backend, BACKENDS)
        check_divergence_options(self.divergence, self.divergence_options)


def _check_pair(student_config, teacher_config):
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"teacher_config: vocab_size {teacher_config.vocab_size} differs from the student's "
                         f"{student_config.vocab_size}; GKD needs a shared tokenizer")


def encode_pairs(pairs, *, add_eos=True):
    """``<bos> prompt completion [<eos>]`` rows, right-padded, and labels with -100 on the prompt and
    the padding (the loss sees the completion and ``<eos>`` only).

    Shapes: pairs, a list of B ``(prompt, completion)`` strings -> ids (B, T) int64, labels (B, T) int64.
    """
    if not pairs:
        raise ValueError("pairs: expected at least one (prompt, completion) pair")
    rows, targets = [], []
    for prompt, completion in pairs:
        p = TOKENIZER.encode(prompt, add_bos=True)
        c = TOKENIZER.encode(completion, add_eos=add_eos)
        rows.append(np.concatenate([p, c]))
        targets.append(np.arange(len(p) + len(c)) >= len(p))
    return _pack(rows, targets)


def _rows_from_tokens(prompts, outs):
    """ids/labels from tokenized prompts and generate()'s outputs (completion tokens, cut after <eos>)."""
    return _pack(outs, [np.arange(len(o)) >= len(p) for p, o in zip(prompts, outs, strict=True)])


def _pack(rows, targets):
    """Right-padded ids and labels: the token where ``targets`` is True, -100 elsewhere and on the padding."""
    ids, _ = pad_sequences(rows, pad_id=TOKENIZER.pad_id)                 # (B, T)
    target, _ = pad_sequences([t.astype(np.int64) for t in targets])      # (B, T)
    return ids, np.where(target.astype(bool), ids, IGNORE_INDEX)          # (B, T) each


def gkd_loss(student_params, student_config, teacher_params, teacher_config, input_ids, labels, *, beta=0.5,
             temperature=1.0, backend="numpy", divergence="generalized_jsd", divergence_options=None):
    r"""GKD's objective on given sequences and its gradient for every student parameter.

    .. math:: \mathcal{L} = \frac{1}{N_v}\sum_{n:\,y_{n+1}\neq -100}
              \mathrm{GJSD}_\beta\big(p_T(\cdot\mid y_{\le n}) \,\|\, q_\theta(\cdot\mid y_{\le n})\big)

    (Agarwal et al. 2024, eq. 1 and §3; TRL's ``batchmean`` over the completion tokens.) Position
    ``n`` is scored where ``labels[n + 1]`` is not -100 (the completion, as :func:`shift_labels`).

    ``divergence`` names any entry of :data:`~refimpl.distill.divergences.DIVERGENCES` in place of
    the generalized JSD, with ``divergence_options`` its options (``beta`` is passed to an entry
    that declares it, unless ``divergence_options`` sets it).

    Returns ``(loss, grads, info)``: ``grads`` has the student params' tree (``mtp`` modules, if any,
    get zeros), ``info``: ``tokens`` (scored positions), ``student_logits`` shape.

    Shapes: input_ids, labels (B, T) int64.
    """
    _check_pair(student_config, teacher_config)
    if np.shape(labels) != np.shape(input_ids):
        raise ValueError(f"labels: expected the shape of input_ids {np.shape(input_ids)}, got {np.shape(labels)}")
    s_logits, cache, _ = model_forward(input_ids, student_params, student_config, backend=backend)  # (B, T, V)
    t_logits = model_forward(input_ids, teacher_params, teacher_config, backend=backend)[0]          # (B, T, V)
    shifted = shift_labels(np.asarray(labels, dtype=np.int64))                                      # (B, T)
    opts = dict(divergence_options or {})
    if "beta" in get_divergence(divergence).options:
        opts.setdefault("beta", beta)
    loss, dlogits = divergence_loss(s_logits, t_logits.astype(s_logits.dtype), shifted, divergence=divergence,
                                    temperature=temperature, **opts)
    grads = model_backward(dlogits, cache)
    if "mtp" in student_params:
        grads["mtp"] = tree_map(np.zeros_like, student_params["mtp"])
    grads = {k: grads[k] for k in student_params}
    return loss, grads, {"tokens": int((shifted != IGNORE_INDEX).sum())}


def _generate(params, config, prompts, cfg, rng):
    """Sampled (or greedy at temperature 0) completions of tokenized prompts; a list of full rows."""
    return generate(params, config, list(prompts), cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    rng=rng, stop_tokens=[TOKENIZER.eos_id], backend=cfg.backend)


def gkd_step(state, student_config, teacher_params, teacher_config, pairs, cfg):
    """One GKD step on a batch of dataset ``pairs`` (``(prompt, completion)`` strings).

    ``state`` is a :class:`~refimpl.train.TrainState` (its ``rng`` tosses the coin and samples);
    returns the next state, whose history gains the step's row: ``step``, ``source``
    (``"dataset"``, ``"teacher"`` or ``"student"``: whose completions were trained on), ``loss``,
    ``tokens`` (scored positions), ``sequence_tokens`` (real tokens through both models),
    ``student_generated_tokens``, ``grad_norm``, ``lr``, ``completion_length``.
    """
    rng = state.rng
    prompts = [TOKENIZER.encode(p, add_bos=True) for p, _ in pairs]
    ids, labels = encode_pairs(pairs)
    source = "dataset"
    if cfg.seq_kd:                                   # TRL: teacher generations replace the dataset's
        ids, labels = _rows_from_tokens(prompts, _generate(teacher_params, teacher_config, prompts, cfg, rng))
        source = "teacher"
    if rng.random() < cfg.lmbda:                     # TRL: on-policy with probability lmbda
        ids, labels = _rows_from_tokens(prompts, _generate(state.params, student_config, prompts, cfg, rng))
        source = "student"
    loss, grads, info = gkd_loss(state.params, student_config, teacher_params, teacher_config, ids, labels,
                                 beta=cfg.beta, temperature=cfg.loss_temperature, backend=cfg.backend,
                                 divergence=cfg.divergence, divergence_options=cfg.divergence_options)
    grads, norm = clip_grad_norm(grads, cfg.max_grad_norm)
    lr = warmup_cosine_lr(state.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                          min_lr=cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr)
    params, opt = adamw_update(state.params, grads, state.opt, lr=lr, betas=cfg.betas,
                               weight_decay=cfg.weight_decay)
    completion = (labels != IGNORE_INDEX).sum(axis=1)                     # (B,) tokens after the prompt
    row = {"step": state.step + 1, "source": source, "loss": float(loss), "tokens": info["tokens"],
           "sequence_tokens": int((ids != TOKENIZER.pad_id).sum()),
           "student_generated_tokens": int(completion.sum()) if source == "student" else 0,
           "grad_norm": float(norm), "lr": float(lr), "completion_length": float(np.mean(completion))}
    return state._replace(params=params, opt=opt, step=state.step + 1, history=append_row(state, row))


def default_data(task, n, seed=0):
    """``n`` (prompt, reference completion) pairs of fresh training prompts: GKD's labelled dataset."""
    return [(e.prompt, reference_completion(task, e)) for e in make_dataset(task, n, np.random.default_rng(seed))]


def gkd_train(student_params, student_config, teacher_params, teacher_config, task, cfg, *, data=None,
              n_data=512, progress=True, callback=None, checkpoint_path=None, checkpoint_every=0, stop_at=None,
              resume=None):
    """Generalized knowledge distillation (Agarwal et al. 2024, Algorithm 1; TRL ``GKDTrainer``).

    ``data``: the dataset, a list of ``(prompt, completion)`` strings (default :func:`default_data`
    with ``n_data`` reference completions of ``task``); each step draws ``cfg.batch_size`` of them
    with replacement. ``callback(step, metrics, params) -> bool`` stops the run when it returns True.
    Loop options (:func:`refimpl.train.run_loop`): ``checkpoint_path`` / ``checkpoint_every``,
    ``stop_at`` (end after that many steps of the ``cfg.steps`` schedule), ``resume`` (a checkpoint
    path or a :class:`~refimpl.train.TrainState`) to continue bit for bit.

    Returns ``dict(params, history, seconds, state)``: ``history`` a :class:`~refimpl.train.History`
    of per-step metrics (:func:`gkd_step`, plus ``seconds``), ``seconds`` the wall time per step
    (the history's ``==`` ignores it: the rest is deterministic), ``state`` the final state.
    """
    if not isinstance(cfg, GKDConfig):
        raise TypeError(f"cfg: expected a GKDConfig, got {type(cfg).__name__}")
    _check_pair(student_config, teacher_config)
    check_loop_options(stop_at=stop_at, checkpoint_every=checkpoint_every)
    data = default_data(task, n_data, cfg.seed) if data is None else list(data)
    if not data:
        raise ValueError("data: expected at least one (prompt, completion) pair")

    def step_fn(state):
        pick = state.rng.integers(0, len(data), cfg.batch_size)
        return gkd_step(state, student_config, teacher_params, teacher_config, [data[i] for i in pick], cfg)

    state = init_state(student_params, cfg.seed) if resume is None else resume_state(resume, student_config)
    state = run_loop(state, step_fn, end=cfg.steps if stop_at is None else min(stop_at, cfg.steps), desc="gkd",
                     progress=progress, postfix=lambda m: {"loss": f"{m['loss']:.4f}", "src": m["source"][0]},
                     callback=callback, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                     config=student_config)
    return {"params": state.params, "history": state.history, "seconds": [r["seconds"] for r in state.history],
            "state": state}


def _bar(progress, total, desc):
    if not progress:
        return None
    from tqdm import tqdm  # plain text: tqdm.auto warns in a kernel without ipywidgets
    return tqdm(total=total, desc=desc, leave=False)


def accept(task, completion, answer, *, require_format=True):
    """R1's rejection rule (§2.3.3): the last ``<answer>`` passes ``task.check`` and, with
    ``require_format``, the whole completion is ``<think>…</think><answer>…</answer>``."""
    from ..rl.rewards import accuracy_reward, format_reward
    ok = accuracy_reward([completion], [answer], check=task.check)[0] > 0
    return bool(ok and (not require_format or format_reward([completion])[0] > 0))


def teacher_generations(teacher_params, teacher_config, task, n_prompts, *, num_samples=1, temperature=0.0,
                        top_p=1.0, max_new_tokens=48, reject=True, require_format=True, seed=0, batch_size=64,
                        backend=None, progress=True):
    """Teacher completions of ``n_prompts`` fresh training prompts, with rejection of wrong answers.

    The data of sequence-level KD (Kim & Rush 2016, §3) as DeepSeek-R1 built it (§2.3.3, §2.4):
    ``num_samples`` completions per prompt (greedy at ``temperature=0``, where ``num_samples`` must
    be 1), and with ``reject`` only the distinct ones that :func:`accept` (right answer by
    ``task.check``, and with ``require_format`` the R1 template) are kept.

    Returns ``dict(data, samples, n_generated, n_accepted, acceptance_rate, seconds)``: ``data`` a
    list of ``(prompt, completion)`` strings for :func:`sequence_kd_train`, ``samples`` one dict per
    generation (``prompt``, ``completion``, ``answer``, ``accepted`` by :func:`accept`, ``kept``:
    accepted, or any with ``reject=False``, and not a repeat).
    """
    if temperature == 0 and num_samples != 1:
        raise ValueError(f"num_samples: greedy decoding (temperature=0) gives one completion per prompt, "
                         f"got {num_samples}")
    for name, v in (("n_prompts", n_prompts), ("num_samples", num_samples), ("batch_size", batch_size),
                    ("max_new_tokens", max_new_tokens)):
        check_integer(name, v, low=1)
    rng = np.random.default_rng(seed)
    examples = make_dataset(task, n_prompts, rng)
    rows = [e for e in examples for _ in range(num_samples)]
    t0 = time.perf_counter()
    samples, seen = [], set()
    bar = _bar(progress, len(rows), "teacher generations")
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [TOKENIZER.encode(e.prompt, add_bos=True) for e in chunk]
        outs = generate(teacher_params, teacher_config, prompts, max_new_tokens, temperature=temperature,
                        top_p=top_p, rng=rng, stop_tokens=[TOKENIZER.eos_id], backend=backend)
        for e, p, o in zip(chunk, prompts, outs, strict=True):
            text = completion_text(o[len(p):])
            ok = accept(task, text, e.answer, require_format=require_format)
            kept = (ok or not reject) and (e.prompt, text) not in seen
            seen.add((e.prompt, text))
            samples.append({"prompt": e.prompt, "completion": text, "answer": e.answer, "accepted": ok,
                            "kept": kept})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    data = [(s["prompt"], s["completion"]) for s in samples if s["kept"]]
    return {"data": data, "samples": samples, "n_generated": len(samples), "n_accepted": len(data),
            "acceptance_rate": len(data) / max(len(samples), 1), "seconds": time.perf_counter() - t0}


def sequence_kd_train(student_params, student_config, data, *, steps=200, batch_size=32, lr=3e-3, min_lr=None,
                      warmup_steps=None, weight_decay=0.0, max_grad_norm=1.0, seed=0, backend=None, progress=True,
                      callback=None, checkpoint_path=None, checkpoint_every=0, stop_at=None, resume=None):
    """Sequence-level KD: fine-tune the student on teacher generations by next-token cross-entropy.

    .. math:: \\mathcal{L} = -\\frac{1}{N_v}\\sum_{n} \\log q_\\theta(\\hat y_{n+1} \\mid \\hat y_{\\le n})

    over the completion tokens of the teacher's accepted answers (Kim & Rush 2016, §3; the SFT of
    DeepSeek-R1 §2.4, no RL). ``data``: ``(prompt, completion)`` strings (e.g.
    :func:`teacher_generations`' ``data``); each step draws ``batch_size`` rows with replacement
    and takes an AdamW step (warmup + cosine to ``min_lr``, default ``lr / 10``). It is R1's SFT
    stage, :func:`refimpl.model.sft_train`, on teacher data (with a 5% warmup by default); the loop
    options (``callback``, ``checkpoint_path``, ``checkpoint_every``, ``stop_at``, ``resume``) are
    that function's.

    Returns ``dict(params, history, tokens, seconds, state)`` (``history``: a
    :class:`~refimpl.train.History`, per step ``step``, :data:`refimpl.model.train.HISTORY`,
    ``seconds``; ``tokens``: real tokens trained on, forward and backward; ``seconds``: the wall
    time of each step).
    """
    data = list(data)
    if not data:
        raise ValueError("data: expected at least one (prompt, completion) pair (did rejection drop everything?)")
    warm = max(steps // 20, 1) if warmup_steps is None else warmup_steps
    return sft_train(student_params, student_config, data, steps=steps, batch_size=batch_size, lr=lr, min_lr=min_lr,
                     warmup_steps=warm, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                     progress=progress, backend=backend, callback=callback, checkpoint_path=checkpoint_path,
                     checkpoint_every=checkpoint_every, stop_at=stop_at, resume=resume)
