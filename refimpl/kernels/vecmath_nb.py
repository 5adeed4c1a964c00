"""A float32 ``exp`` and ``log`` that LLVM can vectorise, for the Numba twins' inner loops.

The pip wheels of llvmlite come without SVML, so ``np.exp`` inside a numba loop is a scalar call
into libm: a loop over a row of logits then runs one exponential at a time and its sums cannot
vectorise. :func:`exp32` and :func:`log32` are written from operations that all have vector forms
(multiply, fused multiply-add, min/max, integer shift, bit cast, select), so a loop calling them
vectorises (16 lanes with AVX-512). :func:`exp32`:

1. range reduction: :math:`k = \\mathrm{round}(x \\log_2 e)`, obtained by adding
   :math:`1.5 \\cdot 2^{23}` (the sum's low mantissa bits are then ``k``, read by a bit cast),
   :math:`r = x - k \\ln 2` with :math:`\\ln 2` split in two (Cody and Waite): the high part has
   15 significant bits, so :math:`k \\ln 2_{hi}` is exact for :math:`|k| \\le 256` and
   :math:`|r| \\le \\ln 2 / 2` to a fraction of an ulp;
2. :math:`e^r \\approx 1 + r + r^2 q(r)` with ``q`` of degree 4, fitted on
   :math:`[-\\ln 2/2, \\ln 2/2]` by iteratively reweighted least squares towards minimax relative
   error (max relative error 3.8e-9 of the polynomial itself, 0.03 ulp); evaluated in float32 by
   Horner's rule with fused multiply-adds (:func:`fma32`, ``llvm.fma``: one rounding per step,
   the same result on every machine);
3. :math:`e^x = e^r \\, 2^{k_1} 2^{k_2}` with :math:`k_1 = \\lfloor k/2 \\rfloor`,
   :math:`k_2 = k - k_1`: both powers are normal floats built from their exponent bits, the first
   product is exact and the second rounds once, so results in the subnormal range are right
   to within an ulp and underflow to 0 and overflow to inf happen where they should.

The input is clamped to [-104, 89] (beyond it the result is 0 or inf anyway) by a max and a min
written so that a NaN passes through (and then makes the polynomial NaN), so there is no branch in
the loop. Error bound: **at most 2 ulp** against the correctly rounded result over the whole
float32 range (the tests check it on a stride over every float32 bit pattern and on hypothesis
draws; measured maximum 1 ulp). Throughput on the development machine (Zen 4, one thread, data
in L1): 3.2 G exp/s, against 2.3 before the FMA/min-max/rounding rewrite (NumPy's own
float32 ``np.exp``: ~0.8 G/s on a busy core, issue 17). ``fastmath`` is off here, and says so
explicitly: numba compiles a callee with its caller's fastmath flags unless the callee sets its
own, and with 'reassoc' LLVM may compute ``s1 * s2`` first, which overflows to inf for inputs
near 88.7. Callers that reduce the results may enable the reassociation flags on their own loop.
:func:`log32` is described at its array form :func:`log32_array` (at most 2 ulp, measured 1;
1.8 G log/s).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic, overload

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693145751953125)          # 0x3f317200: 15 significant bits
LN2_LO = np.float32(1.428606765330187e-06)      # ln 2 - LN2_HI
# q(r) = C2 + C3 r + C4 r^2 + C5 r^3 + C6 r^4 (fitted, see the module docstring)
C2 = np.float32(0.49999994)
C3 = np.float32(0.16666521)
C4 = np.float32(0.04166839)
C5 = np.float32(0.00836871)
C6 = np.float32(0.0013814613)
X_LO = np.float32(-104.0)                       # exp(-104) < 2^-150: rounds to 0
X_HI = np.float32(89.0)                         # exp(89) > 2^128: overflows to inf
ROUND = np.float32(12582912.0)                  # 1.5 * 2^23: y + ROUND rounds y to an integer
ROUND_BITS = np.int32(0x4B400000)               # ... whose value is the low bits of the sum


@intrinsic
def bits_to_float32(typingctx, i):
    """Reinterpret an int32's bits as a float32 (an LLVM ``bitcast``, vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@intrinsic
