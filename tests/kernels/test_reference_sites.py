"""The three sites whose ``backend=None`` means the reference unless ``REFIMPL_BACKEND`` is set
(refimpl.backend, "Sites whose default is the reference"), and the callers that pass their own
``backend`` through to them unresolved."""

import numpy as np
import pytest

pytest.importorskip("numba")
from refimpl.backend import AUTO_MIN_WORK, resolve_backend  # noqa: E402
from refimpl.config import ModelConfig  # noqa: E402
from refimpl.moe import init_moe_params, moe_forward  # noqa: E402
from refimpl.moe.dispatch import experts_forward, make_plan  # noqa: E402
from refimpl.rl import grpo_loss_from_logits, logps_entropy_forward  # noqa: E402

# REFIMPL_BACKEND -> what None resolves to at the three sites (every input here is above AUTO_MIN_WORK)
CASES = [(None, "numpy"), ("numpy", "numpy"), ("numba", "numba"), ("auto", "numba")]


def _env(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    else:
        monkeypatch.setenv("REFIMPL_BACKEND", env)


def test_resolve_backend_default_applies_only_without_the_environment(monkeypatch):
    monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    assert resolve_backend(None, work=AUTO_MIN_WORK, default="numpy") == "numpy"
    assert resolve_backend(None, work=AUTO_MIN_WORK) == "numba"
    assert resolve_backend("auto", work=AUTO_MIN_WORK, default="numpy") == "numba"   # explicit wins
    monkeypatch.setenv("REFIMPL_BACKEND", "numba")
    assert resolve_backend(None, default="numpy") == "numba"
    with pytest.raises(ValueError, match="default"):
        resolve_backend(None, default="gpu")


def _logits(rng):
    b, t, v = 4, 5, AUTO_MIN_WORK // 16                                  # 20 rows x 4096 > AUTO_MIN_WORK
    logits = rng.standard_normal((b, t, v)).astype(np.float32)
    ids = rng.integers(0, v, (b, t))
    return logits, ids


@pytest.mark.parametrize("env,expect", CASES)
def test_logprob_sites(monkeypatch, env, expect):
    _env(monkeypatch, env)
    rng = np.random.default_rng(0)
    logits, ids = _logits(rng)
    *a, cache = logps_entropy_forward(logits, ids, temperature=0.7)
    assert cache.backend == expect
    *b, _ = logps_entropy_forward(logits, ids, temperature=0.7, backend=expect)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    adv, mask = rng.standard_normal(4).astype(np.float32), np.ones(ids.shape, bool)
    la, da, _ = grpo_loss_from_logits(logits, ids, None, None, adv, mask, entropy_coef=0.01)
    lb, db, _ = grpo_loss_from_logits(logits, ids, None, None, adv, mask, entropy_coef=0.01, backend=expect)
    assert la == lb and np.array_equal(da, db)


def _moe(rng):
    cfg = ModelConfig.preset("deepseek-v2-lite").replace(hidden_size=32, moe_intermediate_size=256,
                                                          n_routed_experts=8, num_experts_per_tok=2,
                                                          n_shared_experts=1)
    params = init_moe_params(cfg, rng, dtype=np.float32, std=0.1)
    x = rng.standard_normal((160, cfg.hidden_size)).astype(np.float32)  # 320 copies x 256 > AUTO_MIN_WORK
    return cfg, params, x


@pytest.mark.parametrize("env,expect", CASES)
def test_swiglu_site_and_the_moe_layer_passing_its_backend_through(monkeypatch, env, expect):
    _env(monkeypatch, env)
    rng = np.random.default_rng(1)
    cfg, params, x = _moe(rng)
    idx = np.argsort(rng.random((x.shape[0], cfg.n_routed_experts)), axis=1)[:, :2]
    plan = make_plan(idx, cfg.n_routed_experts, backend="numpy")
    xs = x[plan.token]
    _, cache = experts_forward(xs, params["experts"], plan.offsets)
    assert (cache.act.sig is None) == (expect == "numba")               # no sig: the twin ran
    for requested in (None, "numpy", "numba"):
        _, mcache, _ = moe_forward(x, params, cfg, backend=requested)
        twin = mcache.experts.act.sig is None
        assert twin == ((requested or expect) == "numba"), requested
