"""Round trips through every format: exact values, error bounds, range, NaN, shapes, jit.

Semantics held here (see reference_numpy.py for the full recipes):

* Representable values come back exactly. For fp4_e2m1 a block whose max is 6 * 2**k
  gets e = k (ceil(log2(6 * 2**k / 6)) = k); for mxfp4 a block whose max is 4 or 6
  times 2**k gets e = floor(log2(max)) - 2 = k; for nvfp4 a block whose max is
  6 * s * g with s an e4m3 value and g a power of two gets block scale s.
* Everything else rounds to a neighbouring grid point of the scaled E2M1 grid, within
  half of that gap (ties either way), except mxfp4/nvfp4 values beyond 6 times the
  scale, which saturate to +-6 times the scale. fp4_e2m1's ceil scale means |x / 2**e|
  never exceeds 6 (bar float32 log2 rounding, < 1 ulp).
* No finite input dequantizes to inf (fp16 and bf16 saturate; fp8 clips).
* A NaN or inf poisons only its own block (FP4: the whole block reads NaN); for the
  per-element formats only its own element.

Inputs avoid float32 subnormals, which XLA on CPU flushes (see format_testing.py).
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

import fp4kv_jax
from fp4kv_jax.formats import get_codec
import reference_numpy as R
from format_testing import (
    GLOBAL_SCALES,
    POW2_GLOBAL_SCALES,
    as_bytes,
    fp4_inputs,
    jit_quantize,
    roundtrip,
    wide_float32,
)

ALL_FORMATS = (
    "fp4_e2m1", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4", "nvfp4_4over6", "nvfp4_search", "nvfp4_search_b8",
    "nvfp4_search_b4",
    "float32", "bf16", "fp16",
)
FP4 = R.FP4_FORMATS
GRID = R.E2M1_MAGNITUDES  # 0, 0.5, 1, 1.5, 2, 3, 4, 6


def test_format_names_are_the_documented_eleven():
    assert sorted(fp4kv_jax.format_names()) == sorted(ALL_FORMATS)


# ----------------------------------------------------------------------------- exact values


@st.composite
def _codes_with_block_max(draw, block, rows_max=3, d=64, max_codes=(7,)):
    """Random E2M1 codes [rows, d] where each block holds a code from `max_codes`
    (magnitude index; sign random) at a random position."""
    rows = draw(st.integers(1, rows_max))
    codes = draw(arrays(np.uint8, (rows, d), elements=st.integers(0, 15)))
    nb = d // block
    pos = draw(arrays(np.int64, (rows, nb), elements=st.integers(0, block - 1)))
    top = draw(arrays(np.uint8, (rows, nb), elements=st.sampled_from(max_codes)))
    sign = draw(arrays(np.bool_, (rows, nb)))
    # Blocks' other codes must not exceed the block max.
    view = codes.reshape(rows, nb, block)
    mags = np.minimum(view & 7, top[..., None])
    view[:] = mags | (view & 8)
    r, b = np.indices((rows, nb))
    view[r, b, pos] = top | np.where(sign, 8, 0).astype(np.uint8)
    return codes


@settings(max_examples=40, deadline=None)
@given(codes=_codes_with_block_max(16), data=st.data())
def test_fp4_e2m1_representable_values_round_trip_exactly(codes, data):
    rows, nb = codes.shape[0], 4
    k = data.draw(arrays(np.int64, (rows, nb), elements=st.integers(-33, 125)), label="k")
    scale = np.repeat(np.ldexp(1.0, k), 16, axis=-1)
    x = (R.code_value(codes) * scale).astype(np.float32)  # exact
    q, deq = roundtrip(x, "fp4_e2m1")
    np.testing.assert_array_equal(deq, x)
    np.testing.assert_array_equal(np.asarray(q.scales), k + 127)
    # Codes are the ones we built, except -0 (code 8), which is stored as +0 (code 0).
    expected = np.where(codes == 8, 0, codes).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.data), R.pack_nibbles(expected))


@settings(max_examples=40, deadline=None)
@given(codes=_codes_with_block_max(32, max_codes=(6, 7)), data=st.data())
def test_mxfp4_representable_values_round_trip_exactly(codes, data):
    rows, nb = codes.shape[0], 2
    k = data.draw(arrays(np.int64, (rows, nb), elements=st.integers(-120, 125)), label="k")
    x = (R.code_value(codes) * np.repeat(np.ldexp(1.0, k), 32, axis=-1)).astype(np.float32)
    q, deq = roundtrip(x, "mxfp4")
    np.testing.assert_array_equal(deq, x)
    np.testing.assert_array_equal(np.asarray(q.scales), k + 127)
    expected = np.where(codes == 8, 0, codes).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.data), R.pack_nibbles(expected))


# Every positive finite float8_e4m3fn value (subnormals included): bytes 0x01..0x7e.
E4M3_POSITIVE = np.arange(1, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("default_global", [False, True], ids=["given_g", "default_g"])
@settings(max_examples=30, deadline=None)
@given(codes=_codes_with_block_max(16), data=st.data())
def test_nvfp4_representable_values_round_trip_exactly(default_global, codes, data):
    rows, nb = codes.shape[0], 4
    j = data.draw(st.integers(-100, 100), label="log2 g")
    g = np.float32(2.0**j)
    idx = data.draw(arrays(np.int64, (rows, nb), elements=st.integers(0, E4M3_POSITIVE.size - 1)))
    s = E4M3_POSITIVE[idx]
    if default_global:
        # One block with scale 448 and a +-6 makes amax = 2688 * g, so the default
        # global scale amax / 2688 is g again.
        s[0, 0] = ml_dtypes.float8_e4m3fn(448)
    s64 = s.astype(np.float64)
    x = (R.code_value(codes) * np.repeat(s64, 16, axis=-1) * float(g)).astype(np.float32)
    q, deq = roundtrip(x, "nvfp4", None if default_global else g)
    assert np.float32(q.global_scale) == g
    np.testing.assert_array_equal(deq, x)
    np.testing.assert_array_equal(as_bytes(q.scales), s.view(np.uint8))
    expected = np.where(codes == 8, 0, codes).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.data), R.pack_nibbles(expected))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_every_finite_fp8_value_round_trips_exactly(fmt):
    dtype = R.FP8_DTYPES[fmt]
    values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    values = values[np.isfinite(values)]
    x = np.resize(values, (len(values) // 64 + 1) * 64).reshape(-1, 64)
    q, deq = roundtrip(x, fmt)
    np.testing.assert_array_equal(deq, x)
    np.testing.assert_array_equal(np.signbit(deq), np.signbit(x))  # -0.0 stays -0.0
    # With a power-of-two global scale, scaled values round-trip too.
    q, deq = roundtrip(x * np.float32(2.0**-20), fmt, np.float32(2.0**-20))
    np.testing.assert_array_equal(deq, x * np.float32(2.0**-20))


@pytest.mark.parametrize("fmt,dtype", [("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)])
def test_half_precision_representable_values_round_trip_exactly(fmt, dtype):
    bits = np.arange(0, 2**16, 7, dtype=np.uint16)
    values = bits.view(dtype).astype(np.float32)
    values = values[np.isfinite(values) & ((values == 0) | (np.abs(values) >= 2.0**-126))]
    x = np.resize(values, (len(values) // 64) * 64).reshape(-1, 64)
    q, deq = roundtrip(x, fmt)
    assert np.asarray(q.data).dtype == dtype
    np.testing.assert_array_equal(deq, x)


# ----------------------------------------------------------------------------- error bounds


def _check_rounded_to_neighbour(y, got, fmt_desc, rel_slack=0.0):
    """`got` (deq / scale) is a grid neighbour of `y` (x / scale) within half the gap
    (plus rel_slack * |y| where y itself carries a float32 rounding); |y| > 6 must give
    exactly +-6 (saturation)."""
    a = np.abs(y)
    inside = a <= 6
    hi_idx = np.searchsorted(GRID, np.minimum(a, 6), side="left")  # first grid >= |y|
    upper = GRID[hi_idx]
    lower = GRID[np.maximum(hi_idx - 1, 0)]
    lower = np.where(upper == a, upper, lower)  # exactly on the grid
    gap = upper - lower
    err = np.abs(np.abs(got) - a)
    # Exact neighbour and within half the gap (ties may go either way).
    on_neighbour = (np.abs(got) == lower) | (np.abs(got) == upper)
    ok = np.where(inside, on_neighbour & (err <= gap / 2 + rel_slack * a), np.abs(got) == 6)
    # The sign follows x (a value rounded to 0 may read back as -0 or +0).
    ok &= (got == 0) | (np.sign(got) == np.sign(y))
    bad = np.nonzero(~ok)
    assert not bad[0].size, (
        f"{fmt_desc}: {bad[0].size} values not rounded to a neighbour, e.g. "
        f"y={y[bad][:4]!r} got={got[bad][:4]!r}"
    )


@settings(max_examples=50, deadline=None)
@given(x=fp4_inputs(16))
def test_fp4_e2m1_error_is_at_most_half_a_scaled_grid_step(x):
    q, deq = roundtrip(x, "fp4_e2m1")
    e = np.asarray(q.scales).astype(np.int64) - 127
    blocks = x.reshape(x.shape[0], -1, 16).astype(np.float64)
    scale = np.ldexp(1.0, e)[..., None]
    y = blocks / scale
    got = deq.reshape(blocks.shape).astype(np.float64) / scale
    absmax = np.abs(blocks).max(-1)
    # The ceil scale: absmax / 2**e <= 6 (up to float32 log2 rounding, well under 1e-6),
    # and not needlessly large: above 3, unless the 1e-10 floor (e = -33) applies.
    ratio = absmax / np.ldexp(1.0, e)
    assert (ratio <= 6 * (1 + 1e-6)).all()
    assert ((ratio >= 3 * (1 - 1e-6)) | ((e == -33) & (absmax <= 6e-10 * (1 + 1e-6)))).all()
    # Just above 6 (log2 rounding) reads back as 6: treat as inside.
    y = np.where(np.abs(y) > 6, np.sign(y) * 6, y)
    _check_rounded_to_neighbour(y, got, "fp4_e2m1")


@settings(max_examples=50, deadline=None)
@given(x=fp4_inputs(32))
def test_mxfp4_error_is_at_most_half_a_scaled_grid_step_or_saturates(x):
    q, deq = roundtrip(x, "mxfp4")
    e = np.asarray(q.scales).astype(np.int64) - 127
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float64)
    scale = np.ldexp(1.0, e)[..., None]
    y = blocks / scale
    got = deq.reshape(blocks.shape).astype(np.float64) / scale
    absmax = np.abs(blocks).max(-1)
    nonzero = absmax > 0
    ratio = absmax / np.ldexp(1.0, e)
    assert ((ratio >= 4) & (ratio < 8))[nonzero].all()  # e = floor(log2 absmax) - 2
    np.testing.assert_array_equal(np.asarray(q.scales)[~nonzero], 0)
    _check_rounded_to_neighbour(y, got, "mxfp4")


@settings(max_examples=50, deadline=None)
@given(x=fp4_inputs(16), g=st.one_of(st.none(), GLOBAL_SCALES, POW2_GLOBAL_SCALES))
def test_nvfp4_error_is_at_most_half_a_scaled_grid_step_or_saturates(x, g):
    q, deq = roundtrip(x, "nvfp4", g)
    gs = np.float64(np.float32(q.global_scale))
    s = np.asarray(q.scales).astype(np.float64) * gs  # block scale * global
    blocks = x.reshape(x.shape[0], -1, 16).astype(np.float64)
    got_x = deq.reshape(blocks.shape).astype(np.float64)
    zero_scale = s == 0
    # A block scale of 0 means absmax / 6 / g rounded below e4m3's smallest step: all 0.
    assert (got_x[zero_scale] == 0).all()
    wanted = np.abs(blocks).max(-1) / 6 / gs
    assert (wanted[zero_scale] <= 2.0**-10 * (1 + 1e-6)).all()
    safe = np.where(zero_scale, 1.0, s)[..., None]
    y = blocks / safe
    got = got_x / safe
    # float32 division x / s and product code * s each round once: allow 2 ulps of slack
    # by snapping `got` to the grid point it came from.
    snapped = np.sign(got) * GRID[np.argmin(np.abs(np.abs(got)[..., None] - GRID), axis=-1)]
    assert np.allclose(snapped, got, rtol=2.0**-22, atol=0)
    y = np.where(np.abs(np.abs(y) - 6) <= 6 * 2.0**-22, np.sign(y) * 6, y)
    keep = ~zero_scale[..., None] & np.ones_like(y, bool)
    _check_rounded_to_neighbour(
        np.where(keep, y, 0), np.where(keep, snapped, 0), "nvfp4", rel_slack=2.0**-21
    )


# ----------------------------------------------------------------------------- range


HUGE = np.float32([1e38, -1e38, 3e37, 7.7e37, -5e36])


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_huge_values_up_to_1e38_stay_finite(fmt):
    x = np.zeros((2, 64), np.float32)
    x[0, : len(HUGE)] = HUGE
    x[0, 40] = 1.0
    x[1, ::3] = np.float32(-9.9e37)
    x[1, 1] = np.float32(0.5)
    _, deq = roundtrip(x, fmt)
    assert np.isfinite(deq).all(), deq
    read = deq != 0  # small values next to 1e38 in a block read back as 0
    np.testing.assert_array_equal(np.sign(deq[read]), np.sign(x[read]))
    assert deq[0, 0] > 1e37 and deq[0, 1] < -1e37 or fmt in ("fp16", "fp8_e4m3", "fp8_e5m2")


def test_huge_values_saturate_for_mxfp4_and_nvfp4_and_scale_for_fp4_e2m1():
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 1e38, -1e38, 2e37
    # mxfp4: e = floor(log2 1e38) - 2 = 124; 1e38 / 2**124 = 4.70 -> 4.
    q, deq = roundtrip(x, "mxfp4")
    assert np.asarray(q.scales)[0, 0] == 127 + 124
    assert deq[0, 0] == 4 * 2.0**124 and deq[0, 1] == -4 * 2.0**124
    # nvfp4 with g = 1: block scale clamps at 448, values saturate at +-6 * 448.
    q, deq = roundtrip(x, "nvfp4", 1.0)
    assert np.asarray(q.scales).astype(np.float32)[0, 0] == 448
    np.testing.assert_array_equal(deq[0, :3], [2688.0, -2688.0, 2688.0])
    # nvfp4, default g: no saturation, 1e38 comes back within half a step.
    q, deq = roundtrip(x, "nvfp4")
    np.testing.assert_allclose(deq[0, :2], [1e38, -1e38], rtol=1e-6)
    # fp4_e2m1: ceil(log2(1e38 / 6)) = 124; 1e38 / 2**124 = 4.70 -> 4 (< 5 threshold).
    q, deq = roundtrip(x, "fp4_e2m1")
    assert np.asarray(q.scales)[0, 0] == 127 + 124
    assert deq[0, 0] == 4 * 2.0**124


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@settings(max_examples=15, deadline=None)
@given(x=wide_float32(max_abs=1e38, allow_nonfinite=False))
def test_no_finite_input_up_to_1e38_dequantizes_to_inf(fmt, x):
    _, deq = roundtrip(x, fmt)
    assert np.isfinite(deq).all()


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS if f != "fp4_e2m1"])
def test_float32_max_stays_finite(fmt):
    big = np.finfo(np.float32).max
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, 1], x[0, 40] = big, -big, np.float32(3.1e38)
    _, deq = roundtrip(x, fmt)
    assert np.isfinite(deq).all(), deq[0, [0, 1, 40]]


def test_fp4_e2m1_largest_float32_values_do_not_dequantize_to_inf():
    """Code 4.0 under scale byte 253 is 2**128; reading it saturates to float32's max."""
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, 1] = np.float32(3.0e38), -np.finfo(np.float32).max
    q, deq = roundtrip(x, "fp4_e2m1")
    assert np.asarray(q.scales)[0, 0] == 253 and R.unpack_nibbles(np.asarray(q.data))[0, 0] == 6
    assert np.isfinite(deq).all(), deq[0, :2]