def float32_to_bits(typingctx, x):
    """Reinterpret a float32's bits as an int32 (an LLVM ``bitcast``, vectorisable)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return sig, codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma.f32``: one vfmadd where the CPU has FMA, else libm)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return sig, codegen


@njit(cache=True)
def max32(x):
    """max of a 1-D float32 array, as an integer max reduction (which vectorises without fastmath).

    Flipping the magnitude bits of negative floats makes their int32 bit patterns ordered like the
    floats (-0.0 just below +0.0); a float max reduction would need 'nnan' to vectorise.
    """
    m = np.int32(-2147483648)
    for j in range(x.shape[0]):
        b = float32_to_bits(x[j])
        m = max(m, b ^ ((b >> 31) & np.int32(0x7FFFFFFF)))
    return bits_to_float32(m ^ ((m >> 31) & np.int32(0x7FFFFFFF)))


def fast_max(x):
    """max of a 1-D float array for numba kernels: :func:`max32` on float32, a plain loop otherwise."""
    return x.max()


@overload(fast_max, jit_options={"cache": True})
def _fast_max_impl(x):
    if x.dtype == types.float32:
        return lambda x: max32(x)

    def impl(x):
        m = x[0]
        for j in range(1, x.shape[0]):
            m = max(m, x[j])
        return m
    return impl


@njit(cache=True, fastmath=False)
def exp32(x):
    """``exp(x)`` for a float32 ``x``, within 2 ulp, branch-free (see the module docstring)."""
    xc = X_LO if X_LO > x else x                # max(x, X_LO) and min(.., X_HI) written so that
    xc = X_HI if X_HI < xc else xc              # a NaN passes through (x86 maxps/minps order)
    t = fma32(xc, LOG2E, ROUND)                 # k = round(x log2 e) sits in t's low mantissa bits
    kf = t - ROUND
    r = fma32(kf, -LN2_HI, xc)                  # exact (Cody and Waite)
    r = fma32(kf, -LN2_LO, r)
    q = fma32(fma32(fma32(fma32(C6, r, C5), r, C4), r, C3), r, C2)
    p = np.float32(1.0) + fma32(r * r, q, r)
    k = float32_to_bits(t) - ROUND_BITS
    k1 = k >> 1
    s1 = bits_to_float32((k1 + np.int32(127)) << 23)
    s2 = bits_to_float32((k - k1 + np.int32(127)) << 23)
    return (p * s1) * s2                        # NaN in: p is NaN, so the result is NaN


def fast_exp(x):
    """``exp`` for numba kernels: :func:`exp32` on float32, ``np.exp`` (libm) on float64."""
    return np.exp(x)


@overload(fast_exp, jit_options={"cache": True})
def _fast_exp_impl(x):
    if x == types.float32:
        return lambda x: exp32(x)
    if isinstance(x, types.Float):
        return lambda x: np.exp(x)
    return None


def cast_like(x, value):
    """``value`` converted to the floating type of ``x`` (keeps float32 loops in float32)."""
    return type(x)(value)


@overload(cast_like, jit_options={"cache": True})
def _cast_like_impl(x, value):
    if x == types.float32:
        return lambda x, value: np.float32(value)
    if isinstance(x, types.Float):
        return lambda x, value: np.float64(value)
    return None


@njit(cache=True)
def exp32_array(x, out):
    """out[i] = exp32(x[i]) for 1-D float32 arrays (used by the tests and the benchmarks)."""
    for i in range(x.shape[0]):
        out[i] = exp32(x[i])
    return out


# ------------------------------------------------------------------ log32
SQRT_HALF_BITS = np.int32(0x3F3504F3)           # bits of sqrt(1/2): m = x / 2^e lands in [sqrt(1/2), sqrt(2))
FLT_MIN = np.float32(1.1754944e-38)             # smallest normal float32
TWO23 = np.float32(8388608.0)                   # 2^23: scales a subnormal to a normal
# log(1 + f) = f - f^2/2 + f^3 P(f), P of degree 8 fitted on [sqrt(1/2) - 1, sqrt(2) - 1] by
# iteratively reweighted least squares towards minimax relative error (3.2e-9 of the polynomial)
L0 = np.float32(0.33333313)
L1 = np.float32(-0.2500001)
L2 = np.float32(0.20002119)
L3 = np.float32(-0.16667995)
L4 = np.float32(0.14219546)
L5 = np.float32(-0.12405597)
L6 = np.float32(0.11888213)
L7 = np.float32(-0.11675619)
L8 = np.float32(0.06746492)
HALF = np.float32(0.5)
INF32 = np.float32(np.inf)
NAN32 = np.float32(np.nan)


@njit(cache=True, fastmath=False)
def log32(x):
    """``log(x)`` for a float32 ``x``, within 2 ulp, branch-free (see :func:`log32_array`)."""
    tiny = x < FLT_MIN                          # subnormal, zero or negative: scale by 2^23 first
    xs = x * TWO23 if tiny else x
    bits = float32_to_bits(xs)
    e = (bits - SQRT_HALF_BITS) >> 23           # x = 2^e m, m in [sqrt(1/2), sqrt(2))
    f = bits_to_float32(bits - (e << 23)) - np.float32(1.0)   # exact (Sterbenz)
    ef = np.float32(e - (np.int32(23) if tiny else np.int32(0)))
    p = fma32(fma32(fma32(fma32(fma32(fma32(fma32(fma32(L8, f, L7), f, L6), f, L5), f, L4), f, L3), f, L2),
                    f, L1), f, L0)
    f2 = f * f
    lo = fma32(f2 * f, p, fma32(ef, LN2_LO, -HALF * f2))
    y = fma32(ef, LN2_HI, f + lo)               # e ln2_hi is exact: ln2_hi has 15 significant bits
    y = y if x < INF32 else x                   # +inf -> +inf, NaN -> NaN
    return y if x > 0 else (-INF32 if x == 0 else (x if x != x else NAN32))


@njit(cache=True)
def log32_array(x, out):
    """out[i] = log32(x[i]) for 1-D float32 arrays (used by the tests and the benchmarks).

    Method: ``x = 2^e m`` with ``m`` in [sqrt(1/2), sqrt(2)) read from the bits (subnormals scaled
    by 2^23 first), ``f = m - 1`` exact, ``log x = e ln 2 + f - f^2/2 + f^3 P(f)`` with ``ln 2`` split
    in two as in :func:`exp32`; 0 gives -inf, negatives NaN, +inf and NaN themselves, all by selects.
    """
    for i in range(x.shape[0]):
        out[i] = log32(x[i])
    return out
