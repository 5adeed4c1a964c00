"""Shared strategies and wrappers for the distillation tests."""

from __future__ import annotations

from hypothesis import strategies as st

from refimpl import distill as d
from refimpl.config import ModelConfig
from refimpl.recipes.distill import dense_student_config
from refimpl.tasks import TOKENIZER
from refimpl.testing import strategies as rst

# name -> (function, extra keyword options drawn per test); every one has the signature
# f(student_logits, teacher_logits, labels, *, temperature, reduction, dloss, **options)
PAIR_LOSSES = {
    "forward_kl": (d.forward_kl_loss, lambda draw: {}),
    "reverse_kl": (d.reverse_kl_loss, lambda draw: {}),
    "gjsd": (d.generalized_jsd_loss, lambda draw: {"beta": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))}),
    "skew_kl": (d.skew_kl_loss, lambda draw: {"alpha": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))}),
    "skew_reverse_kl": (d.skew_reverse_kl_loss, lambda draw: {"alpha": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))}),
    "total_variation": (d.total_variation_loss, lambda draw: {}),
    "hinton": (d.hinton_kd_loss, lambda draw: {"alpha": draw(st.sampled_from([0.0, 0.3, 1.0])),
                                               "scale_by_t2": draw(st.booleans())}),
}


@st.composite
def pair_inputs(draw, max_lead=3, max_side=4, max_vocab=7, scales=(0.5, 1.0, 3.0), masked=True):
    """(student, teacher, labels or None) with a leading shape of 1-2 axes, labels in [0, V) or -100."""
    rng = draw(rst.seeds())
    lead = tuple(draw(st.lists(st.integers(1, max_side), min_size=1, max_size=max_lead - 1)))
    v = draw(st.integers(2, max_vocab))
    scale = draw(st.sampled_from(scales))
    s = scale * rng.standard_normal((*lead, v))
    t = scale * rng.standard_normal((*lead, v))
    labels = None
    if draw(st.booleans()):
        labels = rng.integers(0, v, size=lead)
        if masked:
            labels[rng.random(lead) < 0.3] = -100
    return s, t, labels


def loss_f(fn, t, labels, **kw):
    """check_grad-style wrapper: f(student) -> (loss, vjp) with vjp(dloss) = (dstudent,)."""
    def f(s):
        loss, _ = fn(s, t, labels, **kw)
        return loss, lambda dy: (fn(s, t, labels, dloss=dy, **kw)[1],)
    return f


def unchunked_jsd(h, w, teacher, labels, **kw):
    """The unchunked computation the fused JSD must reproduce: full logits, loss, then dh, dW."""
    z = h @ w.T                                                         # (..., V)
    loss, dz = d.generalized_jsd_loss(z, teacher, labels, **kw)
    dz2 = dz.reshape(-1, w.shape[0])
    return loss, (dz2 @ w).reshape(h.shape), dz2.T @ h.reshape(-1, h.shape[-1])


def teacher_config():
    """A tiny MoE + MLA teacher (dense layer, then a V3-routed MoE layer) with the char tokenizer's vocabulary."""
    return ModelConfig.preset("tiny").replace(
        vocab_size=TOKENIZER.vocab_size, hidden_size=8, intermediate_size=8, moe_intermediate_size=4,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=4, kv_lora_rank=4,
        qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_group=2, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=64,
        initializer_range=0.3)


def student_config():
    """A tiny dense (Llama-style) student with the same vocabulary."""
    return dense_student_config(hidden_size=8, intermediate_size=12, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, initializer_range=0.3)
