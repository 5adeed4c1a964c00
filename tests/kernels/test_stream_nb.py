"""Streaming-store row copies (refimpl.kernels.stream_nb): the same bits as a plain copy, whatever the
row's length and alignment, and the MoE kernels that use them equal with and without streaming."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from refimpl.kernels import moe_nb, stream_nb  # noqa: E402
from refimpl.moe.dispatch import make_plan  # noqa: E402
from refimpl.testing import strategies as rst  # noqa: E402


@njit
def _copy(dst, src):
    stream_nb.stream_row(dst, src)
    stream_nb.store_fence()


@njit
def _scale(dst, src, w):
    stream_nb.stream_scaled_row(dst, src, w)
    stream_nb.store_fence()


SPECIAL = {np.float32: [np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-45, -1e-40, 3.4e38],
           np.float64: [np.nan, -np.nan, np.inf, -np.inf, -0.0, 5e-324, -1e-310, 1.7e308]}


def _row(rng, dtype, n):
    a = rng.standard_normal(n).astype(dtype)
    if n:
        hit = rng.random(n) < 0.2
        a[hit] = rng.choice(np.array(SPECIAL[dtype], dtype=dtype), hit.sum())
    return a


@given(rst.seeds(), st.sampled_from([np.float32, np.float64]), st.integers(0, 150), st.integers(0, 20),
       st.integers(0, 20))
def test_rows_are_bit_identical_to_plain_stores(rng, dtype, n, dst_off, src_off):
    """Every length and element offset (so the first 64-byte boundary falls anywhere in the row, or
    nowhere), NaN payloads, signed zeros, infinities and subnormals: streaming changes no bit."""
    src = _row(rng, dtype, n + src_off)[src_off:]                       # (n,) at any alignment
    w = dtype(rng.choice([-1.5, 0.1, 3.0, -0.0, np.inf]))
    buf = np.full(n + dst_off + 8, 7, dtype)                            # guard elements on both sides
    dst = buf[dst_off:dst_off + n]
    _copy(dst, src)
    assert dst.tobytes() == src.tobytes()
    assert (buf[:dst_off] == 7).all() and (buf[dst_off + n:] == 7).all()
    buf[:] = 7
    with np.errstate(invalid="ignore", over="ignore"):
        want = w * src                                                  # NumPy: one rounded product each
    _scale(dst, src, w)
    np.testing.assert_array_equal(dst.view(np.uint8), want.view(np.uint8))
    assert (buf[:dst_off] == 7).all() and (buf[dst_off + n:] == 7).all()


def test_misaligned_and_strided_rows_take_the_plain_path(rng):
    """A row whose address is not a multiple of its item size, or a strided view, is copied with
    plain stores (no streaming instruction can take it) and still right."""
    raw = np.zeros(4 * 100 + 1, np.uint8)
    dst = np.frombuffer(raw.data, dtype=np.float32, count=100, offset=1)   # address odd
    assert dst.ctypes.data % 4 != 0
    src = rng.standard_normal(100).astype(np.float32)
    _copy(dst, src)
    np.testing.assert_array_equal(dst, src)
    big = np.zeros(300, np.float64)
    s64 = rng.standard_normal(150)
    _copy(big[::2], s64)
    np.testing.assert_array_equal(big[::2], s64)
    assert (big[1::2] == 0).all()


def test_mixed_precision_scale_keeps_the_wide_product(rng):
    """A float64 weight times float32 rows multiplies in float64 and rounds once, as the kernels'
    plain loop did; the streaming path (float32 products) is not taken for it."""
    src = rng.standard_normal(200).astype(np.float32)
    w = 1 / 3                                                           # not a float32
    dst = np.empty(200, np.float32)
    _scale(dst, src, w)
    np.testing.assert_array_equal(dst, (w * src.astype(np.float64)).astype(np.float32))


def test_streaming_path_emits_nontemporal_stores():
    """The streaming branch is really there: the compiled kernel's LLVM IR carries the
    ``!nontemporal`` hint (and the plain helper's does not)."""
    x = np.ones(64, np.float32)
    _copy(np.empty_like(x), x)
    ir = "".join(_copy.inspect_llvm().values())
    assert "!nontemporal" in ir

    @njit
    def plain(dst, src):
        for j in range(dst.shape[0]):
            dst[j] = src[j]
    plain(np.empty_like(x), x)
    assert "!nontemporal" not in "".join(plain.inspect_llvm().values())


@given(rst.seeds(), st.sampled_from([np.float32, np.float64]), st.sampled_from([1, 16, 33, 64, 1024]),
       st.booleans())
def test_moe_kernels_equal_with_and_without_streaming(rng, dtype, d, serial):
    """dispatch and combine_backward write the same bits with streaming stores as without, in their
    parallel and serial compilations, over more rows than one parallel task (ROWS) holds."""
    n, e, k = 3 * moe_nb.ROWS + 7, 8, 3
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    plan = make_plan(idx, e, rng.random((n, k)) < 0.9, backend="numpy")
    x, dy = (rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    ys = rng.standard_normal((plan.token.size, d)).astype(dtype)
    w = rng.random((n, k)).astype(dtype)
    disp = moe_nb.serial_twin(moe_nb.dispatch_jit) if serial else moe_nb.dispatch_jit
    cb = moe_nb.serial_twin(moe_nb.combine_backward_jit) if serial else moe_nb.combine_backward_jit
    outs = []
    for stream in (False, True):
        xs = disp(x, plan.token, np.empty_like(ys), stream)
        dys, dw = cb(dy, ys, w, plan.pos, plan.token, np.empty_like(ys), np.empty_like(w), stream)
        outs.append((xs, dys, dw))
    for u, v in zip(*outs, strict=True):
        np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))
    np.testing.assert_array_equal(outs[0][0], x[plan.token])


def test_entry_points_stream_from_the_size_threshold(rng, monkeypatch):
    """dispatch and combine_backward ask for streaming exactly when their big output has at least
    STREAM_MIN_BYTES."""
    seen = []
    monkeypatch.setattr(moe_nb, "run_sized", lambda fn, work, *args, **kw: seen.append(args[-1]))
    n, d, k = 10, 16, 2
    ys = np.zeros((n * k, d), np.float32)
    for limit, want in ((ys.nbytes, True), (ys.nbytes + 1, False)):
        monkeypatch.setattr(stream_nb, "STREAM_MIN_BYTES", limit)
        seen.clear()
        moe_nb.dispatch(np.zeros((n, d), np.float32), np.zeros(n * k, np.int64), ys)
        moe_nb.combine_backward(np.zeros((n, d), np.float32), ys, np.zeros((n, k), np.float32),
                                np.zeros((n, k), np.int64), np.zeros(n * k, np.int64), np.empty_like(ys),
                                np.zeros((n, k), np.float32))
        assert seen == [want, want]
