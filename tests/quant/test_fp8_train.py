"""FP8 training emulation (refimpl.quant.fp8_autocast): the three GEMMs of DeepSeek-V3 §3.3, the
straight-through backward, the hook's zero effect when off, and a short FP8 vs float32 training run."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.core import linear_backward, linear_forward, swiglu_mlp_backward, swiglu_mlp_forward
from refimpl.core.linear import GEMM_OVERRIDE, HookedLinearCache, LinearCache
from refimpl.moe.dispatch import experts_backward, experts_forward
from refimpl.quant import (
    BF16Gemm,
    FP8Gemm,
    bf16_autocast,
    fp8,
    fp8_autocast,
    quantize_blocks,
    quantize_rows,
    round_to_bf16,
    scaled_gemm,
    use_gemm,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

EPS32 = float(np.finfo(np.float32).eps)
U = 2.0**-4            # E4M3: half an ulp of 3 mantissa bits, relative (reference §9 item 19)


def _deq_rows(q, s, tile, k):
    """Dequantise 1×tile tiles in float64 (exact) and cut the zero padding."""
    return (q.astype(np.float64) * np.repeat(s.astype(np.float64), tile, axis=-1))[:, :k]


def _deq_blocks(q, s, tile, n, k):
    full = np.repeat(np.repeat(s.astype(np.float64), tile, axis=0), tile, axis=1)
    return (q.astype(np.float64) * full)[:n, :k]


def _rows_hat(a, tile):
    q, s = quantize_rows(a, tile)
    return _deq_rows(q, s, tile, a.shape[1])


def _acc_bound(a_hat, b_hat, k, tile):
    """Float32 accumulation error of sum_b s_a s_b sum_{k in b} q_a q_b: each term passes through at
    most tile + ceil(k/tile) + 2 roundings of relative size eps32/2 (products of FP8 values are exact)."""
    n_ops = tile + -(-k // tile) + 2
    return n_ops * EPS32 * (np.abs(a_hat) @ np.abs(b_hat).T) + 1e-37


def _quant_err(a, tile):
    """Elementwise bound on |a - dequant(quant(a))| for 1×tile tiles (reference §9 item 19)."""
    _, s = quantize_rows(a, tile)
    s_full = np.repeat(s.astype(np.float64), tile, axis=-1)[:, :a.shape[1]]
    return U * np.abs(a) * (1 + 1e-6) + s_full * 2.0**-10


dims = st.integers(1, 40)
tiles = st.sampled_from([1, 4, 8, 16, 32])


# ---------------------------------------------------------------------------------------------
# the building blocks


@given(rng=rst.seeds(), m=dims, k=dims, tile=tiles)
def test_rows_are_zero_padded_tiles_on_the_grid(rng, m, k, tile):
    x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-4, 4, (m, k)))
    q, s = quantize_rows(x, tile)
    kp = -(-k // tile) * tile
    assert q.shape == (m, kp) and s.shape == (m, kp // tile)
    np.testing.assert_array_equal(fp8.round_to_fp8(q.astype(np.float64)), q)     # on the E4M3 grid
    assert np.all(q[:, k:] == 0) and np.abs(q).max() <= 448
    amax = np.abs(np.pad(x, ((0, 0), (0, kp - k)))).reshape(m, -1, tile).max(-1)
    np.testing.assert_allclose(s, amax / 448, rtol=1e-6)                          # online max-abs, no floor
    assert np.all(np.abs(_deq_rows(q, s, tile, k) - x) <= _quant_err(x, tile))


@given(rng=rst.seeds(), n=dims, k=dims, tile=tiles)
def test_blocks_are_padded_square_blocks(rng, n, k, tile):
    w = rng.standard_normal((n, k))
    q, s = quantize_blocks(w, tile)
    assert q.shape == (-(-n // tile) * tile, -(-k // tile) * tile)
    assert s.shape == (q.shape[0] // tile, q.shape[1] // tile)
    s_full = np.repeat(np.repeat(s.astype(np.float64), tile, 0), tile, 1)[:n, :k]
    assert np.all(np.abs(_deq_blocks(q, s, tile, n, k) - w) <= U * np.abs(w) * (1 + 1e-6) + s_full * 2.0**-10)


@given(rng=rst.seeds(), m=st.integers(1, 6), n=st.integers(1, 140), kb=st.integers(1, 3))
def test_scaled_gemm_with_block_scales_equals_fp8_gemm(rng, m, n, kb):
    """The per-row form reproduces the existing 128×128-block GEMM exactly."""
    x, w = rng.standard_normal((m, 128 * kb)), rng.standard_normal((n, 128 * kb))
    xq, xs = fp8.quantize_activation(x)
    wq, ws = fp8.quantize_weight(w)
    y = scaled_gemm(xq, xs, wq, np.repeat(ws, 128, axis=0)[:n], 128)
    np.testing.assert_array_equal(y, fp8.fp8_gemm(xq, xs, wq, ws))


# ---------------------------------------------------------------------------------------------
# the hooked linear layer: Fprop, Dgrad, Wgrad


@given(rng=rst.seeds(), m=dims, n=dims, k=dims, tile=tiles, dtype=st.sampled_from([np.float32, np.float64]))
def test_forward_is_float64_product_of_dequantised_operands(rng, m, n, k, tile, dtype):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = (rng.standard_normal((n, k)) * 0.2).astype(dtype)
    with fp8_autocast(tile):
        y, cache = linear_forward(x, w)
    assert isinstance(cache, HookedLinearCache) and y.dtype == dtype
    x_hat = _rows_hat(x, tile)
    wq, ws = quantize_blocks(w, tile)
    w_hat = _deq_blocks(wq, ws, tile, n, k)
    exact = x_hat @ w_hat.T
    assert np.all(np.abs(y - exact) <= _acc_bound(x_hat, w_hat, k, tile))
    # and FP8 is what makes it differ from the float layer: by at most one rounding of each operand
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.all(np.abs(y - ref) <= (2 * U + U * U) * 1.001 * (np.abs(x) @ np.abs(w).T) + 2 * _acc_bound(
        x_hat, w_hat, k, tile) + _quant_err(x, tile).max() * np.abs(w).sum(1)[None] * 2 + 1e-30)


@given(rng=rst.seeds(), m=dims, n=dims, k=dims, tile=tiles)
def test_backward_is_the_ste_formula_with_fp8_gemms(rng, m, n, k, tile):
    """backward=True (V3): dx = Q(dy) Ŵ with dy tiled along N; dW = Q(dyᵀ) Q(xᵀ)ᵀ tiled along tokens."""
    x, w, dy = rng.standard_normal((m, k)), rng.standard_normal((n, k)) * 0.2, rng.standard_normal((m, n)) * 1e-3
    with fp8_autocast(tile):
        _, cache = linear_forward(x, w)
    dx, dw, db = linear_backward(dy, cache)
    assert db is None and dx.shape == x.shape and dw.shape == w.shape
    wq, ws = quantize_blocks(w, tile)
    w_hat = _deq_blocks(wq, ws, tile, n, k)
    dy_hat = _rows_hat(dy, tile)
    assert np.all(np.abs(dx - dy_hat @ w_hat) <= _acc_bound(dy_hat, w_hat.T, n, tile))
    g_hat, x_hat_t = _rows_hat(dy.T, tile), _rows_hat(x.T, tile)               # (N, M), (K, M)
    assert np.all(np.abs(dw - g_hat @ x_hat_t.T) <= _acc_bound(g_hat, x_hat_t, m, tile))
    # close to the exact STE gradient dy Ŵ: one more rounding, of dy, bounded elementwise
    assert np.all(np.abs(dx - dy @ w_hat) <= _quant_err(dy, tile) @ np.abs(w_hat)
                  + 2 * _acc_bound(dy_hat, w_hat.T, n, tile))


@given(rng=rst.seeds(), m=dims, n=dims, k=dims, tile=tiles)
def test_backward_false_is_the_exact_ste_formula(rng, m, n, k, tile):
    x, w, dy = rng.standard_normal((m, k)), rng.standard_normal((n, k)), rng.standard_normal((m, n))
    with fp8_autocast(tile, backward=False):
        _, cache = linear_forward(x, w)
    dx, dw, _ = linear_backward(dy, cache)
    wq, ws = quantize_blocks(w, tile)
    w_hat, x_hat = _deq_blocks(wq, ws, tile, n, k), _rows_hat(x, tile)
    # computed in float64, returned in float32: one rounding of the result, plus float64 noise
    dx_ref, dw_ref = dy @ w_hat, dy.T @ x_hat
    assert np.all(np.abs(dx - dx_ref) <= 2.0**-24 * np.abs(dx_ref) + 1e-14 * (np.abs(dy) @ np.abs(w_hat)))
    assert np.all(np.abs(dw - dw_ref) <= 2.0**-24 * np.abs(dw_ref) + 1e-14 * (np.abs(dy).T @ np.abs(x_hat)))


@given(rng=rst.seeds(), m=st.integers(1, 6), n=st.integers(1, 10), k=st.integers(1, 10), tile=st.sampled_from([2, 4]),
       bias=st.booleans())
def test_ste_backward_matches_finite_differences_of_the_surrogate(rng, m, n, k, tile, bias):
    """The STE gradient is the true gradient of the surrogate y = x Ŵ0ᵀ + x̂0 Wᵀ (+ b), whose
    quantised operands are frozen at the point of linearisation (x0, W0)."""
    x0, w0, b0 = rng.standard_normal((2, m, k)), rng.standard_normal((n, k)), rng.standard_normal(n)
    with fp8_autocast(tile, backward=False):
        _, cache = linear_forward(x0, w0, b0 if bias else None)
    wq, ws = quantize_blocks(w0, tile)
    w_hat, x_hat = _deq_blocks(wq, ws, tile, n, k), _rows_hat(x0.reshape(-1, k), tile).reshape(x0.shape)

    def f(x, w, b):
        y = x @ w_hat.T + x_hat @ w.T + (b if bias else 0.0)
        return y, lambda dy: linear_backward(dy, cache)
    assert check_grad(f, [x0, w0, b0], wrt=[0, 1, 2] if bias else [0, 1]) < tol("gradcheck")["rtol"]


def test_exclude_keeps_a_weight_in_float_and_log_records_gemms(rng):
    x, w, head = rng.standard_normal((5, 8)), rng.standard_normal((6, 8)), rng.standard_normal((7, 8))
    log = []
    with fp8_autocast(4, exclude=[head], log=log):
        y_head, c_head = linear_forward(x, head)
        _, c = linear_forward(x, w)
        linear_backward(np.ones((5, 6)), c)
        linear_backward(np.ones((5, 7)), c_head)
        _, c_copy = linear_forward(x, head.copy())                              # identity, not equality
    np.testing.assert_array_equal(y_head, x @ head.T)
    assert isinstance(c_head, LinearCache) and isinstance(c_copy, HookedLinearCache)
    assert log == [("fprop", 5, 6, 8), ("dgrad", 5, 8, 6), ("wgrad", 6, 8, 5), ("fprop", 5, 7, 8)]


# ---------------------------------------------------------------------------------------------
# the BF16 baseline


@given(rng=rst.seeds())
def test_bf16_rounding_is_round_to_nearest_even_on_8_significant_bits(rng):
    x = (rng.standard_normal(4000) * np.exp2(rng.uniform(-140, 125, 4000))).astype(np.float32)
    u = x.view(np.uint32)
    ties = ((u & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)   # exactly half-way
    x = np.concatenate([x, ties, np.float32([0.0, -0.0, 3.3e38, -3.4e38, np.inf])])
    r = round_to_bf16(x)
    assert r.dtype == np.float32 and np.all(r.view(np.uint32) & np.uint32(0xFFFF) == 0)   # 7 stored bits
    np.testing.assert_array_equal(r, round_to_bf16(x.astype(np.float64)))   # bit trick == direct rounding
    lo = x.view(np.uint32) & np.uint32(0xFFFF0000)
    even = (lo >> 16) & 1 == 0
    tie = (x.view(np.uint32) & np.uint32(0xFFFF)) == 0x8000
    down = lo.view(np.float32)
    assert np.all((r[tie] == down[tie]) == even[tie])                        # ties go to the even neighbour
    finite = np.isfinite(r) & (np.abs(x) >= 2.0**-126)
    assert np.all(np.abs(r[finite] - x[finite]) <= 2.0**-8 * np.abs(x[finite]))     # half an ulp, 8 bits
    assert r[-2] == -np.inf and r[-1] == np.inf                              # -3.4e38 rounds past the max


def test_bf16_rounding_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-130, 120, 20000))).astype(np.float32)
    np.testing.assert_array_equal(round_to_bf16(x), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_bf16_gemms_round_operands_and_accumulate_in_float32(rng):
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((7, 12), (5, 12), (7, 5)))
    log = []
    with bf16_autocast(log=log) as g:
        y, cache = linear_forward(x, w)
    assert isinstance(g, BF16Gemm) and cache.gemm is g
    np.testing.assert_array_equal(y, round_to_bf16(x) @ round_to_bf16(w).T)
    dx, dw, _ = linear_backward(dy, cache)
    np.testing.assert_array_equal(dx, round_to_bf16(dy) @ round_to_bf16(w))
    np.testing.assert_array_equal(dw, round_to_bf16(dy).T @ round_to_bf16(x))
    assert [k for k, *_ in log] == ["fprop", "dgrad", "wgrad"]
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert 0 < np.abs(y - ref).max() <= (2 * 2.0**-8 + 2.0**-16 + 14 * 2.0**-24) * (np.abs(x) @ np.abs(w).T).max()
    with pytest.raises(TypeError, match="^provider"), use_gemm("bf16"):
        pass


# ---------------------------------------------------------------------------------------------
# off means off; the hook's scope


def test_hook_off_is_exactly_the_old_linear(rng):
    x, w, b, dy = rng.standard_normal((2, 3, 8)), rng.standard_normal((5, 8)), rng.standard_normal(5), \
        rng.standard_normal((2, 3, 5))
    with fp8_autocast(4):
        pass
    assert GEMM_OVERRIDE.get() is None
    y, cache = linear_forward(x, w, b)
    assert type(cache) is LinearCache
    np.testing.assert_array_equal(y, x @ w.T + b)
    dx, dw, db = linear_backward(dy, cache)
    np.testing.assert_array_equal(dx, dy @ w)
    np.testing.assert_array_equal(dw, dy.reshape(-1, 5).T @ x.reshape(-1, 8))
    np.testing.assert_array_equal(db, dy.reshape(-1, 5).sum(0))


def test_whole_model_is_unchanged_after_a_hooked_step():
    """A full loss + backward of the tiny V3 gives bit-identical results before and after an FP8 step,
    and differs inside one (so the comparison would catch a hook left on)."""
    from refimpl.model.transformer import init_params, loss_backward, loss_forward
    from refimpl.recipes.tiny_v3 import tiny_v3_config
    from refimpl.tree import tree_flatten
    cfg = tiny_v3_config(vocab_size=20)
    params = init_params(cfg, np.random.default_rng(0), np.float64)
    ids = np.random.default_rng(1).integers(0, 20, (2, 12))

    def run():
        loss, cache, _ = loss_forward(ids, params, cfg, backend="numpy")
        return [loss, *tree_flatten(loss_backward(1.0, cache, params))[0]]
    before = run()
    with fp8_autocast(32, exclude=[params["lm_head"]]):
        inside = run()
    after = run()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert inside[0] != before[0] and abs(inside[0] / before[0] - 1) < 2.0**-4


def _experts(rng, e=3, d=8, i=6, rows=(4, 0, 5)):
    experts = {"gate_proj": rng.standard_normal((e, i, d)), "up_proj": rng.standard_normal((e, i, d)),
               "down_proj": rng.standard_normal((e, d, i))}
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    return rng.standard_normal((offsets[-1], d)), experts, offsets


def test_experts_hook_off_is_exactly_the_old_per_expert_gemms(rng):
    xs, experts, offsets = _experts(rng)
    ys, cache = experts_forward(xs, experts, offsets)
    assert cache.gemms is None
    dys = rng.standard_normal(ys.shape)
    dxs, g = experts_backward(dys, cache)
    for e in range(3):
        r = slice(offsets[e], offsets[e + 1])
        p = {k: v[e] for k, v in experts.items()}
        y_e, c_e = swiglu_mlp_forward(xs[r], p)
        np.testing.assert_allclose(ys[r], y_e, **tol("equiv64"))
        dx_e, g_e = swiglu_mlp_backward(dys[r], c_e)
        np.testing.assert_allclose(dxs[r], dx_e, **tol("equiv64"))
        for k in experts:
            np.testing.assert_allclose(g[k][e], g_e[k], **tol("equiv64"))


@pytest.mark.parametrize("backward", [True, False])
def test_hooked_experts_equal_hooked_linear_layers(rng, backward):
    """Each routed expert under the hook computes what a hooked SwiGLU MLP of linear layers does."""
    xs, experts, offsets = _experts(rng)
    with fp8_autocast(4, backward=backward):
        ys, cache = experts_forward(xs, experts, offsets)
        per_expert = [swiglu_mlp_forward(xs[offsets[e]:offsets[e + 1]], {k: v[e] for k, v in experts.items()})
                      for e in range(3)]
    assert all(isinstance(g, FP8Gemm) for g in cache.gemms)
    dys = rng.standard_normal(ys.shape)
    dxs, g = experts_backward(dys, cache)                                     # after the block: cached hook
    for e, (y_e, c_e) in enumerate(per_expert):
        r = slice(offsets[e], offsets[e + 1])
        np.testing.assert_allclose(ys[r], y_e, **tol("equiv32"))
        dx_e, g_e = swiglu_mlp_backward(dys[r], c_e)
        np.testing.assert_allclose(dxs[r], dx_e, **tol("equiv32"))
        for k in experts:
            np.testing.assert_allclose(g[k][e], g_e[k], **tol("equiv32"))
    assert np.all(g["gate_proj"][1] == 0)                                     # expert 1 got no rows
    # and the FP8 experts really differ from the float ones
    ys_float, _ = experts_forward(xs, experts, offsets)
    assert 1e-4 < np.abs(ys - ys_float).max() / np.abs(ys_float).max() < 0.2


def test_contexts_nest_and_restore_after_errors():
    assert GEMM_OVERRIDE.get() is None
    with fp8_autocast(8) as outer:
        with fp8_autocast(16) as inner:
            assert GEMM_OVERRIDE.get() is inner and inner.tile == 16
        assert GEMM_OVERRIDE.get() is outer
        with pytest.raises(RuntimeError), fp8_autocast(4):
            raise RuntimeError("boom")
        assert GEMM_OVERRIDE.get() is outer
    assert GEMM_OVERRIDE.get() is None


@pytest.mark.parametrize("kwargs, exc, arg", [
    (dict(tile=0), ValueError, "tile"),
    (dict(tile=-32), ValueError, "tile"),
    (dict(tile=2.5), TypeError, "tile"),       # a wrong type is a TypeError (refimpl._validate's rule)
    (dict(tile="32"), TypeError, "tile"),
    (dict(tile=True), TypeError, "tile"),
    (dict(tile=32, fmt="e3m4"), ValueError, "fmt"),
    (dict(tile=32, scale_fmt="e8"), ValueError, "scale_fmt"),
    (dict(tile=32, exclude=[[1.0]]), TypeError, "exclude"),
    (dict(tile=32, backward="yes"), TypeError, "backward"),
    (dict(tile=32, log=()), TypeError, "log"),
])
def test_bad_settings_raise_naming_the_argument(kwargs, exc, arg):
    with pytest.raises(exc, match=f"^{arg}"), fp8_autocast(**kwargs):
        pass
    assert GEMM_OVERRIDE.get() is None


def test_bad_operands_raise_clearly():
    with pytest.raises(ValueError, match="^tile"):
        quantize_rows(np.ones((2, 8)), 0)
    with pytest.raises(ValueError, match="^x"):
        quantize_rows(np.ones(8), 4)
    with pytest.raises(TypeError, match="^w"):
        quantize_blocks([[1.0]], 4)
    with pytest.raises(ValueError, match="^bq"):
        scaled_gemm(np.ones((2, 8)), np.ones((2, 2)), np.ones((3, 4)), np.ones((3, 1)), 4)
    with pytest.raises(ValueError, match="^x"), fp8_autocast(4):
        linear_forward(np.array([[np.inf, 1.0]]), np.ones((3, 2)))


# ---------------------------------------------------------------------------------------------
# a short training run


def test_short_fp8_training_run_stays_close_to_float32():
    """Same start, same batches: the FP8 run must learn like the float32 one and differ from it.

    Bounds. Each E4M3 operand carries a relative rounding error of at most 2^-4 (§9 item 19), about
    2.6% RMS for Gaussian-like data, and the errors of a step enter the update with random signs, so
    the curves separate slowly: per step the loss gap must stay under 2^-4 (one rounding of every
    operand). The gap must also be FP8's doing: on average ten times the gap between the float32
    run and a float64 run from the same start (what float32 rounding alone does to the curves), or
    the hook would not be on. The FP8 run must cut the loss by at least 90% as much as the float32
    run does, and its loss on fresh problems, read in float32, must be within 2^-4 of the float32 model's."""
    from refimpl.recipes.fp8_train import fp8_train_run
    r = fp8_train_run(steps=16, batch_size=6, window=4, progress=False)
    l32, l8, rel, ctl = r["loss_fp32"], r["loss_fp8"], r["relative_error"], r["control_relative_error"]
    assert l32.shape == l8.shape == rel.shape == ctl.shape == (16,)
    assert np.all(rel < 2.0**-4) and rel.mean() > 10 * ctl.mean()
    # BF16 (2^-8 per operand) sits between: closer to float32 than FP8 is, farther than float64 is
    assert 10 * ctl.mean() < r["bf16_relative_error"].mean() < rel.mean()
    h32, h8 = r["eval_loss"]["fp32 weights"]["float"], r["eval_loss"]["fp8 weights"]["float"]
    assert abs(h8 - h32) < 2.0**-4 * h32
    assert (l8[0] - l8[-1]) > 0.9 * (l32[0] - l32[-1]) > 0
    kinds = {g[0] for g in r["gemms"]}
    assert kinds == {"fprop", "dgrad", "wgrad"}
    vocab = r["config"].vocab_size
    heads = [g for g in r["gemms"] if g[0] == "fprop" and g[2] == vocab]
    assert heads == [] and any(g[0] == "fprop" and g[2] == 2 * 64 for g in r["gemms"])  # head float, MLP FP8
    assert 0 <= r["final_relative_error"] < 2.0**-4


