"""refimpl.train: the History format, the shared loop's hooks, checkpoint validation and old checkpoints."""

import json

import numpy as np
import pytest

from refimpl.config import ModelConfig
from refimpl.model import init_params
from refimpl.train import (
    History,
    TrainState,
    append_row,
    init_state,
    load_checkpoint,
    resume_state,
    run_loop,
    save_checkpoint,
)
from refimpl.tree import tree_flatten, tree_paths


def test_history_columns_equality_and_round_trips():
    h = History([{"step": 1, "loss": 2.0, "seconds": 0.5}, {"step": 2, "loss": 1.0, "eval": 0.3, "seconds": 0.7}])
    assert h["loss"] == [2.0, 1.0] and h["eval"] == [None, 0.3] and h.column("eval", 0.0) == [0.0, 0.3]
    assert h.keys() == ["step", "loss", "seconds", "eval"] and dict(h.items())["step"] == [1, 2]
    with pytest.raises(KeyError):
        h["missing"]
    assert isinstance(h[:1], History) and h[0] == {"step": 1, "loss": 2.0, "seconds": 0.5} and len(h) == 2
    other = History([{**r, "seconds": 9.0} for r in h])             # another machine's timings
    assert h == other and not (h != other)
    assert h == json.loads(json.dumps(h))                               # a plain list from JSON compares too
    assert h != History([{**h[0], "loss": 2.5}, h[1]])                 # any other difference counts
    assert h.without_timing() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "eval": 0.3}]
    cols = History([{"a": 1, "b": 2.0}, {"a": 3, "b": 4.0}])
    assert History.from_columns(cols.columns()) == cols and History.from_columns({}) == []
    with pytest.raises(ValueError, match="columns"):
        History.from_columns({"a": [1], "b": [1, 2]})


def _counting_state():
    params = {"w": np.zeros(3)}
    return init_state(params, seed=5)


def _step(state):
    """A toy step: add a random draw to w, record it."""
    x = state.rng.standard_normal(3)                                    # (3,)
    params = {"w": state.params["w"] + x}
    return state._replace(params=params, step=state.step + 1, history=append_row(state, {"step": state.step + 1,
                                                                                          "x0": float(x[0])}))


def test_run_loop_rows_callback_and_eval_hook():
    calls = []

    def callback(step, row, params):
        calls.append((step, dict(row)))
        return step == 3

    def eval_hook(state, stopped):
        return state._replace(extra={"evals": state.extra.get("evals", 0) + 1}), ({"ev": state.step} if stopped
                                                                                    else None)
    s0 = _counting_state()
    out = run_loop(s0, _step, end=10, progress=False, callback=callback, eval_hook=eval_hook)
    assert out.step == 3 and s0.step == 0 and len(s0.history) == 0      # stopped by the callback; input untouched
    assert [c[0] for c in calls] == [1, 2, 3] and "seconds" not in calls[0][1]
    assert all(r["seconds"] >= 0 for r in out.history) and out.history["step"] == [1, 2, 3]
    assert out.history["ev"] == [None, None, 3] and out.extra["evals"] == 3
    again = run_loop(_counting_state(), _step, end=3, progress=True)
    assert again.history["x0"] == out.history["x0"]                  # same draws without the hooks
    np.testing.assert_array_equal(again.params["w"], out.params["w"])


def test_run_loop_bad_input(tmp_path):
    with pytest.raises(TypeError, match="state"):
        run_loop({"params": {}}, _step, end=1, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_loop(_counting_state(), _step, end=1, progress=False, checkpoint_every=-1)
    with pytest.raises(ValueError, match="config"):
        run_loop(_counting_state(), _step, end=1, progress=False, checkpoint_path=tmp_path / "c.npz")


def _tiny():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=11, max_position_embeddings=16, num_nextn_predict_layers=0)
    return cfg, init_params(cfg, np.random.default_rng(0), np.float32)


