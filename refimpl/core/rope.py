"""Rotary position embedding (RoPE) in DeepSeek's layout, with YaRN context extension.

RoPE (Su et al. 2021) encodes a token's position by rotating pairs of query/key channels by an
angle proportional to the position, so a query-key dot product depends only on their distance.
In MLA only the decoupled ``qk_rope_head_dim`` channels rotate (DeepSeek-V2 §2.1.3). DeepSeek's
released weights expect **adjacent** pairs ``(x[2i], x[2i+1])`` to rotate together (the official
inference code's complex multiply); HF transformers reaches the same logits by de-interleaving
first and rotating halves, which permutes the rotated vector (:func:`deinterleave_perm`).

YaRN (Peng et al. 2023) extends the context by slowing the low frequencies (long wavelengths) by
``factor`` while keeping the high ones, with a linear ramp between two correction dimensions, and
sharpens attention by a softmax-scale factor :math:`m^2` with :math:`m = 0.1\\mu\\ln s + 1`
(DeepSeek-V2 §3.1.4, DeepSeek-V3 §4.3: s = 40, α = 1, β = 32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .._validate import check_bool, check_float, check_int, check_integer, check_real, check_upstream

#: ``rope_scaling`` types refimpl implements: YaRN (DeepSeek-V2/V3), Llama 3.1's ``llama3`` (the
#: R1-Distill-Llama students) and position interpolation ``linear`` (Chen et al. 2023).
SCALED_ROPE_TYPES = ("yarn", "llama3", "linear")


def _rope_type(rope_scaling):
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling: expected a dict or None, got {type(rope_scaling).__name__}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SCALED_ROPE_TYPES:
        raise ValueError(f"rope_scaling: only {SCALED_ROPE_TYPES} (or 'default') are supported, got type {kind!r}")
    if not isinstance(rope_scaling.get("factor", 0), int | float) or not rope_scaling.get("factor", 0) >= 1:
        raise ValueError(f"rope_scaling: 'factor' must be >= 1, got {rope_scaling.get('factor')!r}")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not isinstance(rope_scaling.get(key), int | float) or not rope_scaling[key] > 0:
                raise ValueError(f"rope_scaling: llama3 needs a positive '{key}', got {rope_scaling.get(key)!r}")
        if not rope_scaling["high_freq_factor"] > rope_scaling["low_freq_factor"]:
            raise ValueError("rope_scaling: llama3 needs high_freq_factor > low_freq_factor, got "
                             f"{rope_scaling['high_freq_factor']!r} <= {rope_scaling['low_freq_factor']!r}")
    return kind


def rope_type(rope_scaling):
    """The RoPE scaling kind of a ``rope_scaling`` dict: None (plain RoPE) or one of
    :data:`SCALED_ROPE_TYPES`; ``ValueError`` for an unsupported or incomplete one."""
    return _rope_type(rope_scaling)


def llama3_inv_freq(theta, rope_scaling):
    r"""Llama 3.1's frequency correction (transformers' ``rope_type="llama3"``; Meta's Llama 3.1 code).

    With wavelengths :math:`\lambda_i = 2\pi/	heta_i`, :math:`L_0` = ``original_max_position_embeddings``,
    :math:`\lambda_{hi} = L_0/	ext{high\_freq\_factor}`, :math:`\lambda_{lo} = L_0/	ext{low\_freq\_factor}`:
    :math:`	heta'_i = 	heta_i` if :math:`\lambda_i < \lambda_{hi}`, :math:`	heta_i/s` if
    :math:`\lambda_i > \lambda_{lo}`, else :math:`(1-r)	heta_i/s + r	heta_i` with
    :math:`r = (L_0/\lambda_i - 	ext{low})/(	ext{high} - 	ext{low})`. A constant of the config, so
    no gradient flows through it.

    Shapes: theta (Dr/2,) -> (Dr/2,).
    """
    s = float(rope_scaling["factor"])
    low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
    l0 = float(rope_scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / theta                                       # (Dr/2,)
    r = (l0 / wavelen - low) / (high - low)                             # (Dr/2,)
    mid = (1 - r) * theta / s + r * theta                               # (Dr/2,)
    out = np.where(wavelen > l0 / low, theta / s, theta)                # (Dr/2,)
    between = (wavelen >= l0 / high) & (wavelen <= l0 / low)
    return np.where(between, mid, out)                                  # (Dr/2,)


def check_rope_scaling(rope_scaling):
    """Validate a ``rope_scaling`` dict (None, ``default`` or a scaled type); return its type.

    Every YaRN field refimpl reads is checked, so a bad value fails here, naming the key, and not
    later as a ZeroDivisionError or a NaN frequency.
    """
    kind = rope_type(rope_scaling)
    if kind is None:
        return None
    check_real("rope_scaling['factor']", rope_scaling["factor"], low=1.0)
    for key in ("beta_fast", "beta_slow"):
        if key in rope_scaling:
            check_real(f"rope_scaling[{key!r}]", rope_scaling[key], low=0.0, low_open=True)
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        if rope_scaling.get(key) is not None:
            check_real(f"rope_scaling[{key!r}]", rope_scaling[key], low=0.0)
    if "original_max_position_embeddings" in rope_scaling:
        check_integer("rope_scaling['original_max_position_embeddings']",
                      rope_scaling["original_max_position_embeddings"], low=1)
    if "truncate" in rope_scaling:
        check_bool("rope_scaling['truncate']", rope_scaling["truncate"])
    return kind


def yarn_mscale(factor, mscale=1.0):
    r"""YaRN's attention-temperature term :math:`m = 0.1\,\mu \ln s + 1` (1 if :math:`s \le 1`)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(dim, base, original_max_position_embeddings, beta_fast=32.0, beta_slow=1.0,
                          truncate=True):
    r"""Pair indices (low, high) between which YaRN ramps from "keep" to "interpolate".

    .. math:: d(r) = \frac{\text{dim}\,\ln(L / 2\pi r)}{2 \ln \text{base}},\quad
              \text{low} = \lfloor d(\beta_\text{fast}) \rfloor,\ \text{high} = \lceil d(\beta_\text{slow}) \rceil

    clipped to [0, dim-1] (YaRN, Peng et al. 2023, §3.2; DeepSeek-V3 inference code). For
    DeepSeek-V2/V3 (dim 64, base 1e4, L 4096, β 32/1): low = 10, high = 23.
    """
    def d(r):
        return dim * math.log(original_max_position_embeddings / (2 * math.pi * r)) / (2 * math.log(base))

    low, high = d(beta_fast), d(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(dim, base=10000.0, rope_scaling=None):
    r"""Per-pair inverse frequencies :math:`\theta_i = \text{base}^{-2i/\text{dim}}`, scaled
    (YaRN, llama3 or linear).

    With YaRN, :math:`\theta'_i = \theta_i (1 - r_i) + (\theta_i / s)\, r_i` with the ramp
    :math:`r_i = \mathrm{clip}((i - \text{low}) / (\text{high} - \text{low}), 0, 1)`. ``factor`` is
    used as given (transformers 5.x; DeepSeek's code applies YaRN only when its ``max_seq_len``
    exceeds the original context, which refimpl leaves to the caller).

    Shapes: -> inv_freq (dim/2,) float64.
    """
    if not (isinstance(dim, int | np.integer) and dim > 0 and dim % 2 == 0):
        raise ValueError(f"dim: expected a positive even integer, got {dim!r}")
    check_real("base", base, low=1.0, low_open=True)
    i = np.arange(dim // 2, dtype=np.float64)                           # (dim/2,)
    theta = base ** (-2.0 * i / dim)                                    # (dim/2,)
    kind = _rope_type(rope_scaling)
    if kind is None:
        return theta
    if kind == "linear":
        return theta / float(rope_scaling["factor"])                    # (dim/2,)
    if kind == "llama3":
        return llama3_inv_freq(theta, rope_scaling)                     # (dim/2,)
    s = float(rope_scaling["factor"])
    low, high = yarn_correction_range(
        dim, base, rope_scaling.get("original_max_position_embeddings", 4096),
        rope_scaling.get("beta_fast", 32.0), rope_scaling.get("beta_slow", 1.0),
        rope_scaling.get("truncate", True))
    if low == high:
        high += 0.001
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)                  # (dim/2,)
    return theta * (1.0 - ramp) + (theta / s) * ramp                    # (dim/2,)


def rope_attention_factor(rope_scaling):
    r"""Amplitude applied to cos/sin, as transformers computes it for YaRN.

    :math:`m(s, \text{mscale}) / m(s, \text{mscale\_all\_dim})`, which is 1 for every released
    DeepSeek config. If either field is missing transformers uses :math:`m(s, 1)` instead (a
    different function from DeepSeek's own code, which never scales cos/sin); refimpl follows
    transformers and an explicit ``attention_factor`` key overrides both.
    """
    if _rope_type(rope_scaling) != "yarn":
        return 1.0
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    s = float(rope_scaling["factor"])
    mscale, mscale_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        return yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all)
    return yarn_mscale(s, 1.0)


