r"""FP8 mixed-precision training, emulated: every linear layer's three GEMMs in block-scaled E4M3.

DeepSeek-V3 §3.3 trains with FP8 inputs to all the large matrix products of its linear layers:
the forward product (Fprop, :math:`y = xW^\top`), the input gradient (Dgrad, :math:`dx = dy\,W`)
and the weight gradient (Wgrad, :math:`dW = dy^\top x`), all in E4M3. Each operand carries
fine-grained scales computed online from the max-abs value: one per :math:`1\times N_c` tile of an
activation or gradient along the contraction axis, and one per :math:`N_c\times N_c` block of a
weight, with :math:`N_c = 128`; the products of a tile are summed and then promoted into an FP32
accumulator, where the two scales are applied. The embedding, the output head, the MoE gate, the
norms and the attention core (scores, softmax, values) stay in BF16/FP32; master weights and
gradient accumulation are FP32, AdamW's moments BF16.

:func:`fp8_autocast` reproduces this on a NumPy model. Inside ``with fp8_autocast(tile=...)`` every
:func:`refimpl.core.linear_forward` and every routed expert's GEMMs (:mod:`refimpl.moe.dispatch`)
compute their three products with :class:`FP8Gemm`; everything else is untouched, because nothing
else goes through those two places: the MoE gate, attention's score and value products, norms,
activations and the embedding lookup are computed by their own code in the model's dtype. The
output head is a linear layer, so it is kept in high precision by naming it in ``exclude``.

**Straight-through backward.** The rounding has zero derivative almost everywhere, so training
differentiates the *surrogate* in which quantisation is the identity: the gradients are those of
the float layer at the dequantised operands (:math:`dx = dy\,\hat W`, :math:`dW = dy^\top\hat x`).
With ``backward=True`` (V3's recipe) the two backward products are themselves FP8 GEMMs: Dgrad
quantises :math:`dy` in :math:`1\times N_c` tiles along the output axis and reuses the weight's
blocks (a block is square, so its scale serves :math:`W` and :math:`W^\top`); Wgrad contracts over
the tokens, so it quantises :math:`dy^\top` and :math:`x^\top` in :math:`1\times N_c` tiles along the
token axis (V3 describes this conversion of :math:`1\times128` tiles to :math:`128\times1` for the
cached input of the attention-output projection).

**What is simplified.** Operands are held in float32 arrays on the FP8 grid, so the arithmetic of
E4M3 is exact but nothing runs faster. The inner sum of a tile is a float32 sum, not the ~14-bit
accumulator of the H800's tensor cores. Contraction lengths that ``tile`` does not divide get a
shorter last tile (zero padding, as the released checkpoints' edge blocks), where V3's dimensions
are multiples of 128. V3's extra savings are not modelled: the E5M6 cache of the attention-output
projection's input, FP8-cached SwiGLU inputs, FP8 MoE dispatch, BF16 optimizer moments.
Scales have no inference floor (:func:`~refimpl.quant.fp8.quantize_activation`'s 1e-4): gradients
are far smaller than activations, and a floor would push them into the subnormals.

V3 compares FP8 training with BF16 training. :func:`bf16_autocast` provides that baseline the same
way: the same three GEMMs with operands rounded to bfloat16 and float32 accumulation.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from .._validate import check_bool, check_integer
from ..backend import resolve_backend
from ..core.linear import GEMM_OVERRIDE
from .fp8 import FP8_FORMATS, fp8_gemm, quantize_activation, quantize_weight

#: Scale floor for training (only to keep an all-zero tile finite): amax / 448 of any float32 value.
TRAIN_SCALE_FLOOR = 2.0**-100


def _check_tile(tile):
    return check_integer("tile", tile, low=1)     # V3 uses 128


def _check_2d(name, a, shape):
    """Type and rank only; values (float dtype, finite) are checked by the quantisers."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")


def _pad_to(a, axis, tile):
    """Zero-pad ``a`` (2-D) along ``axis`` to a multiple of ``tile`` (zeros add nothing to a product)."""
    extra = -a.shape[axis] % tile
    if not extra:
        return a
    shape = list(a.shape)
    shape[axis] += extra
    out = np.zeros(shape, dtype=a.dtype)                                # (..) padded copy
    out[: a.shape[0], : a.shape[1]] = a
    return out


