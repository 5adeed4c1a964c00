"""Row copies with streaming (non-temporal) stores, for the Numba twins that write outputs larger
than the last-level cache.

An ordinary store first reads the cache line it writes into (the CPU must own the line), and the
written line then evicts something else from the caches. For an output far larger than the
last-level cache neither is useful: nothing will read the line from cache again before it is
evicted. A *streaming* store (LLVM's ``!nontemporal`` hint; ``vmovntps`` and friends on x86,
``stnp`` on AArch64) writes a whole line straight to memory. :func:`stream_row` and
:func:`stream_scaled_row` write one row that way: ordinary stores up to the first 64-byte boundary of the
destination, one aligned vector store per full 64-byte line, ordinary stores for the tail. Values
are those of the plain loops ``dst[j] = src[j]`` and ``dst[j] = w * src[j]`` bit for bit (one
product per element, rounded once); only the route to memory differs.

Measured on the development machine (Zen 4, 2 threads, one process): the MoE dispatch gather of
4096 x 6 rows of 1024 float32 (a 96 MiB output) took 3.8 ms with streaming stores against 4.9 ms
with ordinary ones (medians of 20 calls), and in the sequence dispatch, combine, combine backward,
dispatch backward the whole sequence went from 25.0 to 22.4 ms.

Ordering. Streaming stores are weakly ordered: another thread may see them late unless the writer
fences. Callers end each parallel task with :func:`store_fence` (``sfence`` on x86; a sequentially
consistent fence elsewhere), so the rows are in memory before the parallel region's barrier lets
the caller read them. LLVM's own ``fence seq_cst`` is not enough on x86: it is compiled to a locked
``or`` on the stack, which the architecture manuals do not promise orders streaming stores.

Only outputs of at least :data:`STREAM_MIN_BYTES` are worth it: a smaller output would still be in
cache for the next step (the expert GEMMs read the dispatched rows right away), and a streaming
store would send it to memory and back.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

#: bytes per cache line (x86-64 and the common AArch64 cores): one streaming vector store each
LINE = 64

#: outputs of at least this many bytes are written with streaming stores; about the last-level
#: cache of one core complex on the development machine (32 MiB of L3), below which an output may
#: still be cached when the next kernel reads it.
STREAM_MIN_BYTES = 32 << 20

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _row_type_ok(dst, src):
    """Streaming needs contiguous 1-D float rows of one dtype (pointer arithmetic on ``data``)."""
    return (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.ndim == 1 and src.ndim == 1
            and dst.layout == "C" and src.layout == "C" and dst.dtype == src.dtype
            and isinstance(dst.dtype, types.Float) and dst.mutable)


@intrinsic
def data_address(typingctx, a):
    """The address of an array's first element, as an integer (to find the first 64-byte boundary)."""
    if not isinstance(a, types.Array):
        return None
    sig = types.intp(a)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, context.get_value_type(types.intp))
    return sig, codegen


def _line(context, builder, signature, args, scaled):
    dty = signature.args[0]
    ety = context.get_data_type(dty.dtype)
    vty = ir.VectorType(ety, LINE // context.get_abi_sizeof(ety))        # one cache line of elements
    dst = context.make_array(signature.args[0])(context, builder, args[0])
    src = context.make_array(signature.args[2])(context, builder, args[2])
    dp = builder.bitcast(builder.gep(dst.data, [args[1]]), vty.as_pointer())
    sp = builder.bitcast(builder.gep(src.data, [args[3]]), vty.as_pointer())
    v = builder.load(sp, align=context.get_abi_sizeof(ety))           # the source may be unaligned
    if scaled:
        w = ir.Constant(vty, ir.Undefined)
        for i in range(vty.count):
            w = builder.insert_element(w, args[4], ir.Constant(ir.IntType(32), i))
        v = builder.fmul(w, v)                                            # w * src[k + i], rounded once
    store = builder.store(v, dp, align=LINE)                            # the caller aligned dst + j
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
    return context.get_dummy_value()


@intrinsic
def stream_line(typingctx, dst, j, src, k):
    """``dst[j:j+L] = src[k:k+L]`` (L elements = one 64-byte line) with one streaming vector store;
    ``dst + j`` must be 64-byte aligned."""
    if not _row_type_ok(dst, src):
        return None
    sig = types.void(dst, types.intp, src, types.intp)
    return sig, lambda context, builder, signature, args: _line(context, builder, signature, args, False)


@intrinsic
def stream_scaled_line(typingctx, dst, j, src, k, w):
    """``dst[j:j+L] = w * src[k:k+L]`` with one streaming vector store (see :func:`stream_line`)."""
    if not _row_type_ok(dst, src):
        return None
    sig = types.void(dst, types.intp, src, types.intp, dst.dtype)
    return sig, lambda context, builder, signature, args: _line(context, builder, signature, args, True)


@intrinsic
def store_fence(typingctx):
    """Order this thread's streaming stores before its later stores and atomics (``sfence`` on x86)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return sig, codegen


def stream_row(dst, src):
    """``dst[:] = src[:len(dst)]``, in numba-compiled code through streaming stores when both are
    contiguous float rows of one dtype (otherwise, and from Python, a plain copy)."""
    dst[:] = src[:len(dst)]


def stream_scaled_row(dst, src, w):
    """``dst[:] = w * src[:len(dst)]``, streamed as :func:`stream_row` when ``w`` has the rows' dtype
    too (a float64 ``w`` times float32 rows multiplies in float64 and rounds the product, so that
    case takes the plain loop, which does the same)."""
    dst[:] = w * src[:len(dst)]


@njit(inline="always")
def _head(dst):
    """Elements of ``dst`` before its first 64-byte boundary (all of it if the row is misaligned)."""
    d = dst.shape[0]
    isz = dst.itemsize
    a = data_address(dst)
    if a % isz != 0:
        return d
    return min(((-a) & (LINE - 1)) // isz, d)


@overload(stream_row, inline="always")
def _stream_row(dst, src):
    if _row_type_ok(dst, src):
        def impl(dst, src):
            d = dst.shape[0]
            n = LINE // dst.itemsize
            h = _head(dst)
            for j in range(h):
                dst[j] = src[j]
            j = h
            while j + n <= d:
                stream_line(dst, j, src, j)
                j += n
            for i in range(j, d):
                dst[i] = src[i]
        return impl

    def plain(dst, src):
        for j in range(dst.shape[0]):
            dst[j] = src[j]
    return plain


@overload(stream_scaled_row, inline="always")
def _stream_scaled_row(dst, src, w):
    if _row_type_ok(dst, src) and w == dst.dtype:
        def impl(dst, src, w):
            d = dst.shape[0]
            n = LINE // dst.itemsize
            h = _head(dst)
            for j in range(h):
                dst[j] = w * src[j]
            j = h
            while j + n <= d:
                stream_scaled_line(dst, j, src, j, w)
                j += n
            for i in range(j, d):
                dst[i] = w * src[i]
        return impl

    def plain(dst, src, w):
        for j in range(dst.shape[0]):
            dst[j] = w * src[j]
    return plain
