"""Chunked fused LM head + generalized JSD: refimpl chunked (NumPy, Numba) vs unchunked NumPy vs torch.

(``distill/divergence-rows``, at the end, times only the row pass of the table's other divergences.)

The distillation step of a small student on a large vocabulary: N = 8192 positions (4 sequences of
2048), hidden size D = 1024, vocabulary V = 32768, float32, teacher given by its own hidden states
(D_T = 1024) and LM head, GKD's generalized JSD with beta = 0.5, temperature 1, ``batchmean`` over
the ~90% of positions whose label is not -100. Every variant returns the loss and the gradients with
respect to the student's hidden states and LM-head weight.

* ``refimpl-numpy`` / ``refimpl-numba``: :func:`refimpl.distill.fused_linear_jsd`, row chunks of
  ``CHUNK`` = 1024 rows (the per-chunk softmax/loss/gradient pass in NumPy or in the Numba twin; the GEMMs are
  NumPy's BLAS in both);
* ``refimpl-numpy-unchunked``: full (N, V) student and teacher logits, then
  :func:`refimpl.distill.generalized_jsd_loss`, then ``dh = dZ W`` and ``dW = dZ^T h``;
* ``torch``: the same unchunked computation written as TRL's ``GKDTrainer`` does (log-space mixture
  by ``torch.logsumexp``, ``F.kl_div(..., log_target=True)``), differentiated by autograd.

Four GEMMs of 2*N*V*D FLOPs each (student logits, teacher logits, dh, dW) dominate at full size, plus
~20 element-wise passes over N*V. The targets of issue 7: the chunked path's traced peak memory at
most 25% of the unchunked one's, its time at most 1.2x, and no slower than torch. ``python -m
benchmarks.bench_distill [--quick] [--repeats R]`` runs this case alone and prints those ratios.

The quick shape (N = 1024, D = 128, V = 4096, chunks of 256) is a smoke test, not the target: its
per-chunk GEMMs are small enough that, with two OpenBLAS threads on a busy machine, a GEMM can wait
a scheduler time slice for its partner thread, which dominates the chunked variants' time.
"""

from __future__ import annotations

import numpy as np

from refimpl import distill
from refimpl.backend import kernel

from .harness import NUMBA, NUMPY, TORCH, Case, assert_outputs_close, import_torch, numba_dispatchers, register

UNCHUNKED = "refimpl-numpy-unchunked"
CHUNK = 1024                                   # the default of fused_linear_jsd (quick: 256)
BETA = 0.5


def _data(quick: bool):
    n, d, v = (1024, 128, 4096) if quick else (8192, 1024, 32768)
    chunk = 256 if quick else CHUNK
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d), dtype=np.float32)                   # (N, D)
    w = rng.standard_normal((v, d), dtype=np.float32) * np.float32(2.0 / np.sqrt(d))  # logits ~ N(0, 4)
    th = rng.standard_normal((n, d), dtype=np.float32)                  # (N, D_T)
    tw = rng.standard_normal((v, d), dtype=np.float32) * np.float32(3.0 / np.sqrt(d))  # teacher peakier
    labels = rng.integers(0, v, size=n)                                 # (N,)
    labels[rng.random(n) < 0.1] = -100
    params = {"N": n, "D": d, "D_T": d, "V": v, "dtype": "float32", "beta": BETA, "temperature": 1.0,
              "reduction": "batchmean", "chunk_size": chunk, "masked": int((labels == -100).sum()),
              "logits_MiB": n * v * 4 / 2**20}
    return h, w, th, tw, labels, params


