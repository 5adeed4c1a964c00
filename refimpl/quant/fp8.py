"""Block-wise FP8 quantisation, emulated in NumPy (DeepSeek-V3 §3.3).

DeepSeek-V3 runs every large GEMM of training in FP8 E4M3 (forward, input-gradient and
weight-gradient), keeping precision with *fine-grained* scales: one per 1×128 tile of activations
(per token, per 128 channels) and one per 128×128 block of weights, each computed online from the
tile's maximum absolute value. A single outlier then only coarsens its own tile, not the tensor.
Because H800 tensor cores keep only ~14 bits when accumulating FP8 products, partial sums are
promoted to FP32 every 128 elements of the contraction, where the two block scales are applied.

Here FP8 values are held in ordinary float32/float64 arrays that lie exactly on the FP8 grid, so
the arithmetic of the format is reproduced bit for bit without an FP8 dtype. The two formats follow
the OCP 8-bit floating point specification (2023): E4M3 ("fn": no infinities, one NaN pattern,
max 448) and E5M2 (IEEE-like with infinities, max 57344), both with subnormals and round to
nearest, ties to even.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_integer, check_real
from ..backend import kernel, resolve_backend
from ..core.linear import linear_backward, linear_forward


class FP8Format(NamedTuple):
    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float           # largest finite magnitude
    has_inf: bool        # E5M2 overflows to inf; E4M3 (fn) to NaN

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.mantissa_bits)


FP8_FORMATS = {
    "e4m3": FP8Format("e4m3", 4, 3, 7, 448.0, False),
    "e5m2": FP8Format("e5m2", 5, 2, 15, 57344.0, True),
}


def _format(fmt) -> FP8Format:
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt: expected one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    return FP8_FORMATS[fmt]


def fp8_values(fmt="e4m3"):
    """All finite non-negative values of the format, ascending, decoded from its bit patterns."""
    f = _format(fmt)
    vals = []
    for e in range(2 ** f.exponent_bits):
        for m in range(2 ** f.mantissa_bits):
            if f.has_inf and e == 2 ** f.exponent_bits - 1:
                continue                                   # E5M2: exponent all-ones is inf/NaN
            if not f.has_inf and e == 2 ** f.exponent_bits - 1 and m == 2 ** f.mantissa_bits - 1:
                continue                                   # E4M3fn: S.1111.111 is NaN
            if e == 0:
                vals.append(m * 2.0 ** (1 - f.bias - f.mantissa_bits))
            else:
                vals.append((1 + m / 2 ** f.mantissa_bits) * 2.0 ** (e - f.bias))
    return np.array(vals)


def round_to_fp8(x, fmt="e4m3", *, saturate=True, backend=None):
    r"""Round to the nearest FP8 value, ties to even; the result stays in ``x``'s dtype.

    For :math:`|x|` with binary exponent :math:`e = \max(\lfloor\log_2|x|\rfloor, 1-\text{bias})`
    the spacing of the grid is :math:`2^{e-m}`, so the value is
    :math:`2^{e-m}\,\mathrm{rne}(x / 2^{e-m})`; below the smallest normal this gives the subnormals.
    Magnitudes that round above the format's maximum saturate to ±max with ``saturate=True`` (the
    OCP "satfinite" conversion; DeepSeek's kernels never overflow because scales map each block's
    amax to 448), otherwise become NaN (E4M3) or ±inf (E5M2). NaN stays NaN; ±inf saturates or
    stays inf/NaN likewise.

    Shapes: x (...) float32/float64 -> (...) same dtype.
    """
    f = _format(fmt)
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x: expected a float32 or float64 numpy.ndarray, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if resolve_backend(backend) == "numba":
        flat = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
        out = kernel("fp8_nb").round_to_fp8_flat(flat, f.mantissa_bits, 1 - f.bias, f.max, saturate, f.has_inf)
        return out.reshape(x.shape).astype(x.dtype)
    a = np.abs(x.astype(np.float64))                                    # (...)
    with np.errstate(divide="ignore", invalid="ignore"):
        _, e2 = np.frexp(a)                                             # a = frac * 2**e2, frac in [0.5, 1)
        e = np.maximum(e2 - 1, 1 - f.bias)                              # (...) exponent of the binade
        q = np.ldexp(1.0, e - f.mantissa_bits)                          # (...) grid spacing
        r = np.rint(a / q) * q                                          # (...) rint = ties to even
    over = r > f.max                                                    # includes +inf
    if saturate:
        r = np.where(over, f.max, r)
    else:
        r = np.where(over, np.inf if f.has_inf else np.nan, r)
    r = np.where(np.isnan(a), np.nan, r)
    return (np.sign(x) * r).astype(x.dtype)                             # sign(0) = 0 keeps zeros


def _scales(amax, fmt, scale_fmt, eps, name):
    """float64 scales, each representable as the float32 that is returned (else a ValueError)."""
    f = _format(fmt)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    s = np.maximum(amax, eps) / f.max                                   # (...) amax -> format max
    if scale_fmt == "ue8m0":
        s = np.exp2(np.ceil(np.log2(s)))                                # power of two >= plain scale
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
    f32 = np.finfo(np.float32)
    if s.size and s.max() > f32.max:
        top = float(f32.max) * f.max
        raise ValueError(f"{name}: a block's max |value| {float(amax.max()):.4g} needs a scale above float32's "
                         f"range (scales are float32, as in DeepSeek's kernels; |values| <= {top:.3g})")
    if s.size and s.min() < f32.tiny:
        raise ValueError(f"eps: {eps!r} gives block scales below float32's smallest normal number; "
                         f"expected eps >= {f32.tiny * f.max:.3g}")
    return s


def quantize_activation(x, block=128, fmt="e4m3", scale_fmt=None, backend=None, *, eps=1e-4):
    r"""1×``block`` tile quantisation along the last axis (DeepSeek-V3 §3.3.2, Fig. 7a).

    .. math:: s = \max(\mathrm{amax}_\text{tile}, 10^{-4}) / 448,\qquad q = \mathrm{fp8}(x / s)

    (the default ``eps`` = 1e-4 floor is that of DeepSeek's ``act_quant`` inference kernel;
    ``scale_fmt="ue8m0"`` rounds scales up to powers of two as in DeepSeek-V3.1).

    Shapes: x (..., Din) with Din divisible by ``block`` -> q (..., Din) on the FP8 grid (float32),
    s (..., Din/block) float32.
    """
    check_float("x", x, min_ndim=1)
    block = check_integer("block", block, low=1)
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"x: last axis ({k}) must be divisible by block ({block})")
    tiles = x.astype(np.float64).reshape(*x.shape[:-1], k // block, block)   # (..., Din/block, block)
    s = _scales(np.abs(tiles).max(axis=-1, initial=0.0), fmt, scale_fmt, eps, "x")  # (..., Din/block)
    q = round_to_fp8(tiles / s[..., None], fmt, backend=backend)             # (..., Din/block, block)
    return q.reshape(x.shape).astype(np.float32), s.astype(np.float32)


def dequantize_activation(q, s, block=128):
    """Inverse of :func:`quantize_activation`: ``q * s`` per tile. Shapes: q (..., Din), s (..., Din/block)."""
    check_float("q", q, min_ndim=1)
    check_float("s", s, min_ndim=1)
    block = check_integer("block", block, low=1)
    if q.shape[-1] != s.shape[-1] * block or q.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"s: expected shape {q.shape[:-1] + (q.shape[-1] // block,)} for q {q.shape}, "
                         f"got {s.shape}")
    tiles = q.reshape(*q.shape[:-1], s.shape[-1], block)                # (..., Din/block, block)
    return (tiles * s[..., None]).reshape(q.shape)                      # (..., Din)


def quantize_weight(w, block=128, fmt="e4m3", scale_fmt=None, backend=None, *, eps=1e-4):
    """``block``×``block`` weight quantisation (DeepSeek-V3 §3.3.2, Fig. 7a; checkpoint
    ``weight_scale_inv``). Edge blocks of shapes that ``block`` does not divide are partial, as in
    the released FP8 checkpoints.

    Shapes: w (Dout, Din) -> q (Dout, Din) float32 on the FP8 grid, s (ceil(Dout/b), ceil(Din/b)) float32.
    """
    check_float("w", w, ndim=2)
    block = check_integer("block", block, low=1)
    n, k = w.shape
    block = min(block, max(n, k, 1))      # one block covers w: larger blocks give the same result
    nb, kb = -(-n // block), -(-k // block)
    pad = np.zeros((nb * block, kb * block))                            # (Doutp, Dinp)
    pad[:n, :k] = w
    blocks = pad.reshape(nb, block, kb, block)                          # (Doutp/block, block, Dinp/block, block)
    s = _scales(np.abs(blocks).max(axis=(1, 3), initial=0.0), fmt, scale_fmt, eps, "w")  # (Doutp/block, Dinp/block)
    q = round_to_fp8(blocks / s[:, None, :, None], fmt, backend=backend)  # (Doutp/block, block, Dinp/block, block)
    return q.reshape(nb * block, kb * block)[:n, :k].astype(np.float32), s.astype(np.float32)


def dequantize_weight(q, s, block=128):
    """Inverse of :func:`quantize_weight` (what DeepSeek's ``weight_dequant`` kernel computes)."""
    n, k = q.shape
    if s.shape != (-(-n // block), -(-k // block)):
        raise ValueError(f"s: expected shape {(-(-n // block), -(-k // block))} for q {q.shape}, got {s.shape}")
    full = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:n, :k]  # (Dout, Din)
    return q * full


def fp8_gemm(xq, xs, wq, ws, block=128):
    r"""``y = x @ w.T`` from block-quantised operands, promoting partial sums to FP32 per Din-block.

    .. math:: y_{ij} = \sum_{b} s^x_{i,b}\, s^w_{\lceil j/128\rceil, b}
              \Bigl(\textstyle\sum_{k \in b} q^x_{ik}\, q^w_{jk}\Bigr)

    Each inner block sum is computed in float32 and scaled into a float32 accumulator, as
    DeepSeek-V3 §3.3.2 ("increasing accumulation precision") and DeepSeek's ``fp8_gemm`` kernel
    do. Simplification: the inner sum is an exact-product float32 sum, whereas the tensor core's
    limited (~14-bit) internal accumulation is not modelled.

    Shapes: xq (N, Din), xs (N, Din/b), wq (Dout, Din), ws (ceil(Dout/b), Din/b) -> y (N, Dout) float32.
    """
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape[1] != k or k % block:
        raise ValueError(f"wq: expected shape (Dout, {k}) with Din divisible by block ({block}), got {wq.shape}")
    if xs.shape != (m, k // block) or ws.shape != (-(-n // block), k // block):
        raise ValueError(f"xs/ws: expected shapes {(m, k // block)} and {(-(-n // block), k // block)}, "
                         f"got {xs.shape} and {ws.shape}")
    ws_rows = np.repeat(ws, block, axis=0)[:n]                          # (Dout, Din/block) scale of each output row
    y = np.zeros((m, n), dtype=np.float32)                              # (N, Dout) FP32 accumulator
    for b in range(k // block):
        sl = slice(b * block, (b + 1) * block)
        part = xq[:, sl].astype(np.float32) @ wq[:, sl].astype(np.float32).T   # (N, Dout) block partial sum
        y += part * (xs[:, b, None] * ws_rows[None, :, b]).astype(np.float32)  # (N, Dout) promote + scale
    return y


class FP8LinearCache(NamedTuple):
    inner: object          # LinearCache of the float linear at the dequantised operands
    block: int
    fmt: str
    quantize_grad: bool


def fp8_linear_forward(x, w, *, block=128, fmt="e4m3", scale_fmt=None, quantize_grad=False):
    r"""Linear layer with FP8 block-quantised inputs and weights (DeepSeek-V3 Fprop).

    Forward: :math:`y = \mathrm{fp8\_gemm}(Q_{1\times b}(x), Q_{b\times b}(W))`.

    Shapes: x (..., Din), w (Dout, Din) -> y (..., Dout) in x's dtype.
    """
    check_float("x", x, min_ndim=1)
    check_float("w", w, ndim=2)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected shape (Dout, {x.shape[-1]}) to match x's last axis, got {w.shape}")
    x2 = x.reshape(-1, x.shape[-1])                                     # (N, Din)
    xq, xs = quantize_activation(x2, block, fmt, scale_fmt)             # (N, Din), (N, Din/block)
    wq, ws = quantize_weight(w, block, fmt, scale_fmt)                  # (Dout, Din), (Doutp/block, Din/block)
    y = fp8_gemm(xq, xs, wq, ws, block)                                 # (N, Dout)
    x_hat = dequantize_activation(xq, xs, block).astype(x.dtype)        # (N, Din)
    w_hat = dequantize_weight(wq, ws, block).astype(w.dtype)            # (Dout, Din)
    _, inner = linear_forward(x_hat, w_hat)
    out = y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)          # (..., Dout)
    return out, FP8LinearCache(inner, block, fmt, quantize_grad)


def fp8_linear_backward(dy, cache):
    r"""Straight-through backward of :func:`fp8_linear_forward`.

    Quantisation is treated as the identity (straight-through estimator), so the gradients are
    those of the float linear at the dequantised operands :math:`\hat x, \hat W`:
    :math:`dx = dy\,\hat W`, :math:`dW = dy^\top \hat x`. With ``quantize_grad=True`` the output
    gradient is itself quantised in 1×b tiles first, emulating DeepSeek-V3's FP8 Dgrad/Wgrad GEMMs
    (requires Dout divisible by b).

    Shapes: dy (..., Dout) -> dx (..., Din), dw (Dout, Din).
    """
    inner, block, fmt, quantize_grad = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                                  # (N, Dout)
    if quantize_grad:
        dq, ds = quantize_activation(dy2, block, fmt)                   # (N, Dout), (N, Dout/block)
        dy2 = dequantize_activation(dq, ds, block).astype(dy.dtype)     # (N, Dout)
    # forward (surrogate): y = x_hat @ w_hat.T
    dx, dw, _ = linear_backward(dy2, inner)                             # (N, Din), (Dout, Din)
    return dx.reshape(*dy.shape[:-1], dx.shape[-1]), dw