def test_fp8_train_run_cache_returns_the_computed_result(tmp_path):
    """With ``cache_dir`` a second call with the same arguments loads the first call's result: the
    same curves to the bit (float64 arrays; None without the yardstick runs), the same scalars and
    GEMM list, the config rebuilt; other arguments miss the cache."""
    from refimpl.recipes.fp8_train import fp8_train_run
    kw = dict(steps=8, batch_size=4, window=2, control=False, progress=False, cache_dir=tmp_path)
    a, b = fp8_train_run(**kw), fp8_train_run(**kw)
    assert (a["cached"], b["cached"]) == (False, True)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype == np.float64 and a[k].tobytes() == b[k].tobytes(), k
        elif k != "cached":
            assert a[k] == b[k], k
    assert a["loss_bf16"] is None and a["relative_error_vs_bf16"] is None
    assert a["loss_fp8"].shape == (8,) and a["config"] == b["config"]
    assert not fp8_train_run(**{**kw, "seed": 1})["cached"]


def test_relative_loss_error_and_its_moving_average():
    from refimpl.recipes.fp8_train import relative_loss_error
    a, b = np.array([1.1, 2.0, 2.7, 4.4]), np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(relative_loss_error(a, b), [0.1, 0.0, 0.1, 0.1], **tol("equiv64"))
    # trailing means over 2 steps: (1.1)/(1.0), (3.1)/(3.0), (4.7)/(5.0), (7.1)/(7.0)
    np.testing.assert_allclose(relative_loss_error(a, b, window=2), [0.1, 0.1 / 3, 0.06, 0.1 / 7],
                               **tol("equiv64"))
    with pytest.raises(ValueError, match="^loss_fp8"):
        relative_loss_error(a[:3], b)
    with pytest.raises(ValueError, match="^window"):
        relative_loss_error(a, b, window=0)