def softmax_scale(qk_head_dim, rope_scaling=None):
    r"""Attention logit scale :math:`s_\text{attn} = d_{qk}^{-1/2}\, m^2`, m from ``mscale_all_dim``.

    The :math:`m^2` multiplies the whole logit, nope and rope parts (DeepSeek-V2 §3.1.4). Follows
    transformers: the factor applies only when ``mscale_all_dim`` is set and non-zero. DeepSeek's
    inference code takes μ from ``mscale`` instead (their V2-236B config lacks it, so μ = 1 there
    versus 0.707 in the HF config). Values for d_qk = 192, s = 40: 0.0721688 (none),
    0.1147214 (μ = 0.707), 0.1352338 (μ = 1).
    """
    check_integer("qk_head_dim", qk_head_dim, low=1)
    scale = qk_head_dim ** -0.5
    if _rope_type(rope_scaling) == "yarn" and rope_scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


def deinterleave_perm(dim):
    """Index permutation [0, 2, ..., dim-2, 1, 3, ..., dim-1] mapping refimpl's rotated layout to HF's.

    transformers' DeepSeek-V3 (``rope_interleave=True``) returns ``y_refimpl[..., perm]``; its
    cached rope keys are in that permuted order.
    """
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


class RopeCache(NamedTuple):
    cos: np.ndarray    # (..., Dr/2) amplitude * cos(p * theta), broadcastable against x's pairs
    sin: np.ndarray    # (..., Dr/2) amplitude * sin(p * theta)


