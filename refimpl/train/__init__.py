"""One training loop for every method: one state, one history format, one checkpoint and resume path.

* :mod:`~refimpl.train.state` — :class:`TrainState` (params, AdamW state, step, RNG, history, plus
  ``frozen`` trees and JSON ``extra``), :func:`save_checkpoint` / :func:`load_checkpoint` (one
  atomic ``.npz``, no pickle).
* :mod:`~refimpl.train.history` — :class:`History`: a list with one metrics dict per step,
  ``seconds`` per step in each; ``h["loss"]`` is a column; ``==`` ignores ``seconds``.
* :mod:`~refimpl.train.loop` — :func:`run_loop`: a method's step function with progress bar,
  callback, evaluation hook, checkpoints every N steps and exact resume.

The methods plug their step into it: pretraining (:func:`refimpl.model.train`), supervised
fine-tuning (:func:`refimpl.model.sft_train`, also :func:`refimpl.rl.sft_train`), GRPO
(:func:`refimpl.rl.grpo_train`), GKD and sequence-level KD
(:func:`refimpl.distill.pipelines.gkd_train`, :func:`refimpl.distill.pipelines.sequence_kd_train`).
Each takes ``checkpoint_path``, ``checkpoint_every``, ``stop_at`` and resumes from a loaded state
bit for bit; the learning rate always follows :func:`refimpl.optim.warmup_cosine_lr`.
"""

from .history import History
from .loop import check_loop_options, lm_loss_grads, run_loop
from .state import (
    TrainState,
    append_row,
    init_state,
    load_checkpoint,
    resume_state,
    save_checkpoint,
    unflatten,
)

__all__ = ["History", "TrainState", "init_state", "append_row", "run_loop", "check_loop_options", "lm_loss_grads",
           "save_checkpoint", "load_checkpoint", "resume_state", "unflatten"]
