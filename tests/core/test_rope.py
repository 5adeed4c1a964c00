"""RoPE layout and YaRN constants (reference checks from DeepSeek-V2 §3.1.4 / V3 §4.3)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import ModelConfig, core
from refimpl.testing import strategies as rst
from refimpl.testing import tol

V3_YARN = ModelConfig.preset("deepseek-v3").rope_scaling
V2_YARN = ModelConfig.preset("deepseek-v2").rope_scaling


def test_yarn_correction_range_deepseek():
    assert core.yarn_correction_range(64, 10000.0, 4096, 32, 1) == (10, 23)


def test_yarn_ramp_table():
    ratio = core.rope_inv_freq(64, 10000.0, V3_YARN) / core.rope_inv_freq(64, 10000.0)
    i = np.arange(32)
    expected = np.where(i <= 10, 1.0, np.where(i >= 23, 1 / 40, 1 - (i - 10) / 13 * (1 - 1 / 40)))
    np.testing.assert_allclose(ratio, expected, rtol=1e-14)
    np.testing.assert_allclose(ratio[11:23], np.linspace(0.925, 0.1, 12), rtol=1e-12)


@pytest.mark.parametrize("scaling, expected", [(None, 0.0721688), (V2_YARN, 0.1147214), (V3_YARN, 0.1352338)])
def test_softmax_scale_constants(scaling, expected):
    assert core.softmax_scale(192, scaling) == pytest.approx(expected, abs=5e-8)


def test_mscale_values():
    assert core.yarn_mscale(40, 1.0) == pytest.approx(1.368888, abs=1e-6)
    assert core.yarn_mscale(40, 0.707) == pytest.approx(1.260804, abs=1e-6)
    assert core.yarn_mscale(1.0, 1.0) == 1.0
    # amplitude on cos/sin is 1 for every released config, m(s, 1) when a field is missing (HF 5.x)
    assert core.rope_attention_factor(V3_YARN) == 1.0 and core.rope_attention_factor(V2_YARN) == 1.0
    assert core.rope_attention_factor({"type": "yarn", "factor": 40}) == pytest.approx(math.log(40) / 10 + 1)
    assert core.rope_attention_factor(None) == 1.0


def _hf_rotate_half_rope(x, pos, inv_freq):
    """transformers' DeepSeek-V3 path: de-interleave, then rotate halves with cat(theta, theta)."""
    perm = core.deinterleave_perm(x.shape[-1])
    xp = x[..., perm]
    ang = pos[..., None] * np.concatenate([inv_freq, inv_freq])
    half = x.shape[-1] // 2
    rot = np.concatenate([-xp[..., half:], xp[..., :half]], axis=-1)
    return xp * np.cos(ang) + rot * np.sin(ang)


@given(rng=rst.seeds(), t=st.integers(1, 6), half=st.integers(1, 8), yarn=st.booleans())
def test_hf_layout_is_a_permutation_and_logits_agree(rng, t, half, yarn):
    d = 2 * half
    inv = core.rope_inv_freq(d, 10000.0, V3_YARN if yarn and d >= 4 else None)
    q, k = rng.standard_normal((t, d)), rng.standard_normal((t, d))
    pos = np.arange(t)
    yq, _ = core.rope_forward(q, pos, inv)
    yk, _ = core.rope_forward(k, pos, inv)
    hq, hk = _hf_rotate_half_rope(q, pos, inv), _hf_rotate_half_rope(k, pos, inv)
    perm = core.deinterleave_perm(d)
    np.testing.assert_allclose(hq, yq[..., perm], **tol("equiv64"))
    np.testing.assert_allclose(hq @ hk.T, yq @ yk.T, **tol("equiv64"))


def test_plain_rotate_half_without_deinterleave_differs(rng):
    """The trap of reference §2.3: rotate-half on the raw (interleaved) weights is a different map."""
    x = rng.standard_normal((4, 8))
    pos = np.arange(4)
    inv = core.rope_inv_freq(8)
    ang = pos[:, None] * np.concatenate([inv, inv])
    plain = x * np.cos(ang) + np.concatenate([-x[:, 4:], x[:, :4]], axis=1) * np.sin(ang)
    y, _ = core.rope_forward(x, pos, inv)
    assert np.abs(plain @ plain.T - y @ y.T).max() > 1e-3


@given(rng=rst.seeds(), t=st.integers(2, 6), half=st.integers(1, 6), shift=st.integers(1, 1000),
       yarn=st.booleans())
def test_relative_position(rng, t, half, shift, yarn):
    """q_i . k_j depends only on i - j: shifting every position leaves all logits unchanged."""
    inv = core.rope_inv_freq(2 * half, 10000.0, V3_YARN if yarn else None)
    q, k = rng.standard_normal((t, 2 * half)), rng.standard_normal((t, 2 * half))
    pos = np.arange(t)
    a = core.rope_forward(q, pos, inv)[0] @ core.rope_forward(k, pos, inv)[0].T
    b = core.rope_forward(q, pos + shift, inv)[0] @ core.rope_forward(k, pos + shift, inv)[0].T
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_rotation_preserves_norm_and_position_zero_is_identity(rng):
    x = rng.standard_normal((5, 6))
    y, _ = core.rope_forward(x, np.arange(5), core.rope_inv_freq(6))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    np.testing.assert_array_equal(y[0], x[0])


def test_bad_inputs():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="dim"):
        core.rope_inv_freq(5)
    with pytest.raises(ValueError, match="inv_freq"):
        core.rope_forward(x, np.arange(3), core.rope_inv_freq(6))
    with pytest.raises(ValueError, match="positions"):
        core.rope_forward(x, np.arange(4), core.rope_inv_freq(4))
    with pytest.raises(ValueError, match="positions"):
        core.rope_forward(x, np.array([0, -1, 2]), core.rope_inv_freq(4))
    with pytest.raises(TypeError, match="positions"):
        core.rope_forward(x, np.array([0.0, 1.0, 2.0]), core.rope_inv_freq(4))
    with pytest.raises(ValueError, match="rope_scaling"):
        core.rope_inv_freq(4, rope_scaling={"type": "dynamic", "factor": 2})
    with pytest.raises(TypeError, match="x"):
        core.rope_forward(x.astype(np.float16), np.arange(3), core.rope_inv_freq(4))
