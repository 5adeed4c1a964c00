"""Hypothesis strategies for refimpl's inputs, public so other projects' tests can reuse them.

Example, in a user's test suite::

    from hypothesis import given
    from refimpl.testing import strategies as rst

    @given(rst.float_arrays(shape=rst.shapes(min_dims=2)))
    def test_my_rmsnorm(x): ...

    @given(rst.model_configs())
    def test_my_mla_matches_refimpl(cfg): ...
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ..config import ModelConfig


def shapes(min_dims=1, max_dims=3, min_side=1, max_side=6):
    """Array shapes with small sides (hypothesis.extra.numpy.array_shapes)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def float_arrays(shape, dtype=np.float64, min_value=-3.0, max_value=3.0):
    """Finite float arrays of ``shape`` (a tuple or a strategy) with values in [min_value, max_value]."""
    width = 32 if np.dtype(dtype) == np.float32 else 64
    elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=width)
    return hnp.arrays(dtype, shape, elements=elements)


@st.composite
def seeds(draw):
    """A seeded ``numpy.random.Generator``; hypothesis shrinks the seed, not the array entries."""
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@st.composite
def logits_and_targets(draw, max_rows=8, max_vocab=16, dtype=np.float64, scale=None, ignore_index=-100):
    """(logits (N, V), targets (N,)) with some targets set to ``ignore_index``.

    ``scale`` multiplies standard-normal logits; by default it is drawn from {1, 30, 1e4} so that
    extreme logits (``|z| ~ 1e4``) are exercised.
    """
    n = draw(st.integers(1, max_rows))
    v = draw(st.integers(2, max_vocab))
    rng = draw(seeds())
    s = draw(st.sampled_from([1.0, 30.0, 1e4])) if scale is None else scale
    logits = (s * rng.standard_normal((n, v))).astype(dtype)
    targets = rng.integers(0, v, size=n)
    ignored = rng.random(n) < draw(st.sampled_from([0.0, 0.3]))
    targets = np.where(ignored, ignore_index, targets).astype(np.int64)
    return logits, targets


@st.composite
def model_configs(draw, moe=None, q_lora=None, yarn=None):
    """Small, consistent DeepSeek-style :class:`~refimpl.config.ModelConfig` objects.

    ``moe``, ``q_lora`` and ``yarn`` force a feature on (True) or off (False); None draws it.
    """
    heads = draw(st.integers(1, 4))
    rope = draw(st.sampled_from([2, 4, 8]))
    nope = draw(st.sampled_from([0, 4, 8]))
    use_moe = draw(st.booleans()) if moe is None else moe
    use_q = draw(st.booleans()) if q_lora is None else q_lora
    use_yarn = draw(st.booleans()) if yarn is None else yarn
    fields = dict(
        vocab_size=draw(st.integers(8, 48)), hidden_size=draw(st.sampled_from([8, 16, 24])),
        intermediate_size=draw(st.sampled_from([8, 16, 32])), num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads, num_key_value_heads=heads, kv_lora_rank=draw(st.sampled_from([4, 8, 12])),
        q_lora_rank=draw(st.sampled_from([4, 8])) if use_q else None, qk_rope_head_dim=rope,
        qk_nope_head_dim=nope, v_head_dim=draw(st.sampled_from([4, 8])), max_position_embeddings=64,
        initializer_range=0.1,
    )
    if use_yarn:
        fields["rope_scaling"] = {"type": "yarn", "factor": draw(st.sampled_from([2.0, 4.0, 40.0])),
                                  "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                  "mscale": 1.0, "mscale_all_dim": draw(st.sampled_from([0.707, 1.0]))}
    if use_moe:
        n_group = draw(st.sampled_from([1, 2, 4]))
        per_group = draw(st.sampled_from([2, 3]))
        e = n_group * per_group
        topk_group = draw(st.integers(1, n_group))
        method = draw(st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"]))
        fields.update(
            n_routed_experts=e, n_shared_experts=draw(st.integers(0, 2)), n_group=n_group, topk_group=topk_group,
            num_experts_per_tok=draw(st.integers(1, topk_group * per_group)), topk_method=method,
            scoring_func="sigmoid" if method == "noaux_tc" else "softmax",
            norm_topk_prob=method == "noaux_tc", moe_intermediate_size=draw(st.sampled_from([4, 8])),
            routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
            first_k_dense_replace=draw(st.integers(0, 1)))
    else:
        fields.update(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1,
                      num_experts_per_tok=1)
    return ModelConfig(**fields).validate()