def quantize_rows(x, tile, fmt="e4m3", scale_fmt=None, backend=None):
    r"""FP8 :math:`1\times` ``tile`` tiles along the last (contraction) axis, zero-padded to a multiple.

    .. math:: s_{m,b} = \max_{k\in b}|x_{mk}| / 448,\qquad q_{mk} = \mathrm{e4m3}(x_{mk}/s_{m,b})

    (DeepSeek-V3 §3.3.2, online max-abs scaling; no inference floor, see the module docstring).

    Shapes: x (N, Din) -> q (N, Dinp) float32 on the FP8 grid, s (N, Dinp/tile) float32, Dinp = ceil(Din/tile)*tile.
    """
    tile = _check_tile(tile)
    _check_2d("x", x, "(N, Din)")
    ap = _pad_to(x, 1, tile)                                            # (N, Dinp) (values checked below)
    be = resolve_backend(backend, work=ap.size)
    return quantize_activation(ap, tile, fmt, scale_fmt, be, eps=TRAIN_SCALE_FLOOR)


def quantize_blocks(w, tile, fmt="e4m3", scale_fmt=None, backend=None):
    r"""FP8 ``tile``×``tile`` weight blocks, both axes zero-padded to multiples of ``tile`` (V3 §3.3.2).

    Shapes: w (Dout, Din) -> q (Doutp, Dinp) float32 on the FP8 grid, s (Doutp/tile, Dinp/tile) float32.
    """
    tile = _check_tile(tile)
    _check_2d("w", w, "(Dout, Din)")
    wp = _pad_to(_pad_to(w, 0, tile), 1, tile)                          # (Doutp, Dinp) (values checked below)
    be = resolve_backend(backend, work=wp.size)
    return quantize_weight(wp, tile, fmt, scale_fmt, be, eps=TRAIN_SCALE_FLOOR)


