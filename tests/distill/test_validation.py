"""Bad input to the distillation losses: a clear error naming the argument, or a documented result."""

import numpy as np
import pytest

from refimpl import distill as d

rng = np.random.default_rng(0)
S, T = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
LAB = np.array([[0, 1, -100], [2, 3, 4]])
H, W = rng.standard_normal((6, 4)), rng.standard_normal((5, 4))
TH, TW = rng.standard_normal((6, 3)), rng.standard_normal((5, 3))
LP, IDS = d.teacher_topk(T, 2)
NAN = S.copy()
NAN[0, 0, 0] = np.nan


def jsd(**kw):
    kw = {"teacher_hidden": TH, "teacher_weight": TW, **kw}
    return d.fused_linear_jsd(H, kw.pop("weight", W), **kw)


CASES = {
    "vocab mismatch": (lambda: d.generalized_jsd_loss(S, T[..., :4]), ValueError, "vocabulary"),
    "teacher shape": (lambda: d.generalized_jsd_loss(S, T[:1]), ValueError, "teacher_logits"),
    "teacher dtype": (lambda: d.forward_kl_loss(S, T.astype(np.float32)), TypeError, "teacher_logits"),
    "student nan": (lambda: d.reverse_kl_loss(NAN, T), ValueError, "student_logits"),
    "student 1-d": (lambda: d.forward_kl_loss(S[0, 0], T[0, 0]), ValueError, "student_logits"),
    "student int": (lambda: d.forward_kl_loss(S.astype(np.int64), T), TypeError, "student_logits"),
    "beta < 0": (lambda: d.generalized_jsd_loss(S, T, beta=-0.1), ValueError, "beta"),
    "beta > 1": (lambda: d.generalized_jsd_loss(S, T, beta=1.5), ValueError, "beta"),
    "beta nan": (lambda: d.generalized_jsd_loss(S, T, beta=float("nan")), ValueError, "beta"),
    "beta str": (lambda: d.generalized_jsd_loss(S, T, beta="0.5"), TypeError, "beta"),
    "alpha > 1": (lambda: d.skew_kl_loss(S, T, alpha=2.0), ValueError, "alpha"),
    "temperature 0": (lambda: d.generalized_jsd_loss(S, T, temperature=0.0), ValueError, "temperature"),
    "temperature < 0": (lambda: d.total_variation_loss(S, T, temperature=-1.0), ValueError, "temperature"),
    "temperature inf": (lambda: d.forward_kl_loss(S, T, temperature=float("inf")), ValueError, "temperature"),
    "reduction": (lambda: d.generalized_jsd_loss(S, T, reduction="avg"), ValueError, "reduction"),
    "num_items 0": (lambda: d.generalized_jsd_loss(S, T, num_items_in_batch=0), ValueError, "num_items_in_batch"),
    "fused num_items": (lambda: jsd(num_items_in_batch=-3), ValueError, "num_items_in_batch"),
    "labels shape": (lambda: d.generalized_jsd_loss(S, T, LAB[:1]), ValueError, "labels"),
    "labels float": (lambda: d.generalized_jsd_loss(S, T, LAB.astype(float)), TypeError, "labels"),
    "dloss shape none": (lambda: d.forward_kl_loss(S, T, reduction="none", dloss=np.ones(3)), ValueError, "dloss"),
    "dloss shape scalar": (lambda: d.forward_kl_loss(S, T, dloss=np.ones(3)), ValueError, "dloss"),
    "hinton needs labels": (lambda: d.hinton_kd_loss(S, T, alpha=0.5), ValueError, "labels"),
    "hinton label range": (lambda: d.hinton_kd_loss(S, T, LAB + 1), ValueError, "labels"),
    "seq kd label range": (lambda: d.sequence_kd_loss(S, np.full((2, 3), 5)), ValueError, "labels"),
    "topk k": (lambda: d.teacher_topk(T, 6), ValueError, "k"),
    "topk duplicate ids": (lambda: d.topk_kl_loss(S, LP, np.zeros_like(IDS)), ValueError, "teacher_topk_ids"),
    "topk id range": (lambda: d.topk_kl_loss(S, LP, IDS + 5), ValueError, "teacher_topk_ids"),
    "topk positive logprob": (lambda: d.topk_kl_loss(S, LP + 10, IDS), ValueError, "teacher_topk_logprobs"),
    "topk shape": (lambda: d.topk_kl_loss(S, LP[:1], IDS[:1]), ValueError, "teacher_topk_logprobs"),
    "fused vocab mismatch": (lambda: jsd(teacher_weight=TW[:4]), ValueError, "teacher_weight"),
    "fused teacher logits vocab": (lambda: d.fused_linear_jsd(H, W, teacher_logits=np.zeros((6, 4))), ValueError,
                                   "teacher_logits"),
    "fused both teachers": (lambda: jsd(teacher_logits=np.zeros((6, 5))), ValueError, "teacher"),
    "fused no teacher": (lambda: d.fused_linear_jsd(H, W), ValueError, "teacher"),
    "fused head shape": (lambda: jsd(weight=W[:, :3]), ValueError, "weight"),
    "fused none": (lambda: jsd(reduction="none"), ValueError, "reduction"),
    "fused beta": (lambda: jsd(beta=2.0), ValueError, "beta"),
    "fused temperature": (lambda: jsd(temperature=0), ValueError, "temperature"),
    "chunk 0": (lambda: jsd(chunk_size=0), ValueError, "chunk_size"),
    "chunk float": (lambda: jsd(chunk_size=2.5), TypeError, "chunk_size"),
    "chunk bool": (lambda: jsd(chunk_size=True), TypeError, "chunk_size"),
    "fused dloss": (lambda: jsd(dloss=np.ones(2)), ValueError, "dloss"),
    "backend": (lambda: jsd(backend="cuda"), ValueError, "backend"),
    "ce labels": (lambda: d.fused_linear_cross_entropy(H, W, None), ValueError, "labels"),
    "tokens range": (lambda: d.fused_linear_token_logps(H, W, np.full(6, 5)), ValueError, "tokens"),
    "loss_fn shape": (lambda: d.fused_linear_logprob_loss(H, W, np.zeros(6, np.int64), lambda lp: (0.0, lp[:3])),
                      ValueError, "loss_fn"),
    "loss_fn return": (lambda: d.fused_linear_logprob_loss(H, W, np.zeros(6, np.int64), lambda lp: 0.0),
                       TypeError, "loss_fn"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case):
    call, exc, name = CASES[case]
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_fused_all_masked_is_zero(backend):
    """Every position masked (documented): loss 0.0 and zero gradients, never NaN."""
    masked = np.full(6, -100)
    with np.errstate(all="raise"):
        for reduction in ("batchmean", "sum", "mean"):
            loss, dh, dw = jsd(labels=masked, reduction=reduction, backend=backend)
            assert float(loss) == 0.0 and not dh.any() and not dw.any()
        loss, dh, dw = d.fused_linear_cross_entropy(H, W, masked, backend=backend)
        assert float(loss) == 0.0 and not dh.any() and not dw.any()
