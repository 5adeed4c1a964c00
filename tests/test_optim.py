"""AdamW, clipping and the schedule against torch and by hand."""

import numpy as np
import pytest

from refimpl import optim
from refimpl.tree import tree_flatten, tree_map, tree_paths


def _params(rng):
    return {"embed": rng.standard_normal((5, 3)), "layers": [{"w": rng.standard_normal((3, 3)),
                                                                "norm": rng.standard_normal(3)}]}


def test_adamw_matches_torch_over_several_steps(rng):
    torch = pytest.importorskip("torch")
    params = _params(rng)
    leaves, _ = tree_flatten(params)
    tparams = [torch.tensor(x, requires_grad=True) for x in leaves]
    topt = torch.optim.AdamW(tparams, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    state = optim.adamw_init(params)
    for _ in range(5):
        grads = tree_map(lambda p: rng.standard_normal(p.shape), params)
        for tp, g in zip(tparams, tree_flatten(grads)[0], strict=True):
            tp.grad = torch.tensor(g)
        topt.step()
        params, state = optim.adamw_update(params, grads, state, lr=1e-2, weight_decay=0.1,
                                           decay_mask=lambda *_: True)
    for tp, p in zip(tparams, tree_flatten(params)[0], strict=True):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert state.step == 5


def test_adamw_default_mask_skips_vectors_and_is_pure(rng):
    params = _params(rng)
    before = tree_map(np.copy, params)
    zero = tree_map(np.zeros_like, params)
    new, _ = optim.adamw_update(params, zero, optim.adamw_init(params), lr=0.1, weight_decay=0.5)
    np.testing.assert_array_equal(new["layers"][0]["norm"], params["layers"][0]["norm"])   # no decay
    np.testing.assert_allclose(new["embed"], params["embed"] * (1 - 0.05))                 # decayed
    for a, b in zip(tree_flatten(params)[0], tree_flatten(before)[0], strict=True):
        np.testing.assert_array_equal(a, b)                                                 # inputs untouched
    assert tree_paths(params) == ["embed", "layers.0.w", "layers.0.norm"]


def test_first_step_moves_each_entry_by_lr(rng):
    """With bias correction, Adam's first step is lr * sign(g) (up to eps)."""
    p = {"w": np.zeros((2, 2))}
    g = {"w": np.array([[3.0, -1e-3], [0.5, -7.0]])}
    new, _ = optim.adamw_update(p, g, optim.adamw_init(p), lr=0.01, weight_decay=0.0)
    np.testing.assert_allclose(new["w"], -0.01 * np.sign(g["w"]), rtol=1e-4)


def test_clip_grad_norm_matches_torch(rng):
    torch = pytest.importorskip("torch")
    grads = _params(rng)
    norm = optim.global_grad_norm(grads)
    clipped, n = optim.clip_grad_norm(grads, norm / 3)
    ts = [torch.zeros(x.shape, dtype=torch.float64, requires_grad=True) for x in tree_flatten(grads)[0]]
    for t, g in zip(ts, tree_flatten(grads)[0], strict=True):
        t.grad = torch.tensor(g)
    tn = torch.nn.utils.clip_grad_norm_(ts, norm / 3)
    assert n == pytest.approx(float(tn), rel=1e-12)
    for t, c in zip(ts, tree_flatten(clipped)[0], strict=True):
        np.testing.assert_allclose(c, t.grad.numpy(), rtol=1e-12)
    same, _ = optim.clip_grad_norm(grads, norm * 2)
    assert same is grads


def test_schedule_shape():
    kw = dict(lr=1.0, warmup_steps=4, hold_steps=2, total_steps=16, min_lr=0.1)
    lrs = [optim.warmup_cosine_lr(s, **kw) for s in range(20)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == lrs[5] == 1.0
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))
    assert lrs[16] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert optim.warmup_cosine_lr(11, **kw) == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)))


@pytest.mark.parametrize("call, arg", [
    (lambda: optim.warmup_cosine_lr(0, lr=1, warmup_steps=5, total_steps=3), "total_steps"),
    (lambda: optim.clip_grad_norm({"a": np.ones(2)}, 0), "max_norm"),
    (lambda: optim.adamw_update({"a": np.ones(2)}, {"a": np.ones(3)}, optim.adamw_init({"a": np.ones(2)}), lr=1),
     "grads"),
    (lambda: optim.adamw_update({"a": np.ones(2)}, {"a": np.ones(2)}, optim.adamw_init({"a": np.ones(2)}), lr=-1),
     "lr"),
])
def test_bad_input(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        call()
