"""Fused softmax cross-entropy over a large vocabulary: refimpl-NumPy vs refimpl-Numba vs torch.

The shapes of an LM head's loss: N = 8192 positions (e.g. 4 sequences of 2048), V = 32768,
float32, mean reduction with about 10% of the targets set to ``ignore_index`` (prompt/padding).
torch runs ``F.cross_entropy`` (+ ``torch.autograd.grad`` for the backward) on the same buffers
(``torch.from_numpy`` shares memory). The work is elementwise exp and row reductions over N*V
logits -- memory- and exp-bound, not GEMM-bound, so no FLOP count is declared.
"""

from __future__ import annotations

import numpy as np

from refimpl.core import cross_entropy

from .harness import (
    NUMBA,
    NUMPY,
    TORCH,
    Case,
    assert_outputs_close,
    import_torch,
    numba_dispatchers,
    register,
)

IGNORE = -100


def _data(quick: bool):
    n, v = (512, 4096) if quick else (8192, 32768)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, v), dtype=np.float32)             # (N, V)
    logits *= 3.0                                                       # peakier than N(0, 1)
    targets = rng.integers(0, v, size=n, dtype=np.int64)                # (N,)
    targets[rng.random(n) < 0.1] = IGNORE
    params = {"N": n, "V": v, "dtype": "float32", "reduction": "mean",
              "ignored": int((targets == IGNORE).sum()), "logits_MiB": logits.nbytes / 2**20}
    return logits, targets, params


def _jit():
    from refimpl.backend import kernel
    return numba_dispatchers(kernel("cross_entropy_nb"))


def _case(quick: bool, backward: bool) -> Case:
    logits, targets, params = _data(quick)
    what = "forward + backward" if backward else "forward only"
    # least traffic: read the logits once (+ write dlogits once); the row's second read hits cache
    case = Case(params=params, measure_memory=True, bytes_moved=logits.nbytes * (2 if backward else 1),
                description=f"Fused softmax cross-entropy, {what}: loss = mean over non-ignored rows of "
                            "logsumexp(z) - z[target]" + ("; dlogits = (softmax(z) - onehot) / n_valid."
                                                          if backward else "."))
    one = np.float32(1.0)

    def refimpl(backend):
        if backward:
            def fn():                                       # numpy: forward then backward; numba: one sweep
                return cross_entropy(logits, targets, one, backend=backend)
        else:
            def fn():
                return (cross_entropy(logits, targets, backend=backend, grad=False)[0],)
        return fn

    case.add(NUMPY, refimpl("numpy"))
    case.add(NUMBA, refimpl("numba"), jit=_jit())
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        import torch.nn.functional as F
        zt = torch.from_numpy(logits)
        tt = torch.from_numpy(targets)
        if backward:
            zt = zt.requires_grad_(True)

            def torch_fn():
                loss = F.cross_entropy(zt, tt, ignore_index=IGNORE, reduction="mean")
                (dz,) = torch.autograd.grad(loss, zt)
                return loss.detach(), dz
        else:
            def torch_fn():
                with torch.no_grad():
                    return (F.cross_entropy(zt, tt, ignore_index=IGNORE, reduction="mean"),)
        case.add(TORCH, torch_fn)

    labels = ("loss", "dlogits") if backward else ("loss",)

    def check(outputs):
        # float32 on all sides; the Numba twin sums exp in float64. 2e-5 relative is the project's
        # "equiv32" tolerance; the absolute part is relative to max|reference|.
        assert_outputs_close(outputs, reference=NUMPY, rtol=2e-5, atol_scale=1e-6, labels=labels)

    case.check = check
    return case


@register("cross_entropy/fwd+bwd")
def ce_forward_backward(quick: bool) -> Case:
    return _case(quick, backward=True)


@register("cross_entropy/fwd")
def ce_forward(quick: bool) -> Case:
    return _case(quick, backward=False)
