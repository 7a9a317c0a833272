"""The KV cache pytree: allocation, writes at per-sequence lengths, reads, refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import cache as C
from fp4kv_jax import dequantize, format_names, quantize
from fp4kv_jax.kernels.decode_attention import decode_attention
from fp4kv_jax.kernels.prefill_attention import prefill_attention
from fp4kv_jax.models.configs import ModelConfig

TINY = ModelConfig(
    architecture="gpt_oss",
    vocab_size=32,
    hidden_size=64,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=4,
)


# One compile a chunk shape, not one an op: eager writes dominate these small tests.
_update = jax.jit(C.update)


def _kv(key, batch, tokens):
    return jax.random.normal(jax.random.key(key), (batch, tokens, TINY.num_kv_heads, TINY.head_dim))


@pytest.mark.parametrize("fmt", format_names())
def test_write_then_read_matches_quantized_values_at_each_sequence_length(fmt):
    cache = C.init_cache(TINY, batch_size=2, max_len=8, cache_dtype=fmt)
    first, second = _kv(0, 2, 3), _kv(1, 2, 2)
    cache = _update(cache, [first] * 2, [first] * 2, num_tokens=jnp.array([3, 1]))
    cache = _update(cache, [second] * 2, [-second] * 2)
    np.testing.assert_array_equal(cache.lengths, [5, 3])

    k, v, positions = jax.jit(C.read_layer, static_argnums=1)(cache, 1)
    np.testing.assert_array_equal(positions[1], [0, 1, 2, -1, -1, -1, -1, -1])
    global_scale = cache.layers[1].k.global_scale
    stored = jax.jit(lambda x: dequantize(quantize(x, fmt, global_scale=global_scale)))

    # Sequence 1 kept 1 token of the first chunk, so the second chunk starts at slot 1.
    np.testing.assert_array_equal(k[1, :, 0], stored(first[1, 0]))
    np.testing.assert_array_equal(k[1, :, 1:3], stored(second[1]).swapaxes(0, 1))
    np.testing.assert_array_equal(v[0, :, 3:5], stored(-second[0]).swapaxes(0, 1))


def test_physical_layout_is_head_major_packed_with_block_scales():
    cache = C.init_cache(TINY, batch_size=3, max_len=8, cache_dtype="fp4_e2m1")
    layer = cache.layers[0]
    assert layer.k.data.shape == (3, 2, 8, 16) and layer.k.data.dtype == jnp.uint8
    assert layer.k.scales.shape == (3, 2, 8, 2) and layer.k.scales.dtype == jnp.uint8
    nv = C.init_cache(TINY, batch_size=3, max_len=8, cache_dtype="nvfp4").layers[0]
    assert nv.k.scales.dtype == jnp.float8_e4m3fn and nv.k.global_scale.shape == ()


def test_trimmed_sliding_layer_is_a_ring_holding_the_last_window_positions():
    cache = C.init_cache(TINY, 1, max_len=16, cache_dtype="float32", trim_sliding_layers=True)
    assert [lc.capacity for lc in cache.layers] == [4, 16]
    x = _kv(2, 1, 6)
    cache = C.update(cache, [x] * 2, [x] * 2)
    k, _, positions = C.read_layer(cache, 0)
    np.testing.assert_array_equal(positions[0], [4, 5, 2, 3])
    np.testing.assert_array_equal(k[0, :, 0], x[0, 4])
    np.testing.assert_array_equal(k[0, :, 3], x[0, 3])


def test_update_under_jit_with_donation_matches_eager():
    cache = C.init_cache(TINY, 2, 8, "fp4_e2m1")
    x = _kv(3, 2, 1)
    eager = C.update(cache, [x] * 2, [x] * 2)
    step = jax.jit(lambda c, x: C.update(c, [x] * 2, [x] * 2), donate_argnums=0)
    jitted = step(C.init_cache(TINY, 2, 8, "fp4_e2m1"), x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


def test_overflow_is_refused_eagerly_and_flagged_under_jit():
    cache = C.update(C.init_cache(TINY, 1, 4, "bf16"), [_kv(4, 1, 3)] * 2, [_kv(4, 1, 3)] * 2)
    with pytest.raises(C.CacheOverflowError, match="max_len=4"):
        C.update(cache, [_kv(5, 1, 2)] * 2, [_kv(5, 1, 2)] * 2)
    with pytest.raises(C.CacheOverflowError, match="chunk of 5 tokens"):
        jax.jit(lambda c, x: C.update(c, [x] * 2, [x] * 2))(cache, _kv(6, 1, 5))

    before = C.read_layer(cache, 1)[0]
    step = jax.jit(lambda c, x: C.update(c, [x] * 2, [x] * 2))
    after = step(cache, _kv(7, 1, 2))
    assert bool(after.overflowed)
    # The token that fits is written; the one past max_len is dropped, not clamped.
    np.testing.assert_array_equal(C.read_layer(after, 1)[0][0, :, :3], before[0, :, :3])
    with pytest.raises(C.CacheOverflowError):
        C.check_cache(after)


def test_nonfinite_values_set_the_flag():
    x = _kv(8, 1, 2).at[0, 1, 0, 5].set(jnp.nan)
    cache = jax.jit(lambda c: C.update(c, [x] * 2, [x] * 2))(C.init_cache(TINY, 1, 4, "fp4_e2m1"))
    assert bool(cache.nonfinite)
    with pytest.raises(C.NonFiniteKVError):
        C.check_cache(cache)


def test_keys_and_values_may_take_different_formats():
    cache = C.init_cache(TINY, batch_size=1, max_len=4, cache_dtype="nvfp4", value_dtype="bf16")
    assert [(lc.k.fmt, lc.v.fmt) for lc in cache.layers] == [("nvfp4", "bf16")] * 2
    x = _kv(2, 1, 3)
    cache = C.update(cache, [x] * 2, [x] * 2)
    k, v, _ = C.read_layer(cache, 0)
    np.testing.assert_array_equal(v[0, :, :3], x[0].swapaxes(0, 1).astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(k[0, :, :3], v[0, :, :3])  # the keys went through nvfp4
    q = jnp.ones((1, TINY.num_heads, TINY.head_dim))
    with pytest.raises(ValueError, match="layer: keys stored as 'nvfp4' and values as 'bf16'"):
        decode_attention(q, cache.layers[0], cache.lengths, implementation="pallas_triton")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cache_dtype="int4"), "cache_dtype: unknown cache format 'int4'; valid formats"),
        (dict(key_dtype="fp3"), "key_dtype: unknown cache format 'fp3'"),
        (dict(bf16_layers=(2,)), r"bf16_layers: \[2\] are not layers of a 2-layer model"),
        (dict(max_len=0), "max_len"),
        (dict(cache_dtype=["bf16"]), "per-layer list needs 2 entries"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(config=TINY, batch_size=1, max_len=4, cache_dtype="bf16") | kwargs
    with pytest.raises(ValueError, match=match):
        C.init_cache(**args)


def test_head_dim_not_a_block_multiple_is_refused():
    odd = dataclasses.replace(TINY, head_dim=24)
    with pytest.raises(ValueError, match="head_dim: format 'mxfp4' needs .* multiple of 32"):
        C.init_cache(odd, 1, 4, "mxfp4")


def test_wrong_shape_or_dtype_of_new_keys_is_refused():
    cache = C.init_cache(TINY, 1, 4, "bf16")
    with pytest.raises(ValueError, match="k: expected shape"):
        C.write_layer(cache, 0, jnp.zeros((1, 1, 3, 32)), jnp.zeros((1, 1, 3, 32)))
    with pytest.raises(TypeError, match="v: expected a floating-point"):
        C.write_layer(cache, 0, jnp.zeros((1, 1, 2, 32)), jnp.zeros((1, 1, 2, 32), jnp.int32))


def test_global_scales_are_settable_only_on_an_empty_cache():
    cache = C.init_cache(TINY, 1, 4, "fp8_e4m3")
    scaled = C.set_global_scales(cache, [2.0, 3.0], [4.0, 5.0])
    assert float(scaled.layers[1].v.global_scale) == 5.0
    x = _kv(9, 1, 1) * 200  # past e4m3's 448 in places, unless divided by the scale 2
    stored = C.read_layer(C.update(scaled, [x] * 2, [x] * 2), 0)[0]
    np.testing.assert_allclose(stored[0, :, 0], x[0, 0], rtol=0.07)
    with pytest.raises(ValueError, match="empty cache"):
        C.set_global_scales(C.update(cache, [x] * 2, [x] * 2), [1.0, 1.0], [1.0, 1.0])


def test_rotated_keys_and_values_read_back_as_written_and_leave_attention_unchanged():

    k, v = _kv(2, 2, 6), _kv(3, 2, 6)
    q = jax.random.normal(jax.random.key(4), (2, TINY.num_heads, TINY.head_dim))
    plain = C.update(C.init_cache(TINY, 2, 8, "float32"), [k] * 2, [v] * 2)
    rotated = C.init_cache(TINY, 2, 8, "float32", rotate_keys=True, rotate_values=True)
    rotated = C.update(rotated, [k] * 2, [v] * 2)
    assert rotated.layers[1].keys_rotated and rotated.layers[1].values_rotated
    for stored, written in ((rotated.layers[1].k, k), (rotated.layers[1].v, v)):
        assert not np.allclose(dequantize(stored)[:, :, :6], written.swapaxes(1, 2), atol=1e-3)
    for read, expected in zip(C.read_layer(rotated, 1), C.read_layer(plain, 1)):
        np.testing.assert_allclose(read, expected, atol=1e-5)
    for layer in (0, 1):
        np.testing.assert_allclose(
            decode_attention(q, rotated.layers[layer], rotated.lengths, implementation="reference"),
            decode_attention(q, plain.layers[layer], plain.lengths, implementation="reference"),
            atol=1e-5,
        )


def test_rotation_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="head_dim: the Hadamard rotation needs a power of two, got 24"):
        C.init_cache(dataclasses.replace(TINY, head_dim=24), 1, 4, "bf16", rotate_keys=True)


def test_kept_buffers_hold_the_first_and_the_newest_positions_in_bf16():
    cache = C.init_cache(TINY, 2, 32, "fp4_e2m1", keep_first=2, keep_recent=3)
    x = _kv(3, 2, 9)
    cache = _update(cache, [x[:, :5]] * 2, [2 * x[:, :5]] * 2, num_tokens=np.array([5, 4]))
    cache = _update(cache, [x[:, 5:]] * 2, [2 * x[:, 5:]] * 2, num_tokens=np.array([4, 1]))
    kept = np.asarray(cache.layers[1].kept_k, np.float32)  # [B, Hkv, 2 + 3, D]
    expected = np.asarray(x.astype(jnp.bfloat16), np.float32).transpose(0, 2, 1, 3)
    # Sequence 0 holds positions 0..8: first 0, 1; ring slots 2 + p % 3 for p = 6, 7, 8.
    for slot, position in [(0, 0), (1, 1), (2, 6), (3, 7), (4, 8)]:
        np.testing.assert_array_equal(kept[0, :, slot], expected[0, :, position])
    # Sequence 1 holds 0..4 (its second chunk's only real token is x[1, 5], at 4).
    np.testing.assert_array_equal(kept[1, :, 2 + 4 % 3], expected[1, :, 5])
    np.testing.assert_array_equal(kept[1, :, 2 + 3 % 3], expected[1, :, 3])


def test_kept_buffers_in_fp8_hold_the_positions_rounded_to_e4m3_and_saturated():
    cache = C.init_cache(TINY, 1, 16, "nvfp4", keep_first=1, keep_recent=2, kept_dtype="fp8_e4m3")
    x = _kv(4, 1, 3).at[0, 2, 0, 0].set(1000.0)  # past e4m3's largest finite value, 448
    cache = _update(cache, [x] * 2, [x] * 2)
    kept = cache.layers[0].kept_k
    assert kept.dtype == jnp.float8_e4m3fn
    expected = np.asarray(x.astype(jnp.float8_e4m3fn), np.float32).transpose(0, 2, 1, 3)
    expected[0, 0, 2, 0] = 448.0
    # Slot 0 holds position 0; ring slots 1 + p % 2 hold positions 1 and 2.
    for slot, position in [(0, 0), (1 + 1 % 2, 1), (1 + 2 % 2, 2)]:
        np.testing.assert_array_equal(np.asarray(kept[0, :, slot], np.float32), expected[0, :, position])


def test_kept_positions_are_refused_where_they_cannot_be_honoured():
    with pytest.raises(ValueError, match="kept_dtype: unknown 'fp16'; valid: bf16, fp8_e4m3"):
        C.init_cache(TINY, 1, 8, "nvfp4", keep_recent=4, kept_dtype="fp16")
    with pytest.raises(ValueError, match="kept_dtype: per_channel_keys quantizes its key blocks"):
        C.init_cache(TINY, 1, 8, "nvfp4", keep_recent=16, per_channel_keys=True, kept_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="keep_recent: expected a non-negative int"):
        C.init_cache("smollm2-135m", 1, 8, "nvfp4", keep_recent=-1)
    with pytest.raises(ValueError, match="keep_first, keep_recent: full-precision positions are not kept in trimmed"):
        C.init_cache("tests/fixtures/gpt_oss", 1, 64, "nvfp4", trim_sliding_layers=True, keep_recent=4)


def test_centered_keys_and_values_read_back_as_written_and_leave_attention_without_sinks_unchanged():
    k, v = _kv(5, 2, 6) + 3.0, _kv(6, 2, 6) - 2.0  # common offsets, which centering removes
    q = jax.random.normal(jax.random.key(7), (2, TINY.num_heads, TINY.head_dim))
    plain = C.update(C.init_cache(TINY, 2, 8, "float32"), [k] * 2, [v] * 2, num_tokens=jnp.array([6, 4]))
    centered = C.init_cache(TINY, 2, 8, "float32", center_keys=True, center_values=True, rotate_values=True)
    centered = C.update(centered, [k] * 2, [v] * 2, num_tokens=jnp.array([6, 4]))
    # Each sequence's means are over its real tokens only.
    np.testing.assert_allclose(centered.layers[0].key_mean[1], k[1, :4].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(centered.layers[0].value_mean[1], v[1, :4].mean(axis=0), atol=1e-6)
    for read, expected in zip(C.read_layer(centered, 1)[:2], C.read_layer(plain, 1)[:2]):
        np.testing.assert_allclose(read[:, :, :4], expected[:, :, :4], atol=1e-5)
    for layer in (0, 1):
        np.testing.assert_allclose(
            decode_attention(q, centered.layers[layer], centered.lengths, implementation="reference"),
            decode_attention(q, plain.layers[layer], plain.lengths, implementation="reference"),
            atol=1e-5,
        )
    # A prefill attending to the chunk's own full-precision K/V centers them the same way.
    chunk_q = jax.random.normal(jax.random.key(8), (2, 6, TINY.num_heads, TINY.head_dim))
    start, full = jnp.zeros(2, jnp.int32), dict(chunk_k=k, chunk_v=v, implementation="reference")
    np.testing.assert_allclose(
        prefill_attention(chunk_q, centered.layers[1], start, **full),
        prefill_attention(chunk_q, plain.layers[1], start, **full),
        atol=1e-5,
    )


def test_the_mean_key_is_the_first_chunks_and_centering_cuts_the_fp4_key_error():
    k = _kv(8, 1, 8) * 0.3 + jnp.linspace(-4.0, 4.0, TINY.head_dim)  # channels offset far from 0
    centered = C.init_cache(TINY, 1, 8, "nvfp4", center_keys=True)
    centered = _update(centered, [k[:, :5]] * 2, [k[:, :5]] * 2)
    centered = _update(centered, [k[:, 5:]] * 2, [k[:, 5:]] * 2)
    np.testing.assert_allclose(centered.layers[0].key_mean[0], k[0, :5].mean(axis=0), atol=1e-6)
    plain = _update(C.init_cache(TINY, 1, 8, "nvfp4"), [k] * 2, [k] * 2)
    written = k.swapaxes(1, 2)
    error = lambda cache: float(jnp.linalg.norm(C.read_layer(cache, 1)[0] - written))
    assert error(centered) < 0.5 * error(plain)


def test_centered_keys_are_refused_with_sinks_and_with_per_channel_keys():
    cache = C.update(C.init_cache(TINY, 1, 8, "nvfp4", center_keys=True), [_kv(9, 1, 3)] * 2, [_kv(9, 1, 3)] * 2)
    q = jnp.ones((1, TINY.num_heads, TINY.head_dim))
    with pytest.raises(ValueError, match="sinks: the layer stores centered keys or values"):
        decode_attention(q, cache.layers[1], cache.lengths, sinks=jnp.zeros(TINY.num_heads))
    with pytest.raises(ValueError, match="center_keys, center_values: not combined with per_channel_keys"):
        C.init_cache(TINY, 1, 8, "nvfp4", center_values=True, per_channel_keys=True, keep_recent=16)
