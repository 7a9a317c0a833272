"""nvfp4_search, nvfp4_search_b8 and nvfp4_search_b4: nvfp4 bytes whose block scales are searched over
the e4m3 grid by squared error."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4kv_jax as fk
from fp4kv_jax.formats import e2m1, get_codec

from reference_numpy import code_value, pack_nibbles

BLOCKS = {"nvfp4_search": 16, "nvfp4_search_b8": 8, "nvfp4_search_b4": 4}
E4M3_LARGEST_BITS = 0x7E  # 448


def _e2m1_codes(y):
    """float32 -> E2M1 codes, nearest-even and saturating (ml_dtypes' cast), sign where y < 0."""
    magnitude = np.minimum(np.abs(y), np.float32(6.0)).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 7
    return magnitude | np.where(y < 0, np.uint8(8), np.uint8(0))


def _numpy_search(x, g, block):
    """The search restated: nvfp4's e4m3 scale, then 1 to 4 steps up and 1 down, each
    block keeping the first candidate with the smallest fixed-point squared error."""
    b = x.reshape(*x.shape[:-1], -1, block)
    bad = ~np.isfinite(b).all(axis=-1)
    absmax = np.where(np.isfinite(b), np.abs(b), np.float32(0)).max(axis=-1)
    wanted = np.where(bad, np.float32(np.nan), np.minimum(absmax / np.float32(6) / g, np.float32(448)))
    nearest = wanted.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int64)
    searched = ~bad & (nearest > 0)
    best_codes = best_bits = best_error = None
    for step in (0, 1, 2, 3, 4, -1):
        bits = np.where(searched, np.clip(nearest + step, 1, E4M3_LARGEST_BITS), nearest).astype(np.uint8)
        denom = (bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * g).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.where(denom[..., None] > 0, b / denom[..., None], np.float32(0)).astype(np.float32)
        y = np.where(bad[..., None], np.float32(0), y)
        codes = np.where(bad[..., None], np.uint8(0), _e2m1_codes(y))
        miss = np.minimum(np.abs(y - code_value(codes)), np.float32(1))
        units = (miss * np.float32(4096)).astype(np.int64)
        error = np.float32(np.sum(units * units, axis=-1)).astype(np.float32) * denom * denom
        if best_error is None:
            best_codes, best_bits, best_error = codes, bits, error
            continue
        better = error < best_error
        best_codes = np.where(better[..., None], codes, best_codes)
        best_bits = np.where(better, bits, best_bits)
        best_error = np.where(better, error, best_error)
    return pack_nibbles(best_codes.reshape(x.shape)), best_bits


def _keys_like(seed, rows=24, d=128):
    """Normals with outlier channels, a zero block and a block holding NaN."""
    x = np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)
    x[:, [3, 40, 77]] *= 9.0
    x[1, 16:32] = 0.0
    x[2, 50] = np.nan
    return x


@pytest.mark.parametrize("fmt", list(BLOCKS))
def test_bytes_match_an_independent_restatement_of_the_search(fmt):
    x = _keys_like(0)
    g = np.float32(0.004)
    q = fk.quantize(x, fmt, global_scale=g)
    packed, scale_bits = _numpy_search(x, g, BLOCKS[fmt])
    np.testing.assert_array_equal(np.asarray(q.data), packed)
    np.testing.assert_array_equal(np.asarray(q.scales).view(np.uint8), scale_bits)


def _block_squared_errors(x, q, block):
    miss = np.asarray(fk.dequantize(q), np.float64) - x.astype(np.float64)
    return np.sum(miss.reshape(*x.shape[:-1], -1, block) ** 2, axis=-1)


@pytest.mark.parametrize("fmt", list(BLOCKS))
def test_no_block_errs_more_than_under_nvfp4s_own_scale_and_the_whole_errs_less(fmt):
    x = jax.random.normal(jax.random.key(1), (32, 128)) * jnp.linspace(0.1, 8.0, 128)
    g = get_codec("nvfp4").global_scale_for(x)
    codec, block = get_codec(fmt), BLOCKS[fmt]
    own = codec.encode_blocks(e2m1.split_planes(x), g, e2m1.MAX_MAGNITUDE, ptx=False)  # nvfp4's rule
    own = fk.QuantizedTensor(own.packed.reshape(32, 64), own.scale, g, fmt)
    searched = fk.quantize(x, fmt, global_scale=g)
    own_error = _block_squared_errors(np.asarray(x), own, block)
    searched_error = _block_squared_errors(np.asarray(x), searched, block)
    # Misses truncated to 2**-12 of a scale may rank two near-equal candidates wrongly.
    assert np.all(searched_error <= own_error * (1 + 1e-3) + 1e-12)
    changed = np.asarray(searched.scales.astype(jnp.float32) != own.scales.astype(jnp.float32))
    assert 0.2 < changed.mean() < 0.95  # the search moves many scales, not all
    assert searched_error.mean() < 0.85 * own_error.mean()


def test_the_bytes_decode_as_nvfp4_and_non_finite_blocks_stay_visible():
    x = jax.random.normal(jax.random.key(2), (2, 64)).at[1, 20].set(jnp.inf)
    q = fk.quantize(x, "nvfp4_search")
    as_nvfp4 = fk.dequantize(fk.QuantizedTensor(q.data, q.scales, q.global_scale, "nvfp4"))
    out = np.asarray(fk.dequantize(q))
    np.testing.assert_array_equal(out, np.asarray(as_nvfp4))
    assert np.all(np.isnan(out[1, 16:32])) and np.all(np.isfinite(np.delete(out[1], np.s_[16:32])))