def rope_cos_sin(positions, inv_freq, attention_factor=1.0, dtype=np.float64):
    """Tables ``amp*cos(p*theta)`` and ``amp*sin(p*theta)``. Shapes: positions (...) -> (..., Dr/2) each."""
    positions = check_int("positions", positions, low=0)
    ang = positions[..., None].astype(np.float64) * inv_freq            # (..., Dr/2)
    return ((attention_factor * np.cos(ang)).astype(dtype), (attention_factor * np.sin(ang)).astype(dtype))


def rope_forward(x, positions, inv_freq, attention_factor=1.0):
    r"""Rotate adjacent channel pairs of ``x`` by :math:`p\,\theta_i` (DeepSeek's interleaved layout).

    .. math::
        y_{2i}   &= a\,(x_{2i}\cos p\theta_i - x_{2i+1}\sin p\theta_i) \\
        y_{2i+1} &= a\,(x_{2i}\sin p\theta_i + x_{2i+1}\cos p\theta_i)

    (RoFormer eq. 34 on adjacent pairs; ``a`` = :func:`rope_attention_factor`, 1 without YaRN).

    Shapes: x (..., Dr), positions int64 broadcastable to x.shape[:-1] (e.g. (T, 1) for
    x (B, T, H, Dr)), inv_freq (Dr/2,) -> y (..., Dr).
    """
    check_float("x", x, min_ndim=1)
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    if inv_freq.ndim != 1 or not np.isfinite(inv_freq).all():
        raise ValueError(f"inv_freq: expected a finite 1-D array of Dr/2 frequencies, got shape {inv_freq.shape}")
    if x.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"inv_freq: expected shape ({x.shape[-1] // 2},) for x's last axis {x.shape[-1]}, "
                         f"got {inv_freq.shape}")
    positions = np.asarray(positions)
    try:
        np.broadcast_shapes(positions.shape, x.shape[:-1])
    except ValueError:
        raise ValueError(f"positions: shape {positions.shape} does not broadcast to x.shape[:-1] = "
                         f"{x.shape[:-1]}") from None
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, x.dtype)  # (..., Dr/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]                                 # (..., Dr/2)
    y = np.empty(np.broadcast_shapes(x.shape, cos.shape[:-1] + (x.shape[-1],)), dtype=x.dtype)
    y[..., 0::2] = x1 * cos - x2 * sin                                  # (..., Dr/2)
    y[..., 1::2] = x1 * sin + x2 * cos                                  # (..., Dr/2)
    return y, RopeCache(cos, sin)


def rope_backward(dy, cache):
    r"""Gradient of :func:`rope_forward`: the transposed rotation, :math:`dx = a R(-p\theta)\, dy`."""
    cos, sin = cache
    check_upstream("dy", dy)
    ok = dy.ndim >= 1 and dy.shape[-1] == 2 * cos.shape[-1]
    try:
        ok = ok and np.broadcast_shapes(dy.shape[:-1], cos.shape[:-1]) == dy.shape[:-1]
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"dy: expected the forward's output shape (last axis {2 * cos.shape[-1]}), got {dy.shape}")
    dy1, dy2 = dy[..., 0::2], dy[..., 1::2]                             # (..., Dr/2)
    dx = np.empty_like(dy)                                              # (..., Dr)
    # forward: y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos
    dx[..., 0::2] = dy1 * cos + dy2 * sin
    dx[..., 1::2] = -dy1 * sin + dy2 * cos
    return dx
