"""GRPO loss + gradient into the logits: refimpl (NumPy) vs the same formula in torch autograd.

The policy-gradient step of a GRPO trainer on a large vocabulary: B = 64 completions of T = 512
tokens over V = 32768 logits (float32, 4 GiB), ~15% of the positions masked (padding), off-policy
log-ratios within ±0.3 (so some tokens are clipped), k3 KL to a reference with β = 0.04, DAPO's
token-level normaliser and clip-higher (ε 0.2 / 0.28). Both variants return the loss and the
(B, T, V) gradient with respect to the logits, and compute the per-token entropy for logging.

* ``refimpl-numpy``: :func:`refimpl.rl.grpo_loss_from_logits` — log-probs and entropies gathered
  row-chunk by row-chunk (no (B, T, V) temporaries besides the gradient), the loss and its gradient
  with respect to the log-probs in closed form, and the chunked log-softmax backward.
* ``refimpl-numba``: the same call with ``backend="numba"``: the log-prob/entropy pass and its
  backward run as the twin :mod:`refimpl.kernels.logprobs_nb` (one read of each row for the forward,
  one sweep per row writing the gradient, rows in parallel); the loss in between is the same NumPy.
* ``torch``: TRL's way — ``logsumexp`` per row and ``gather`` for the log-probs, the clipped
  surrogate and k3 written with tensor ops, ``torch.autograd.grad`` for the gradient, in
  micro-batches of ``MICRO`` = 8 sequences with the whole batch's token count as the DAPO
  normaliser (TRL's ``num_items_in_batch``), so the micro-batch gradients are exactly the batch
  gradient; the entropy under ``no_grad`` in row chunks (as TRL's ``entropy_from_logits``).

The work is exp-bound passes over N*V; the NumPy path already avoids the extra (B, T, V) tensors
autograd keeps, and the twin also drops NumPy's separate validation pass and the (chunk, V)
temporaries' traffic. The targets of issues 6 and 17: refimpl no slower than torch.
Memory at full size: the logits (4 GiB, shared) and one 4 GiB gradient per call, plus torch's
per-micro-batch temporaries (~1.5 GiB); one whole-batch autograd pass would add two more 4 GiB
tensors (the gathered one-hot scatter and the softmax of ``logsumexp``'s backward) and was
killed for lack of memory on the 23 GiB development machine. Each variant returns
only a slice of its gradient (the first and last sequence) plus the loss, so that the first-call
outputs kept for the check do not hold two more 4 GiB arrays. ``python -m benchmarks.bench_grpo
[--quick] [--repeats R]`` runs this case alone and prints the ratio.
"""

from __future__ import annotations

import numpy as np

from refimpl.rl import group_advantages, grpo_loss_from_logits, logps_entropy_forward

from .harness import NUMBA, NUMPY, TORCH, Case, assert_outputs_close, import_torch, numba_dispatchers, register

OPTS = dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04, kl_estimator="k3")
MICRO = 8                                      # torch: sequences per autograd pass


def _data(quick: bool):
    b, t, v = (8, 128, 4096) if quick else (64, 512, 32768)
    G = 8
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((b, t, v), dtype=np.float32)          # (B, T, V)
    logits *= 2.0
    ids = rng.integers(0, v, size=(b, t), dtype=np.int64)               # (B, T)
    lengths = rng.integers(t // 2, t + 1, size=b)                       # (B,)
    mask = np.arange(t)[None, :] < lengths[:, None]                     # (B, T)
    logps, _, _ = logps_entropy_forward(logits, ids)                    # (B, T)
    old = (logps + rng.uniform(-0.3, 0.3, logps.shape)).astype(np.float32)  # (B, T)
    ref = (logps + rng.uniform(-0.5, 0.5, logps.shape)).astype(np.float32)  # (B, T)
    rewards = rng.integers(0, 2, size=b).astype(np.float64)             # (B,)
    adv, _ = group_advantages(rewards, G)                               # (B,)
    params = {"B": b, "T": t, "V": v, "G": G, "dtype": "float32", "masked": int((~mask).sum()),
              "logits_MiB": logits.nbytes / 2**20, **OPTS}
    return logits, ids, old, ref, adv.astype(np.float32), mask, params


def _torch_loss(torch, z, ids, old, ref, adv, mask, n_items, *, epsilon, epsilon_high, beta):
    """DAPO loss of a micro-batch of sequences, divided by the whole batch's active tokens ``n_items``."""
    logp = z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)  # (b, T)
    ratio = torch.exp(logp - old)
    A = adv[:, None]
    pg = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    x = ref - logp
    kl = torch.exp(x) - x - 1
    return ((pg + beta * kl) * mask.to(z.dtype)).sum() / n_items


