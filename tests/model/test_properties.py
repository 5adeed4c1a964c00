"""Properties over hypothesis-drawn configs (V2/V3 routers, with/without query compression, YaRN)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.model import init_caches, init_params, loss_backward, loss_forward, model_forward, model_infer
from refimpl.testing import check_grad, tol
from refimpl.testing.strategies import model_configs


@settings(max_examples=10)
@given(cfg=model_configs(), seed=st.integers(0, 2**31), t=st.integers(2, 7), split=st.integers(1, 6))
def test_cached_decoding_equals_full_forward(cfg, seed, t, split):
    """Prefill ``split`` tokens, decode the rest one by one: logits == one full causal pass (both impls)."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, t))
    full = model_forward(ids, params, cfg, backend="numpy")[0]
    split = min(split, t)
    for impl in ("absorb", "naive"):
        caches = init_caches(cfg, 2, t)
        parts = [model_infer(ids[:, :split], params, cfg, caches, 0, impl=impl)[0]]
        parts += [model_infer(ids[:, i:i + 1], params, cfg, caches, i, impl=impl)[0] for i in range(split, t)]
        np.testing.assert_allclose(np.concatenate(parts, axis=1), full, **tol("equiv64"))


@settings(max_examples=6)
@given(cfg=model_configs(), seed=st.integers(0, 2**31))
def test_gradcheck_random_configs(cfg, seed):
    """All parameter gradients of CE + balance loss for drawn configs (1-3 layers, dense or MoE)."""
    cfg = cfg.replace(aux_loss_alpha=0.05)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 4))

    def f(p):
        loss, cache, _ = loss_forward(ids, p, cfg, backend="numpy")
        return loss, lambda d: (loss_backward(float(d), cache, p),)
    assert check_grad(f, [params], max_entries=2, seed=seed % 1000) < tol("gradcheck")["rtol"]
