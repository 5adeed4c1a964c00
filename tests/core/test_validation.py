"""Bad input gets a clear error naming the argument (wrong shape, wrong dtype, NaN)."""

import numpy as np
import pytest

from refimpl import core

F = np.ones((2, 3))
NAN = np.array([[1.0, np.nan, 0.0], [0, 0, 0]])
W = np.ones((4, 3))
V = np.ones(3)

# (call, exception, argument name expected in the message)
CASES = {
    "linear shape": (lambda: core.linear_forward(F, np.ones((4, 2))), ValueError, "w"),
    "linear dtype": (lambda: core.linear_forward(F.astype(np.int64), W), TypeError, "x"),
    "linear mixed dtype": (lambda: core.linear_forward(F, W.astype(np.float32)), TypeError, "w"),
    "linear nan": (lambda: core.linear_forward(NAN, W), ValueError, "x"),
    "linear bias shape": (lambda: core.linear_forward(F, W, np.ones(3)), ValueError, "b"),
    "linear list": (lambda: core.linear_forward([[1.0]], W), TypeError, "x"),
    "embedding range": (lambda: core.embedding_forward(np.array([0, 5]), W), ValueError, "ids"),
    "embedding negative": (lambda: core.embedding_forward(np.array([-1]), W), ValueError, "ids"),
    "embedding float ids": (lambda: core.embedding_forward(np.array([0.0]), W), TypeError, "ids"),
    "embedding nan": (lambda: core.embedding_forward(np.array([0]), W * np.nan), ValueError, "w"),
    "rmsnorm shape": (lambda: core.rmsnorm_forward(F, np.ones(2)), ValueError, "w"),
    "rmsnorm dtype": (lambda: core.rmsnorm_forward(F.astype(np.float16), V), TypeError, "x"),
    "rmsnorm nan": (lambda: core.rmsnorm_forward(NAN, V), ValueError, "x"),
    "rmsnorm eps": (lambda: core.rmsnorm_forward(F, V, eps=0.0), ValueError, "eps"),
    "silu nan": (lambda: core.silu_forward(NAN), ValueError, "x"),
    "swiglu shape": (lambda: core.swiglu_forward(F, np.ones((3, 2))), ValueError, "up"),
    "swiglu dtype": (lambda: core.swiglu_forward(F, F.astype(np.float32)), TypeError, "up"),
    "swiglu nan": (lambda: core.swiglu_forward(NAN, F), ValueError, "gate"),
    "mlp missing": (lambda: core.swiglu_mlp_forward(F, {"gate_proj": W, "up_proj": W}), ValueError, "down_proj"),
    "softmax nan": (lambda: core.softmax_forward(NAN), ValueError, "x"),
    "softmax +inf": (lambda: core.softmax_forward(np.array([1.0, np.inf, 0.0])), ValueError, "x"),
    "logsumexp +inf": (lambda: core.logsumexp_forward(np.array([np.inf, 0.0])), ValueError, "x"),
    "log_softmax dtype": (lambda: core.log_softmax_forward(F.astype(np.int32)), TypeError, "x"),
    "logsumexp nan": (lambda: core.logsumexp_forward(NAN), ValueError, "x"),
    "ce targets shape": (lambda: core.cross_entropy(F, np.array([0, 1, 2])), ValueError, "targets"),
    "ce targets range": (lambda: core.cross_entropy(F, np.array([0, 3])), ValueError, "targets"),
    "ce targets dtype": (lambda: core.cross_entropy(F, np.array([0.0, 1.0])), TypeError, "targets"),
    "ce nan": (lambda: core.cross_entropy(NAN, np.array([0, 1])), ValueError, "logits"),
    "ce inf": (lambda: core.cross_entropy(F * np.inf, np.array([0, 1])), ValueError, "logits"),
    "ce reduction": (lambda: core.cross_entropy(F, np.array([0, 1]), reduction="avg"), ValueError,
                     "reduction"),
    "ce backend": (lambda: core.cross_entropy(F, np.array([0, 1]), backend="cuda"), ValueError, "backend"),
    "ce dloss": (lambda: core.cross_entropy(F, np.array([0, 1]), np.nan), ValueError, "dloss"),
    "ce dloss shape": (lambda: core.cross_entropy(F, np.array([0, 1]), np.ones(2), reduction="sum"), ValueError,
                       "dloss"),
    "rope nan": (lambda: core.rope_forward(np.full((2, 4), np.nan), np.arange(2), core.rope_inv_freq(4)),
                 ValueError, "x"),
    "softmax_scale": (lambda: core.softmax_scale(0), ValueError, "qk_head_dim"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_names_the_argument(name):
    call, exc, arg = CASES[name]
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(f"{arg}:") or f"'{arg}'" in str(info.value), str(info.value)


def test_env_backend_is_validated(monkeypatch):
    from refimpl.backend import resolve_backend
    monkeypatch.setenv("REFIMPL_BACKEND", "gpu")
    with pytest.raises(ValueError, match="REFIMPL_BACKEND"):
        resolve_backend()
    monkeypatch.setenv("REFIMPL_BACKEND", "numpy")
    assert resolve_backend() == "numpy" and resolve_backend("numba") == "numba"


def test_auto_backend_uses_numpy_for_small_work(monkeypatch):
    from refimpl.backend import AUTO_MIN_WORK, numba_available, resolve_backend
    monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    assert resolve_backend("auto", work=AUTO_MIN_WORK - 1) == "numpy"
    assert resolve_backend("auto", work=AUTO_MIN_WORK) == ("numba" if numba_available() else "numpy")
    assert resolve_backend("numba", work=1) == "numba"