def test_fp16_saturates_instead_of_overflowing():
    x = np.zeros((1, 8), np.float32)
    x[0, :6] = [65504.0, 65519.0, 65520.0, 1e5, -1e30, -70000.0]
    q, deq = roundtrip(x, "fp16")
    np.testing.assert_array_equal(deq[0, :6], [65504, 65504, 65504, 65504, -65504, -65504])


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_nan_or_inf_stays_inside_its_block(fmt, data):
    block = get_codec(fmt).block_size or 1  # per-element formats: a "block" is one element
    x = data.draw(fp4_inputs(max(block, 16)), label="x")
    row = data.draw(st.integers(0, x.shape[0] - 1), label="row")
    col = data.draw(st.integers(0, x.shape[1] - 1), label="col")
    bad_value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="bad")
    # Baseline with that element 0: same finite amax elsewhere, so nvfp4's default
    # global scale is the same with and without the poison.
    clean = x.copy()
    clean[row, col] = 0.0
    poisoned = clean.copy()
    poisoned[row, col] = bad_value
    _, deq_clean = roundtrip(clean, fmt)
    _, deq = roundtrip(poisoned, fmt)
    assert np.isfinite(deq_clean).all()
    in_block = np.zeros(x.shape, bool)
    in_block[row, (col // block) * block : (col // block + 1) * block] = True
    np.testing.assert_array_equal(deq[~in_block], deq_clean[~in_block])
    assert np.isfinite(deq[~in_block]).all()
    if get_codec(fmt).block_size or fmt.startswith("fp8") or np.isnan(bad_value):
        assert np.isnan(deq[in_block]).all()  # FP4: the whole block; fp8: inf -> NaN
    else:
        assert deq[row, col] == bad_value  # float32 / bf16 / fp16 keep inf


# ----------------------------------------------------------------------------- layout


EXPECTED_LAYOUT = {
    # fmt: (data dtype, data last dim, scales dtype or None, scale last dim, global?)
    "fp4_e2m1": (np.uint8, 64, np.uint8, 8, False),
    "mxfp4": (np.uint8, 64, np.uint8, 4, False),
    "nvfp4": (np.uint8, 64, ml_dtypes.float8_e4m3fn, 8, True),
    "nvfp4_4over6": (np.uint8, 64, ml_dtypes.float8_e4m3fn, 8, True),
    "nvfp4_search": (np.uint8, 64, ml_dtypes.float8_e4m3fn, 8, True),
    "nvfp4_search_b8": (np.uint8, 64, ml_dtypes.float8_e4m3fn, 16, True),
    "nvfp4_search_b4": (np.uint8, 64, ml_dtypes.float8_e4m3fn, 32, True),
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, 128, None, None, True),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, 128, None, None, True),
    "float32": (np.float32, 128, None, None, False),
    "bf16": (ml_dtypes.bfloat16, 128, None, None, False),
    "fp16": (np.float16, 128, None, None, False),
}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_data_and_scale_shapes_and_dtypes(fmt):
    data_dtype, data_last, scale_dtype, scale_last, has_global = EXPECTED_LAYOUT[fmt]
    x = np.random.default_rng(0).standard_normal((2, 3, 128)).astype(np.float32)
    q = jit_quantize(fmt)(x)
    assert q.fmt == fmt
    assert q.shape == (2, 3, 128)
    assert q.data.shape == (2, 3, data_last) and q.data.dtype == data_dtype
    if scale_dtype is None:
        assert q.scales is None
    else:
        assert q.scales.shape == (2, 3, scale_last) and q.scales.dtype == scale_dtype
    if has_global:
        assert q.global_scale.shape == () and q.global_scale.dtype == np.float32
    else:
        assert q.global_scale is None
    out = jax.jit(fp4kv_jax.dequantize)(q)
    assert out.shape == (2, 3, 128) and out.dtype == np.float32
    to_bf16 = jax.jit(fp4kv_jax.dequantize, static_argnums=1)(q, jnp.bfloat16)
    assert to_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(to_bf16), np.asarray(out).astype(jnp.bfloat16))
    codec = fp4kv_jax.get_codec(fmt)
    assert codec.has_global_scale == has_global
    assert codec.block_size == (None if scale_last is None else 128 // scale_last)
    assert codec.elements_per_datum == 128 // data_last
    # Stored bytes per vector match what the arrays actually hold.
    leaves = [q.data, q.scales]
    stored = sum(np.asarray(a).nbytes for a in leaves if a is not None) // 6
    assert codec.bytes_per_vector(128) == stored


@pytest.mark.parametrize(
    "fmt,bits",
    [("fp4_e2m1", 4.5), ("mxfp4", 4.25), ("nvfp4", 4.5), ("fp8_e4m3", 8), ("fp8_e5m2", 8),
     ("bf16", 16), ("fp16", 16), ("float32", 32)],
)
def test_bits_per_element_at_head_dim_128(fmt, bits):
    codec = fp4kv_jax.get_codec(fmt)
    assert codec.bits_per_element(128) == bits
    assert codec.bytes_per_vector(128) == int(bits * 128 / 8)


def test_spec_memory_example_qwen3_235b():
    """SPEC: 94 layers, 4 KV heads, head_dim 128: bf16 192,512 B/token, fp8 96,256, fp4 54,144."""
    def per_token(fmt):
        return 2 * 94 * 4 * fp4kv_jax.get_codec(fmt).bytes_per_vector(128)

    assert per_token("bf16") == 192_512
    assert per_token("fp8_e4m3") == 96_256
    assert per_token("fp4_e2m1") == 54_144 == per_token("nvfp4")


# ----------------------------------------------------------------------------- jit / vmap


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_quantize_and_dequantize_under_jit_and_vmap(fmt):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 2, 64)) * 4).astype(np.float32)
    # The same per-row results eagerly, under jit, and under vmap over the leading axis.
    rows = [fp4kv_jax.quantize(x[i], fmt) for i in range(3)]
    expected = np.stack([np.asarray(fp4kv_jax.dequantize(q)) for q in rows])

    qv = jax.vmap(lambda r: fp4kv_jax.quantize(r, fmt))(x)
    assert qv.shape == (3, 2, 64)
    for i, q in enumerate(rows):
        np.testing.assert_array_equal(as_np(qv.data)[i], as_np(q.data))
        if q.scales is not None:
            np.testing.assert_array_equal(as_np(qv.scales)[i], as_np(q.scales))
        if q.global_scale is not None:  # vmap: one global scale per mapped row
            assert as_np(qv.global_scale)[i] == as_np(q.global_scale)
    deq_v = jax.jit(jax.vmap(fp4kv_jax.dequantize))(qv)
    np.testing.assert_array_equal(np.asarray(deq_v), expected)

    qj = jax.jit(lambda r: fp4kv_jax.quantize(r, fmt))(x[0])
    np.testing.assert_array_equal(as_np(qj.data), as_np(rows[0].data))
    np.testing.assert_array_equal(np.asarray(jax.jit(fp4kv_jax.dequantize)(qj)), expected[0])
    # jit with a traced global scale, for formats that have one.
    if fp4kv_jax.get_codec(fmt).has_global_scale:
        g = np.float32(0.375)
        qg = jax.jit(lambda r, s: fp4kv_jax.quantize(r, fmt, global_scale=s))(x[0], g)
        ref = fp4kv_jax.quantize(x[0], fmt, global_scale=g)
        np.testing.assert_array_equal(as_np(qg.data), as_np(ref.data))
        assert as_np(qg.global_scale) == g


def as_np(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a
