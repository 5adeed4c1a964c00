"""Issue 15 items 1, 4 and 11: the parameter tree is checked against the config at the entry
points; training checkpoints are written atomically (a save killed half-way leaves the previous
checkpoint loadable) and a damaged checkpoint is rejected naming the file and the tensor."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import ModelConfig
from refimpl.model import generate, init_params, loss_forward, model_forward, save_pretrained
from refimpl.model.structure import check_params, expected_params
from refimpl.model.train import TrainConfig, init_state, load_checkpoint, save_checkpoint, train
from refimpl.recipes.distill import dense_student_config
from refimpl.testing.strategies import model_configs
from refimpl.tree import tree_flatten, tree_paths

CFG = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=1)
IDS = np.array([[1, 2, 3]])
TC = TrainConfig(steps=3, warmup_steps=1, backend="numpy")
ROOT = Path(__file__).resolve().parents[2]


def _params(mtp=None):
    return init_params(CFG, np.random.default_rng(0), mtp=mtp)


def _batch(rng, step):
    ids = rng.integers(0, CFG.vocab_size, size=(2, 6))
    return ids, None


# ------------------------------------------------------------------------------------------------
# Item 4: the tree against the config
# ------------------------------------------------------------------------------------------------

@given(cfg=model_configs(), mtp=st.booleans())
def test_expected_tree_is_the_initialised_tree(cfg, mtp):
    real = init_params(cfg, np.random.default_rng(0), mtp=mtp)
    exp = expected_params(cfg, mtp=mtp)
    assert tree_paths(real) == tree_paths(exp)
    assert [a.shape for a in tree_flatten(real)[0]] == [a.shape for a in tree_flatten(exp)[0]]
    check_params(real, cfg)


def test_dense_student_tree_is_followed():
    cfg = dense_student_config()
    p = init_params(cfg, np.random.default_rng(0))
    check_params(p, cfg)
    p["model"]["layers"][0]["self_attn"]["k_proj"] = p["model"]["layers"][0]["self_attn"]["k_proj"][:1]
    with pytest.raises(ValueError, match=r"^params: model\.layers\.0\.self_attn\.k_proj: expected shape"):
        check_params(p, cfg)


def _bad_trees():
    p = _params()
    p["lm_head"] = p["lm_head"][:10]
    yield "lm_head", p
    p = _params()
    p["model"]["layers"].append(p["model"]["layers"][-1])
    yield "model.layers", p
    p = _params()
    del p["model"]["norm"]
    yield "model.norm", p
    p = _params()
    p["model"]["layers"][1]["mlp"]["gate"]["extra"] = np.zeros(3)
    yield "model.layers.1.mlp.gate.extra", p
    p = _params()
    p["lm_head"] = np.full_like(p["lm_head"], np.inf)
    yield "lm_head", p
    p = _params()
    p["model"]["embed_tokens"] = p["model"]["embed_tokens"].astype(np.int64)
    yield "model.embed_tokens", p
    p = _params(mtp=True)
    p["mtp"][0]["eh_proj"] = p["mtp"][0]["eh_proj"][:, :5]
    yield "mtp.0.eh_proj", p


@pytest.mark.parametrize("where, params", list(_bad_trees()))
def test_entry_points_check_the_tree(where, params, tmp_path):
    pat = "^params: .*" + re.escape(where)
    for call in (lambda: model_forward(IDS, params, CFG), lambda: loss_forward(IDS, params, CFG),
                 lambda: generate(params, CFG, IDS, 2), lambda: save_pretrained(tmp_path / "m", params, CFG)):
        with pytest.raises((ValueError, TypeError), match=pat):
            call()
    with pytest.raises((ValueError, TypeError), match=r"^state\.params"):
        train(init_state(params), CFG, _batch, TC, progress=False)
    assert not (tmp_path / "m").exists()


def test_mtp_is_optional_but_checked_when_present():
    check_params(_params(mtp=False), CFG)
    check_params({**_params(mtp=False), "mtp": []}, CFG)
    check_params(_params(mtp=True), CFG)


# ------------------------------------------------------------------------------------------------
# Item 1: atomic checkpoints; a save killed half-way keeps the previous one
# ------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from refimpl import ModelConfig
    from refimpl.model import init_params
    from refimpl.model.train import TrainConfig, init_state, train

    real_savez, calls = np.savez, [0]
    def slow_savez(f, **arrays):
        calls[0] += 1
        if calls[0] < 2:
            return real_savez(f, **arrays)
        import io
        buf = io.BytesIO()
        real_savez(buf, **arrays)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])   # half of the new checkpoint is on disk
        f.flush()
        print("SAVING", flush=True)
        time.sleep(60)
    np.savez = slow_savez        # refimpl.model.train calls np.savez

    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=1)
    def batch(rng, step):
        return rng.integers(0, cfg.vocab_size, size=(2, 6)), None
    train(init_state(init_params(cfg, np.random.default_rng(0))), cfg, batch,
          TrainConfig(steps=3, warmup_steps=1, backend="numpy"), checkpoint_path=sys.argv[1],
          checkpoint_every=1, progress=False)
""")


def test_killed_during_a_save_the_previous_checkpoint_survives(tmp_path):
    path = tmp_path / "run.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "SAVING"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    state, cfg = load_checkpoint(path)          # the step-1 checkpoint, complete
    assert state.step == 1 and len(state.history["loss"]) == 1 and cfg == CFG
    ref = train(init_state(_params()), CFG, _batch, TC, stop_at=1, progress=False)
    for a, b in zip(tree_flatten(state.params)[0], tree_flatten(ref.params)[0], strict=True):
        np.testing.assert_array_equal(a, b)
    # and the run resumes from it to the same end as an uninterrupted run
    end = train(state, cfg, _batch, TC, progress=False)
    full = train(init_state(_params()), CFG, _batch, TC, progress=False)
    assert end.history == full.history


# ------------------------------------------------------------------------------------------------
# Item 11: damaged training checkpoints
# ------------------------------------------------------------------------------------------------

def _saved(tmp_path):
    path = tmp_path / "ck.npz"
    save_checkpoint(path, init_state(_params()), CFG)
    return path


def _rewrite(path, drop=(), change=None):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(change or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage, match", [
    ("truncate", "not a readable"), ("empty", "not a readable"), ("text", "not a readable"),
    ("no_meta", "not a readable"), ("no_moment", r"AdamW moment v: missing tensor lm_head"),
    ("bad_shape", r"params: model\.norm: expected shape"), ("extra", r"params: unexpected entry bogus"),
    ("bad_moment_shape", r"AdamW moment m: lm_head: expected shape"),
])
def test_damaged_checkpoints_name_the_file_and_tensor(tmp_path, damage, match):
    path = _saved(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("hello")
    elif damage == "no_meta":
        _rewrite(path, drop=("meta",))
    elif damage == "no_moment":
        _rewrite(path, drop=("v/lm_head",))
    elif damage == "bad_shape":
        _rewrite(path, change={"params/model.norm": np.ones(5)})
    elif damage == "extra":
        _rewrite(path, change={"params/bogus": np.ones(5)})
    elif damage == "bad_moment_shape":
        _rewrite(path, change={"m/lm_head": np.ones(5)})
    with pytest.raises(ValueError, match=rf"^path: .*ck\.npz.*{match}"):
        load_checkpoint(path)