def _torch_entropy(torch, z, chunk=32):
    out = []
    with torch.no_grad():
        for c in z.reshape(-1, z.shape[-1]).split(chunk):
            lp = torch.log_softmax(c, dim=-1)
            out.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(out).reshape(z.shape[:-1])


def _keep(dz):
    """The first and last sequence of the gradient (copied, so the full gradient is freed)."""
    return np.concatenate([np.asarray(dz[:1]), np.asarray(dz[-1:])]).copy()


def _jit():
    from refimpl.backend import kernel
    return numba_dispatchers(kernel("logprobs_nb"))


@register("grpo/loss+grad")
def grpo_loss_grad(quick: bool) -> Case:
    logits, ids, old, ref, adv, mask, params = _data(quick)
    case = Case(params=params, measure_memory=quick,
                description="GRPO (DAPO loss, clip-higher, k3 KL with beta 0.04) loss and gradient with respect "
                            "to (B, T, V) logits, per-token entropy included; refimpl's closed-form gradient vs "
                            "torch autograd of the same formula.")
    if not quick:
        case.notes.append("peak memory not traced at full size (tracemalloc over 8 GiB of allocations is slow)")

    def refimpl(backend):
        def fn():
            loss, dz, info = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, backend=backend, **OPTS)
            return np.asarray(loss), _keep(dz)
        return fn
    case.add(NUMPY, refimpl("numpy"))
    case.add(NUMBA, refimpl("numba"), jit=_jit())

    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
    else:
        zt = torch.from_numpy(logits)
        it, ot, rt = torch.from_numpy(ids), torch.from_numpy(old), torch.from_numpy(ref)
        at, mt = torch.from_numpy(adv), torch.from_numpy(mask)
        eps = dict(epsilon=OPTS["epsilon"], epsilon_high=OPTS["epsilon_high"], beta=OPTS["beta"])
        n_items = float(max(mask.sum(), 1))

        def torch_fn():
            # micro-batches of MICRO sequences with the global token count as the normaliser (TRL's
            # num_items_in_batch): the gradient of the whole batch, without autograd holding
            # three (B, T, V) tensors at once (4 GiB each at full size)
            dz = torch.empty_like(zt)
            loss = torch.zeros(())
            for a in range(0, zt.shape[0], MICRO):
                z = zt[a:a + MICRO].detach().requires_grad_(True)
                part = _torch_loss(torch, z, it[a:a + MICRO], ot[a:a + MICRO], rt[a:a + MICRO], at[a:a + MICRO],
                                   mt[a:a + MICRO], n_items, **eps)
                (dz[a:a + MICRO],) = torch.autograd.grad(part, z)
                loss += part.detach()
            _torch_entropy(torch, zt)
            return loss.numpy(), _keep(dz.numpy())
        case.add(TORCH, torch_fn)

    def check(outputs):
        # float32 on both sides; the loss sums ~B*T terms in different orders.
        assert_outputs_close(outputs, reference=NUMPY, rtol=1e-4, atol_scale=1e-5, labels=("loss", "dlogits"))

    case.check = check
    return case


def _main(argv=None):
    import argparse

    from . import harness
    p = argparse.ArgumentParser(description="Run the GRPO loss+gradient case alone and print the ratio.")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    res = harness.run_case("grpo/loss+grad", grpo_loss_grad(args.quick), repeats=args.repeats)
    var = res["variants"]
    for name, r in var.items():
        print(f"{name:16s} best {r['best_s']:8.3f} s  median {r['median_s']:8.3f} s  "
              f"user CPU/call {r.get('user_s_per_call', float('nan')):.3f} s")
    for name in (NUMPY, NUMBA):
        if TORCH in var and name in var:
            print(f"{name} vs torch: {var[TORCH]['best_s'] / var[name]['best_s']:.2f}x (> 1: refimpl faster)")
    if NUMBA in var:
        print(f"numba vs numpy: {var[NUMPY]['best_s'] / var[NUMBA]['best_s']:.2f}x")
    return res


if __name__ == "__main__":
    _main()