def test_checkpoint_keeps_frozen_trees_extra_and_rng(tmp_path):
    cfg, params = _tiny()
    ref = init_params(cfg, np.random.default_rng(1), np.float32)
    state = init_state(params, seed=3, frozen={"ref_params": ref}, extra={"evals": [{"step": 0, "accuracy": 0.5}]})
    state.rng.random(7)
    state = state._replace(history=History([{"step": 1, "loss": 1.5, "seconds": 0.1, "f32": np.float32(0.25),
                                             "n": np.int64(3)}]), step=1)
    save_checkpoint(tmp_path / "c.npz", state, cfg)
    back, cfg2 = load_checkpoint(tmp_path / "c.npz")
    assert cfg2 == cfg and isinstance(back.history, History) and back.history == state.history
    assert back.step == 1 and back.extra == state.extra and back.rng.random() == state.rng.random()
    for name, a, b in ((n, tree_flatten(x)[0], tree_flatten(y)[0]) for n, x, y in
                       (("params", state.params, back.params), ("ref", ref, back.frozen["ref_params"]))):
        assert all(np.array_equal(u, v) and u.dtype == v.dtype for u, v in zip(a, b, strict=True)), name
    assert tree_paths(back.frozen["ref_params"]) == tree_paths(ref)
    assert type(back.history[0]["f32"]) is float and back.history[0]["n"] == 3       # NumPy scalars as numbers
    with pytest.raises(TypeError, match="history row"):
        save_checkpoint(tmp_path / "x.npz", state._replace(extra={"bad": object()}), cfg)
    assert not (tmp_path / "x.npz").exists()                              # atomic: nothing half-written
    assert resume_state(tmp_path / "c.npz", cfg).step == 1 and resume_state(back, cfg) is back
    with pytest.raises(ValueError, match="resume"):
        resume_state(tmp_path / "c.npz", cfg.replace(vocab_size=12))
    with pytest.raises(ValueError, match="frozen"):
        save_checkpoint(tmp_path / "d.npz", state._replace(frozen={"a/b": ref}), cfg)
    with pytest.raises(ValueError, match="frozen tree ref_params"):
        bad = state._replace(frozen={"ref_params": {**ref, "lm_head": np.zeros((3, 3), np.float32)}})
        save_checkpoint(tmp_path / "e.npz", bad, cfg)
        load_checkpoint(tmp_path / "e.npz")


def test_reads_a_checkpoint_with_the_old_dict_of_lists_history(tmp_path):
    """Checkpoints written before refimpl.train (history a dict of lists, no frozen/extra) still load."""
    cfg, params = _tiny()
    state = init_state(params, seed=2)
    save_checkpoint(tmp_path / "new.npz", state, cfg)
    with np.load(tmp_path / "new.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["history"] = {"loss": [3.0, 2.0], "lr": [0.1, 0.2]}
    del meta["extra"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    back, _ = load_checkpoint(tmp_path / "old.npz")
    assert isinstance(back, TrainState) and back.history == [{"loss": 3.0, "lr": 0.1}, {"loss": 2.0, "lr": 0.2}]
    assert back.history["loss"] == [3.0, 2.0] and back.extra == {} and back.frozen == {}


@pytest.mark.parametrize("make,field,bad,exc", [
    ("train", "steps", True, TypeError), ("train", "warmup_steps", 200, ValueError), ("train", "lr", "1e-3", TypeError),
    ("train", "backend", "cuda", ValueError),
    ("grpo", "steps", -1, ValueError), ("grpo", "warmup_steps", 1.5, TypeError),
    ("grpo", "lr", float("nan"), ValueError), ("grpo", "backend", "cuda", ValueError),
    ("gkd", "steps", 0, ValueError), ("gkd", "warmup_steps", 101, ValueError), ("gkd", "lr", None, TypeError),
    ("gkd", "backend", "cuda", ValueError),
])
def test_every_training_config_is_validated_when_built(make, field, bad, exc):
    """TrainConfig, GRPOConfig and GKDConfig check their scalars with the same helpers (refimpl._validate):
    TypeError for a wrong type, ValueError for a value out of range, the field named; backend defaults to
    None (REFIMPL_BACKEND, then auto) in all three."""
    from refimpl.distill.pipelines import GKDConfig
    from refimpl.model.train import TrainConfig
    from refimpl.rl import GRPOConfig
    cls = {"train": TrainConfig, "grpo": GRPOConfig, "gkd": GKDConfig}[make]
    assert cls().backend is None
    with pytest.raises(exc, match=field):
        cls(**{field: bad})