def _torch_gjsd(torch, zs, zt, labels, beta):
    F = torch.nn.functional
    lq, lp = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    b = torch.tensor(beta, dtype=zs.dtype)
    lm = torch.logsumexp(torch.stack([lq + torch.log(1 - b), lp + torch.log(b)]), dim=0)
    jsd = b * F.kl_div(lm, lp, reduction="none", log_target=True) + \
        (1 - b) * F.kl_div(lm, lq, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@register("distill/fused-linear-jsd")
def fused_linear_jsd(quick: bool) -> Case:
    h, w, th, tw, labels, params = _data(quick)
    n, d, chunk = *h.shape, params["chunk_size"]
    v = w.shape[0]
    case = Case(params=params, measure_memory=True, flops=4 * 2.0 * n * v * d,
                description="Student LM head + generalized JSD (beta 0.5) against a teacher LM head, "
                            "loss and gradients for hidden states and head weight. refimpl-numpy/numba "
                            f"run in row chunks of {chunk}; the unchunked variant holds the full logits.")
    teacher = dict(teacher_hidden=th, teacher_weight=tw, beta=BETA, chunk_size=chunk)
    case.add(NUMPY, lambda: distill.fused_linear_jsd(h, w, labels, backend="numpy", **teacher))
    case.add(NUMBA, lambda: distill.fused_linear_jsd(h, w, labels, backend="numba", **teacher),
             jit=numba_dispatchers(kernel("distill_nb")))

    def unchunked():
        zs = h @ w.T                                                    # (N, V)
        zt = th @ tw.T                                                  # (N, V)
        loss, dz = distill.generalized_jsd_loss(zs, zt, labels, beta=BETA)
        del zs, zt
        return loss, dz @ w, dz.T @ h
    case.add(UNCHUNKED, unchunked, kind="numpy")

    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        ht, wt = torch.from_numpy(h).requires_grad_(True), torch.from_numpy(w).requires_grad_(True)
        tht, twt, lt = torch.from_numpy(th), torch.from_numpy(tw), torch.from_numpy(labels)

        def torch_fn():
            with torch.no_grad():
                zt = tht @ twt.T
            loss = _torch_gjsd(torch, ht @ wt.T, zt, lt, BETA)
            dh, dw = torch.autograd.grad(loss, (ht, wt))
            return loss.detach(), dh, dw
        case.add(TORCH, torch_fn)

    def check(outputs):
        # float32 everywhere; the Numba twin works in float64, torch and NumPy in float32, and dW sums
        # N = 8192 rows in different orders (chunks vs one GEMM).
        assert_outputs_close(outputs, reference=NUMPY, rtol=1e-4, atol_scale=1e-5, labels=("loss", "dh", "dW"))

    case.check = check
    return case


#: The table entries besides the generalized JSD (which has the case above), with their options.
OTHER_DIVERGENCES = ("forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "total_variation")


@register("distill/divergence-rows")
def divergence_rows(quick: bool) -> Case:
    """Only the per-chunk row pass (softmaxes, loss, dlogits) of every other divergence, no GEMMs."""
    from refimpl.distill.divergences import divergence_options, get_divergence
    from refimpl.distill.fused import divergence_rows as numpy_rows
    n, v = (256, 4096) if quick else (1024, 32768)
    rng = np.random.default_rng(4)
    zs = 2.0 * rng.standard_normal((n, v), dtype=np.float32)            # (C, V) one chunk of logits
    zt = 3.0 * rng.standard_normal((n, v), dtype=np.float32)            # (C, V)
    valid = rng.random(n) > 0.1                                         # (C,)
    row_scale = (valid / valid.sum()).astype(np.float32)                # (C,)
    case = Case(params={"C": n, "V": v, "dtype": "float32", "divergences": ", ".join(OTHER_DIVERGENCES)},
                bytes_moved=len(OTHER_DIVERGENCES) * 3 * zs.nbytes,
                description="The fused head's per-chunk pass (two softmaxes, loss rows, dlogits) of forward KL, "
                            "reverse KL, skew KL, skew reverse KL and total variation, one after another.")
    entries = [(get_divergence(d), divergence_options(d)) for d in OTHER_DIVERGENCES]
    case.add(NUMPY, lambda: tuple(numpy_rows(zs, zt, valid, row_scale, e.terms, o, 1.0) for e, o in entries))
    case.add(NUMBA, lambda: tuple(e.kernel_rows(zs, zt, valid, row_scale, 1.0, **o) for e, o in entries),
             jit=numba_dispatchers(kernel("distill_nb")))
    case.skip(TORCH, "no torch counterpart of the row pass alone (the JSD case has the whole head)")
    def check(outs):
        for i, d in enumerate(OTHER_DIVERGENCES):
            # float32 per element on both sides (exp32/log32 vs NumPy's SIMD exp/log): as the JSD case.
            # Total variation's subgradient sign(q - p) q / 2 jumps by q where q and p agree to
            # rounding, and the two sides round q differently: at full size 4 of 33.5M elements
            # differed by up to 5e-4 of the largest entry, so its dz is compared at 1e-3 of the scale.
            atol = 1e-3 if d == "total_variation" else 1e-5
            assert_outputs_close({k: v[i] for k, v in outs.items()}, rtol=1e-4, atol_scale=atol,
                                 labels=(f"{d}.loss", f"{d}.dz"))
    case.check = check
    return case


def _main(argv=None):
    import argparse

    from . import harness
    p = argparse.ArgumentParser(description="Run the fused-linear-JSD case alone and print the issue's ratios.")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    res = harness.run_case("distill/fused-linear-jsd", fused_linear_jsd(args.quick), repeats=args.repeats)
    var = res["variants"]
    base = var[UNCHUNKED]
    for name, r in var.items():
        mem = r.get("peak_mem_bytes")
        print(f"{name:26s} best {r['best_s']:8.3f} s  ({r['best_s'] / base['best_s']:.2f}x unchunked)  peak "
              + (f"{mem / 2**20:9.1f} MiB ({mem / base['peak_mem_bytes']:.1%} of unchunked)" if mem else "n/m"))
    if TORCH in var:
        for name in (NUMPY, NUMBA):
            print(f"{name} vs torch: {var[TORCH]['best_s'] / var[name]['best_s']:.2f}x (> 1: refimpl faster)")
    return res


if __name__ == "__main__":
    _main()
