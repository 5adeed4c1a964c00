"""The one training loop: a method's step function plugged into progress, callback, evaluation,
checkpoints and resume.

A method supplies ``step_fn(state) -> state``: one optimisation step that returns the next
:class:`~refimpl.train.state.TrainState` with ``step`` one higher and one metrics dict appended to
its history (:func:`~refimpl.train.state.append_row`). :func:`run_loop` does the rest, the same way
for pretraining, SFT, GRPO and GKD:

1. ``state = step_fn(state)``;
2. ``callback(step, row, params)``, if given; a truthy return stops the run after this step;
3. ``eval_hook(state, stopped) -> (state, metrics or None)``, if given: the method decides whether
   to evaluate at this step; the metrics join the step's row;
4. the step's wall time (1-3) goes into the row as ``seconds``;
5. every ``checkpoint_every`` steps, and at the end, the state is saved to ``checkpoint_path``
   (:func:`~refimpl.train.state.save_checkpoint`).

Resuming is calling the method again with the state of :func:`~refimpl.train.state.load_checkpoint`:
the loop starts at ``state.step``, and as the state holds the RNG, the run goes on bit for bit.
"""

from __future__ import annotations

import time

from .._validate import check_integer
from .state import TrainState, save_checkpoint


def check_loop_options(*, stop_at=None, checkpoint_path=None, checkpoint_every=0, config=None):
    """Validate the loop's keyword options (ValueError/TypeError naming the option)."""
    if stop_at is not None:
        check_integer("stop_at", stop_at, low=0)
    check_integer("checkpoint_every", checkpoint_every, low=0)
    if checkpoint_path is not None and config is None:
        raise ValueError("config: a checkpoint needs the model config")


def run_loop(state, step_fn, *, end, desc="train", progress=True, postfix=None, callback=None, eval_hook=None,
             checkpoint_path=None, checkpoint_every=0, config=None):
    """Run ``step_fn`` from ``state.step`` until ``end`` steps are done (or ``callback`` stops it).

    ``postfix(row) -> dict`` gives the progress bar's fields (plain-text tqdm, ``desc``);
    ``config``: the model config stored in checkpoints. Returns the final state.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a refimpl.train.TrainState, got {type(state).__name__}")
    check_loop_options(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, config=config)
    bar = None
    if progress:
        from tqdm import tqdm  # plain text: tqdm.auto warns in a kernel without ipywidgets
        bar = tqdm(total=max(end - state.step, 0), desc=desc, leave=False)
    try:
        while state.step < end:
            t0 = time.perf_counter()
            state = step_fn(state)
            row = state.history[-1]
            stop = bool(callback(state.step, row, state.params)) if callback is not None else False
            if eval_hook is not None:
                state, metrics = eval_hook(state, stop)
                row.update(metrics or {})
            row["seconds"] = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(postfix(row))
            if checkpoint_path is not None and checkpoint_every and state.step % checkpoint_every == 0:
                save_checkpoint(checkpoint_path, state, config)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, state, config)
    return state


def lm_loss_grads(cache, params):
    """Gradients of :func:`refimpl.model.loss_forward`'s loss for every parameter: the loops' one call
    of :func:`refimpl.model.loss_backward` (so a change of its signature is mended here only)."""
    from ..model.transformer import loss_backward  # imported here: refimpl.model imports this package
    return loss_backward(1.0, cache, params)