def scaled_gemm(aq, sa, bq, sb, tile):
    r"""``a @ b.T`` from tile-quantised operands with per-row, per-tile scales on both sides.

    .. math:: y_{ij} = \sum_{b} s^a_{i,b}\, s^b_{j,b}\Bigl(\textstyle\sum_{k \in b} q^a_{ik}\, q^b_{jk}\Bigr)

    Each tile's inner sum is a float32 product; it is scaled and added to a float32 accumulator, the
    promotion DeepSeek-V3 §3.3.2 describes. A weight's ``tile``×``tile`` block scales are the special
    case of the same scale on ``tile`` consecutive rows (:func:`~refimpl.quant.fp8.fp8_gemm`).

    Shapes: aq (N, Dinp), sa (N, Dinp/tile), bq (Dout, Dinp), sb (Dout, Dinp/tile) -> y (N, Dout) float32.
    """
    tile = _check_tile(tile)
    m, kp = aq.shape
    n = bq.shape[0]
    if bq.shape[1] != kp or kp % tile:
        raise ValueError(f"bq: expected shape (Dout, {kp}) with a length divisible by tile ({tile}), got {bq.shape}")
    if sa.shape != (m, kp // tile) or sb.shape != (n, kp // tile):
        raise ValueError(f"sa/sb: expected shapes {(m, kp // tile)} and {(n, kp // tile)}, got {sa.shape} and "
                         f"{sb.shape}")
    y = np.zeros((m, n), dtype=np.float32)                              # (N, Dout) FP32 accumulator
    for b in range(kp // tile):
        sl = slice(b * tile, (b + 1) * tile)
        part = aq[:, sl].astype(np.float32) @ bq[:, sl].astype(np.float32).T   # (N, Dout) one tile's sum
        y += part * (sa[:, b, None] * sb[None, :, b]).astype(np.float32)       # (N, Dout) promote + scale
    return y


def _dequantize_rows(q, s, tile, k):
    """``q * s`` per tile in float64 (exact: 4 + 24 significant bits), cut back to length ``k``."""
    full = np.repeat(s.astype(np.float64), tile, axis=-1)               # (N, Dinp)
    return (q.astype(np.float64) * full)[:, :k]                         # (N, Din)


class GemmProvider:
    """Common part of the GEMM providers: which weights they apply to, and an optional log.

    ``applies(w)`` is False for the arrays in ``exclude`` (compared by identity), which then stay in
    the model's precision. With a ``log`` list, every GEMM appends ``(kind, m, n, k)``.
    """

    def __init__(self, *, exclude=(), log=None):
        if log is not None and not isinstance(log, list):
            raise TypeError(f"log: expected a list to append to, or None, got {type(log).__name__}")
        self.log = log
        self.exclude = tuple(exclude)
        for i, a in enumerate(self.exclude):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"exclude[{i}]: expected a numpy.ndarray (a weight to keep), got {type(a).__name__}")

    def applies(self, w):
        """True unless ``w`` is one of the excluded arrays."""
        return not any(w is e for e in self.exclude)

    def _record(self, kind, m, n, k):
        if self.log is not None:
            self.log.append((kind, m, n, k))


class FP8Gemm(GemmProvider):
    """The three GEMMs of a linear layer in block-scaled FP8 (the provider :func:`fp8_autocast` installs).

    ``fprop(x, w) = x @ w.T``, ``dgrad(dy, w) = dy @ w``, ``wgrad(dy, x) = dy.T @ x``, each on 2-D
    arrays, each returning float32 (the accumulator's precision). Fprop and Dgrad are the block GEMM
    :func:`~refimpl.quant.fp8.fp8_gemm` (a weight's blocks on one side); Wgrad, tiles on both sides,
    is :func:`scaled_gemm`. See the module docstring for the recipe and :func:`fp8_autocast` for the options.
    """

    def __init__(self, tile=128, fmt="e4m3", *, scale_fmt=None, exclude=(), backward=True, log=None, backend=None):
        self.tile = _check_tile(tile)
        if fmt not in FP8_FORMATS:
            raise ValueError(f"fmt: expected one of {sorted(FP8_FORMATS)}, got {fmt!r}")
        if scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
        backward = check_bool("backward", backward)
        super().__init__(exclude=exclude, log=log)
        self.fmt, self.scale_fmt, self.backward, self.backend = fmt, scale_fmt, backward, backend

    def __repr__(self):
        return (f"FP8Gemm(tile={self.tile}, fmt={self.fmt!r}, scale_fmt={self.scale_fmt!r}, "
                f"backward={self.backward}, exclude={len(self.exclude)} arrays)")

    def _rows(self, a):
        return quantize_rows(a, self.tile, self.fmt, self.scale_fmt, self.backend)

    def _blocks(self, w):
        return quantize_blocks(w, self.tile, self.fmt, self.scale_fmt, self.backend)

    def fprop(self, x, w):
        """Forward: FP8 ``1×tile`` tiles of x and ``tile×tile`` blocks of w. (N, Din), (Dout, Din) -> (N, Dout)."""
        n, t = w.shape[0], self.tile
        self._record("fprop", x.shape[0], n, x.shape[1])
        xq, xs = self._rows(x)                                          # (N, Dinp), (N, Dinp/t)
        wq, ws = self._blocks(w)                                        # (Doutp, Dinp), (Doutp/t, Dinp/t)
        return fp8_gemm(xq, xs, wq[:n], ws, t)                          # (N, Dout)

    def dgrad(self, dy, w):
        """Input gradient ``dy @ w``: dy in tiles along Dout, w's blocks transposed.
        (N, Dout), (Dout, Din) -> (N, Din)."""
        k, t = w.shape[1], self.tile
        self._record("dgrad", dy.shape[0], k, dy.shape[1])
        wq, ws = self._blocks(w)                                        # (Doutp, Dinp), (Doutp/t, Dinp/t)
        if not self.backward:
            w_hat = _dequantize_rows(wq, np.repeat(ws, t, axis=0), t, k)[:w.shape[0]]  # (Dout, Din)
            return (dy.astype(np.float64) @ w_hat).astype(np.float32)   # (N, Din) STE of the surrogate
        dq, ds = self._rows(dy)                                         # (N, Doutp), (N, Doutp/t)
        return fp8_gemm(dq, ds, wq.T[:k], ws.T, t)                      # (N, Din) a block's scale serves w.T

    def wgrad(self, dy, x):
        """Weight gradient ``dy.T @ x``, contracting over tokens: both in tiles along N. -> (Dout, Din)."""
        self._record("wgrad", dy.shape[1], x.shape[1], dy.shape[0])
        if not self.backward:
            xq, xs = self._rows(x)                                      # the forward's quantisation of x
            x_hat = _dequantize_rows(xq, xs, self.tile, x.shape[1])     # (N, Din)
            return (dy.T.astype(np.float64) @ x_hat).astype(np.float32)  # (Dout, Din) STE of the surrogate
        gq, gs = self._rows(np.ascontiguousarray(dy.T))                 # (Dout, Np), (Dout, Np/t)
        xq, xs = self._rows(np.ascontiguousarray(x.T))                  # (Din, Np), (Din, Np/t)
        return scaled_gemm(gq, gs, xq, xs, self.tile)                   # (Dout, Din)


@contextmanager
def fp8_autocast(tile=128, fmt="e4m3", *, scale_fmt=None, exclude=(), backward=True, log=None, backend=None):
    r"""Run every linear layer and routed expert inside the ``with`` block with FP8 GEMMs (DeepSeek-V3 §3.3).

    Parameters
    ----------
    tile : int
        :math:`N_c`: activations and gradients get one scale per ``1×tile`` tile along the
        contraction axis, weights one per ``tile×tile`` block. V3 uses 128; a model whose widths
        are smaller needs a smaller tile (the tiny models of this project use 32).
    fmt : {"e4m3", "e5m2"}
        The FP8 format of every operand ("e4m3": V3, all three GEMMs).
    scale_fmt : {None, "ue8m0"}
        None: float32 scales (V3); "ue8m0": power-of-two scales (DeepSeek-V3.1).
    exclude : sequence of arrays
        Weights to keep in high precision, compared by identity: pass ``params["lm_head"]`` for V3's
        high-precision output head (also used by MTP, which shares it).
    backward : bool
        True: Dgrad and Wgrad are FP8 GEMMs too (V3). False: the exact straight-through gradients of
        the dequantised surrogate, computed in float64.
    log : list, optional
        If given, every GEMM appends ``(kind, m, n, k)``: an (m×k)·(k×n) product of kind
        ``"fprop"``, ``"dgrad"`` or ``"wgrad"``.
    backend : str, optional
        Passed to :func:`~refimpl.quant.fp8.round_to_fp8` (None: numpy for small tiles).

    Yields
    ------
    FP8Gemm
        The active GEMM. Outside the block (and when it is never entered) every function computes
        exactly what it computes without this module; nesting restores the outer setting.
    """
    gemm = FP8Gemm(tile, fmt, scale_fmt=scale_fmt, exclude=exclude, backward=backward, log=log, backend=backend)
    with use_gemm(gemm):
        yield gemm


@contextmanager
def use_gemm(provider):
    """Install ``provider`` (see :data:`refimpl.core.linear.GEMM_OVERRIDE`) for the ``with`` block."""
    if not isinstance(provider, GemmProvider):
        raise TypeError(f"provider: expected a GemmProvider (FP8Gemm, BF16Gemm), got {type(provider).__name__}")
    token = GEMM_OVERRIDE.set(provider)
    try:
        yield provider
    finally:
        GEMM_OVERRIDE.reset(token)


#: Largest finite bfloat16 value, (2 - 2^-7) * 2^127.
BF16_MAX = (2 - 2.0**-7) * 2.0**127


def round_to_bf16(x):
    r"""Round to the nearest bfloat16 value, ties to even, as float32 (every bf16 value is one).

    bfloat16 is float32 with 7 stored mantissa bits: 8 significant bits, relative rounding error at
    most :math:`2^{-8}`, the same exponent range. A float32 input is rounded on its bits (add
    ``0x7FFF`` plus the lowest kept bit, clear the low 16 bits); a float64 input is rounded directly
    to the 8-bit grid, so it is not rounded twice. Overflow gives ±inf and NaN stays NaN, as the IEEE
    conversion does.

    Shapes: x (...) float32/float64 -> (...) float32.
    """
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x: expected a float32 or float64 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dtype == np.float32:
        u = np.ascontiguousarray(x).view(np.uint32)                     # (...)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)
        return np.where(np.isnan(x), x, r)
    a = np.abs(x)                                                       # (...)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        _, e2 = np.frexp(a)
        q = np.ldexp(1.0, np.maximum(e2 - 1, -126) - 7)                 # (...) spacing of the 8-bit grid
        r = np.rint(a / q) * q                                          # (...) ties to even
    r = np.where(np.isnan(a), np.nan, np.where(r > BF16_MAX, np.inf, r))
    return (np.sign(x) * r).astype(np.float32)


class BF16Gemm(GemmProvider):
    """The three GEMMs with bfloat16 operands and float32 accumulation: the baseline of V3's comparison.

    DeepSeek-V3 §3.3 measures FP8 training against the same training in BF16; this provider rounds
    each operand to bfloat16 (:func:`round_to_bf16`, no scales needed: bf16 has float32's range)
    and multiplies in float32. Only the GEMM operands are rounded; everything else stays float32.
    """

    def fprop(self, x, w):
        """``bf16(x) @ bf16(w).T`` in float32. (N, Din), (Dout, Din) -> (N, Dout)."""
        self._record("fprop", x.shape[0], w.shape[0], x.shape[1])
        return round_to_bf16(x) @ round_to_bf16(w).T

    def dgrad(self, dy, w):
        """``bf16(dy) @ bf16(w)`` in float32. (N, Dout), (Dout, Din) -> (N, Din)."""
        self._record("dgrad", dy.shape[0], w.shape[1], dy.shape[1])
        return round_to_bf16(dy) @ round_to_bf16(w)

    def wgrad(self, dy, x):
        """``bf16(dy).T @ bf16(x)`` in float32. (N, Dout), (N, Din) -> (Dout, Din)."""
        self._record("wgrad", dy.shape[1], x.shape[1], dy.shape[0])
        return round_to_bf16(dy).T @ round_to_bf16(x)


@contextmanager
def bf16_autocast(*, exclude=(), log=None):
    """Like :func:`fp8_autocast`, with :class:`BF16Gemm`: the BF16 baseline that V3 compares FP8 with."""
    with use_gemm(BF16Gemm(exclude=exclude, log=log)) as gemm:
        yield gemm
