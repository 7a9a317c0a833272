"""decode_attention: the Pallas kernel (interpret mode on CPU) against the float32
reference, and the reference against float64 numpy softmax attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import cache as C
from fp4kv_jax.kernels.decode_attention import decode_attention, pallas_mosaic, pallas_mosaic_warp

from attention_inputs import compiled_once, jitted, one_layer_config, realistic_keys, relative_error


@compiled_once
def _filled_cache(seed, fmt, heads, kv_heads, head_dim, lengths, max_len, window=None, trim=False):
    config = one_layer_config(heads, kv_heads, head_dim, window)
    batch = len(lengths)
    keys = jax.random.split(jax.random.key(seed), 3)
    k = realistic_keys(keys[0], (batch, max_len, kv_heads, head_dim))
    v = jax.random.normal(keys[1], (batch, max_len, kv_heads, head_dim))
    cache = C.init_cache(config, batch, max_len, fmt, trim_sliding_layers=trim)
    cache = C.update(cache, [k], [v], num_tokens=jnp.asarray(lengths))
    q = jax.random.normal(keys[2], (batch, heads, head_dim), jnp.bfloat16)
    return cache, q


CASES = [
    # fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks
    ("fp4_e2m1", 8, 1, 64, [1, 37, 80], 80, None, False),  # MQA, length 1, ragged
    ("fp4_e2m1", 16, 1, 128, [50, 3], 50, 16, True),  # group 16, window, sinks
    ("nvfp4", 4, 2, 128, [33, 64], 64, None, True),
    ("mxfp4", 6, 3, 64, [70, 17], 72, 20, False),  # group 2
    ("nvfp4_search_b8", 4, 2, 128, [29, 48], 48, None, True),  # blocks of 8
    ("nvfp4_search_b4", 4, 2, 64, [23, 40], 40, None, False),  # blocks of 4
    ("fp8_e4m3", 8, 2, 64, [40, 9], 45, None, False),
    ("fp8_e5m2", 4, 4, 64, [12, 30], 30, 8, True),  # group 1
    ("bf16", 12, 3, 128, [1, 55], 55, None, False),
    ("fp16", 8, 2, 64, [21, 64], 64, None, True),
    ("float32", 8, 4, 64, [33, 5], 40, None, False),
]


@pytest.mark.parametrize("fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks", CASES)
def test_pallas_kernel_matches_reference(fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks):
    cache, q = _filled_cache(len(lengths) * max_len + heads, fmt, heads, kv_heads, head_dim, lengths, max_len, window)
    if fmt == "float32":  # a lossless cache: check the kernel's math, not bf16 output rounding
        q = q.astype(jnp.float32)
    sink_logits = jnp.linspace(-2.0, 3.0, heads) if sinks else None
    layer, lengths = cache.layers[0], cache.lengths
    ref = jitted(decode_attention, q, layer, lengths, sinks=sink_logits, implementation="reference")
    out = jitted(
        decode_attention, q, layer, lengths, sinks=sink_logits, implementation="pallas_triton", block_k=16,
        num_splits=3,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))  # every element written
    tolerance = 1e-5 if fmt == "float32" else 1e-2
    assert relative_error(out, ref) < tolerance


MOSAIC_CASES = [
    # fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks
    ("fp4_e2m1", 8, 1, 64, [1, 100, 64], 128, None, False),  # MQA, length 1, ragged
    ("nvfp4", 32, 2, 128, [70, 3], 128, 20, True),  # group 16, window, sinks
    ("mxfp4", 6, 6, 128, [128, 65], 128, None, True),  # group 1
    ("nvfp4_search_b8", 4, 2, 64, [90, 7], 128, None, False),  # blocks of 8
    ("nvfp4_search_b4", 4, 2, 128, [66], 128, None, False),  # blocks of 4
]


@pytest.mark.parametrize("fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks", MOSAIC_CASES)
def test_mosaic_kernel_matches_reference(fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks):
    cache, q = _filled_cache(len(lengths) + heads, fmt, heads, kv_heads, head_dim, lengths, max_len, window)
    sink_logits = jnp.linspace(-2.0, 3.0, heads) if sinks else None
    layer, lengths = cache.layers[0], cache.lengths
    ref = jitted(decode_attention, q, layer, lengths, sinks=sink_logits, implementation="reference")
    out = jitted(decode_attention, q, layer, lengths, sinks=sink_logits, implementation="pallas_mosaic", num_splits=2)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert relative_error(out, ref) < 1e-2


def _empty_cache(fmt, head_dim, max_len):
    """An empty one-layer cache of 4 query heads over 2 KV heads, and a q of zeros:
    enough for the checks that refuse before any work."""
    cache = C.init_cache(one_layer_config(4, 2, head_dim), 1, max_len, fmt)
    return cache, jnp.zeros((1, 4, head_dim), jnp.bfloat16)


def test_mosaic_kernel_refuses_what_it_does_not_handle():
    cache, q = _empty_cache("fp8_e4m3", 64, 64)
    with pytest.raises(ValueError, match="'pallas_mosaic' handles nvfp4_search_b4, nvfp4_search_b8, fp4_e2m1, nvfp4, nvfp4_4over6, nvfp4_search, mxfp4, not 'fp8_e4m3'; use 'pallas_triton'"):
        decode_attention(q, cache.layers[0], cache.lengths, implementation="pallas_mosaic")
    cache, q = _empty_cache("nvfp4", 64, 48)
    with pytest.raises(ValueError, match="capacity that is a multiple of 64, got 48"):
        decode_attention(q, cache.layers[0], cache.lengths, implementation="pallas_mosaic")


def _ring_and_full_caches(seed, **kwargs):
    """(expected output over the untrimmed cache, the trimmed cache's ring layer, q, lengths)."""
    full, q = _filled_cache(seed, **kwargs)
    ring, _ = _filled_cache(seed, **kwargs, trim=True)
    assert ring.layers[0].ring and ring.layers[0].capacity == kwargs["window"]
    expected = jitted(decode_attention, q, full.layers[0], full.lengths, implementation="reference")
    return expected, ring.layers[0], q, ring.lengths


def test_ring_buffer_layer_matches_the_untrimmed_cache():
    kwargs = dict(fmt="fp4_e2m1", heads=4, kv_heads=2, head_dim=64, lengths=[45, 20], max_len=48, window=16)
    expected, layer, q, lengths = _ring_and_full_caches(5, **kwargs)
    reference = jitted(decode_attention, q, layer, lengths, implementation="reference")
    kernel = jitted(decode_attention, q, layer, lengths, implementation="pallas_triton", block_k=16)
    assert relative_error(reference, expected) < 1e-5
    assert relative_error(kernel, expected) < 1e-2


def _numpy_attention(q, k, v, lengths, sm_scale, window, sinks):
    """float64 softmax attention over dequantized [B, Hkv, S, D] keys and values."""
    batch, heads, _ = q.shape
    group = heads // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(batch):
        lo = 0 if window is None else max(0, lengths[b] - window)
        for h in range(heads):
            keys, values = k[b, h // group, lo : lengths[b]], v[b, h // group, lo : lengths[b]]
            logits = keys @ q[b, h] * sm_scale
            peak = max(logits.max(), sinks[h]) if sinks is not None else logits.max()
            weights = np.exp(logits - peak)
            total = weights.sum() + (np.exp(sinks[h] - peak) if sinks is not None else 0.0)
            out[b, h] = weights @ values / total
    return out


@pytest.mark.parametrize("window, sinks", [(None, None), (7, np.linspace(-1.0, 2.0, 8))])
def test_reference_matches_float64_numpy(window, sinks):
    cache, q = _filled_cache(9, "nvfp4", 8, 2, 64, [25, 1], 32, window)
    k, v, _ = C.read_layer(cache, 0)
    lengths = np.asarray(cache.lengths)
    q64 = np.asarray(q, np.float64)
    expected = _numpy_attention(q64, np.asarray(k, np.float64), np.asarray(v, np.float64),
                                lengths, 0.125, window, sinks)
    out = jitted(decode_attention, q.astype(jnp.float32), cache.layers[0], cache.lengths,
                           sinks=None if sinks is None else jnp.asarray(sinks), implementation="reference")
    assert relative_error(out, expected) < 1e-5


def test_bad_arguments_are_named():
    cache, q = _filled_cache(1, "bf16", 4, 2, 64, [3], 8)
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="implementation: unknown 'cuda'; valid: reference, pallas_triton, pallas_mosaic"):
        decode_attention(q, layer, cache.lengths, implementation="cuda")
    with pytest.raises(ValueError, match="q: 3 heads is not a multiple of the 2 KV heads"):
        decode_attention(q[:, :3], layer, cache.lengths)
    with pytest.raises(ValueError, match="sinks: expected shape"):
        decode_attention(q, layer, cache.lengths, sinks=jnp.zeros(3))
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q[..., :32], layer, cache.lengths)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt, implementation",
    [(fmt, "pallas_triton") for fmt in ("bf16", "fp8_e4m3", "fp4_e2m1", "nvfp4", "mxfp4", "nvfp4_search_b8", "nvfp4_search_b4")]
    + [(fmt, "pallas_mosaic") for fmt in ("fp4_e2m1", "nvfp4", "mxfp4", "nvfp4_search_b8", "nvfp4_search_b4")]
    + [(fmt, "pallas_mosaic_warp") for fmt in ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nvfp4", "mxfp4")],
)
def test_compiled_kernel_matches_reference_on_gpu(fmt, implementation):
    cache, q = _filled_cache(3, fmt, 64, 8, 128, [1, 1000, 333, 4096], 4096, None)
    sinks = jnp.linspace(-1.0, 1.0, 64)
    ref = decode_attention(q, cache.layers[0], cache.lengths, sinks=sinks, implementation="reference")
    out = decode_attention(q, cache.layers[0], cache.lengths, sinks=sinks, implementation=implementation)
    assert relative_error(out, ref) < 1e-2


# Blocks of 8 are left to the other kernels (test_warp_kernel_leaves_blocks_of_8_to_the_other_kernels).
WARP_CASES = [case for case in MOSAIC_CASES if case[0] in pallas_mosaic_warp.SUPPORTED_FORMATS] + [
    # fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks
    ("fp4_e2m1", 64, 8, 128, [1000, 33, 1, 4096], 4096, None, True),  # the target's group of 8
    ("nvfp4", 16, 1, 64, [5, 300], 320, 100, False),  # MQA of 16, head_dim 64, window
    ("mxfp4", 24, 8, 64, [129, 64], 160, None, False),  # group 3
    # FP8 and 16-bit layers: f16 and bf16 operands.
    ("fp8_e4m3", 64, 8, 128, [1000, 33, 1, 4096], 4096, None, True),
    ("fp8_e5m2", 16, 1, 64, [5, 300], 320, 100, False),
    ("bf16", 32, 2, 128, [70, 3], 128, 20, True),
    ("fp16", 24, 8, 64, [129, 64], 160, None, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks", WARP_CASES)
def test_warp_kernel_matches_reference_on_gpu(fmt, heads, kv_heads, head_dim, lengths, max_len, window, sinks):
    cache, q = _filled_cache(len(lengths) + heads + 7, fmt, heads, kv_heads, head_dim, lengths, max_len, window)
    sink_logits = jnp.linspace(-2.0, 3.0, heads) if sinks else None
    layer, lengths = cache.layers[0], cache.lengths
    ref = decode_attention(q, layer, lengths, sinks=sink_logits, implementation="reference")
    # One split normalizes in the kernel; more are merged outside it.
    tunings = (
        dict(), dict(num_splits=1, prefetch=0, block=16), dict(num_splits=3, prefetch=1, block=32),
        dict(num_splits=2, warpgroups=1, prefetch=2),
    )
    for tuning in tunings:
        out = decode_attention(q, layer, lengths, sinks=sink_logits, implementation="pallas_mosaic_warp", **tuning)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        assert relative_error(out, ref) < 1e-2, tuning


def test_warp_kernel_leaves_blocks_of_8_to_the_other_kernels():
    # A warp lane's 16 value columns need one block scale; decode_attention's GPU default
    # is then pallas_mosaic.
    cache, _ = _empty_cache("nvfp4_search_b8", 128, 64)
    with pytest.raises(ValueError, match="'pallas_mosaic_warp' handles .*, not 'nvfp4_search_b8'"):
        pallas_mosaic_warp.check_supported(cache.layers[0].k, group=2)


@pytest.mark.gpu
def test_warp_kernel_reads_a_ring_buffer_layer():
    kwargs = dict(fmt="nvfp4", heads=8, kv_heads=2, head_dim=128, lengths=[200, 150], max_len=200, window=64)
    expected, layer, q, lengths = _ring_and_full_caches(6, **kwargs)
    kernel = decode_attention(q, layer, lengths, implementation="pallas_mosaic_warp")
    assert relative_error(kernel, expected) < 1e-2


def test_warp_kernel_refuses_to_run_without_a_gpu():
    cache, q = _empty_cache("nvfp4", 64, 64)
    with jax.default_device(jax.devices("cpu")[0]):
        with pytest.raises(ValueError, match="'pallas_mosaic_warp' runs on GPUs only"):
            decode_attention(q, cache.layers[0], cache.lengths, implementation="pallas_mosaic_warp")


@pytest.mark.parametrize("fmt, head_dim, capacity, kernel", [
    ("nvfp4", 64, 64, "pallas_mosaic_warp"),
    ("nvfp4_search_b8", 128, 64, "pallas_mosaic"),  # blocks the warp kernel refuses
    ("nvfp4_search_b4", 64, 64, "pallas_mosaic"),
    ("nvfp4", 64, 48, "pallas_triton"),  # a capacity neither Mosaic kernel takes
    ("float32", 64, 64, "pallas_triton"),
])
def test_gpu_default_takes_the_first_kernel_that_handles_the_layer(monkeypatch, fmt, head_dim, capacity, kernel):
    from fp4kv_jax.kernels import decode_attention as op

    monkeypatch.setattr(op.tiles, "default_attention_implementation", lambda layer: "pallas_triton")  # as on a GPU
    cache, q = _empty_cache(fmt, head_dim, capacity)
    assert op._default_implementation(q, cache.layers[0]) == kernel


@pytest.mark.gpu
def test_gpu_default_is_the_warp_kernel_else_the_mosaic_kernel_where_they_handle_the_layer():
    from fp4kv_jax.kernels.decode_attention import _default_implementation

    for fmt, head_dim, kernel in (
        ("nvfp4", 64, "pallas_mosaic_warp"), ("nvfp4", 128, "pallas_mosaic_warp"),
        ("fp8_e4m3", 128, "pallas_mosaic_warp"), ("bf16", 64, "pallas_mosaic_warp"),
        ("nvfp4_search_b8", 128, "pallas_mosaic"), ("nvfp4_search_b4", 64, "pallas_mosaic"),
    ):
        cache, q = _filled_cache(4, fmt, 16, 2, head_dim, [200, 7], 256, None)
        assert _default_implementation(q, cache.layers[0]) == kernel
        ref = decode_attention(q, cache.layers[0], cache.lengths, implementation="reference")
        assert relative_error(decode_attention(q, cache.layers[0], cache.lengths), ref) < 1e-2
    f32, q = _filled_cache(4, "float32", 16, 2, 128, [200, 7], 256, None)
    odd, q_odd = _filled_cache(4, "nvfp4", 16, 2, 128, [20, 7], 48, None)  # capacity not a multiple of 32
    assert _default_implementation(q, f32.layers[0]) == "pallas_triton"
    assert _default_implementation(q_odd, odd.layers[0]) == "pallas_triton"


@pytest.mark.gpu
def test_a_cpu_default_device_on_a_gpu_machine_takes_the_reference():
    from fp4kv_jax.kernels import tiles

    cache, _ = _filled_cache(4, "nvfp4", 8, 2, 128, [10], 64, None)
    assert tiles.on_gpu() and tiles.default_implementation(cache.layers[0].k) == "pallas_triton"
    with jax.default_device(jax.devices("cpu")[0]):
        assert not tiles.on_gpu()
        assert tiles.default_implementation(cache.layers[0].k) == "reference"


@pytest.mark.gpu
def test_compiled_kernels_refuse_a_head_dim_they_are_not_checked_at():
    cache, q = _filled_cache(4, "nvfp4", 4, 2, 16, [10], 64, None)
    with pytest.raises(ValueError, match="layer: head_dim 16; the compiled Pallas kernels take multiples of 64"):
        decode_attention(q, cache.layers[0], cache.lengths, implementation="pallas_triton")
    assert decode_attention(q, cache.layers[0], cache.lengths).shape == q.shape  # the default: reference


ROTATED = dict(rotate_keys=True, rotate_values=True)
KEPT_CASES = [
    # fmt, keep_first, keep_recent, lengths (some below the kept counts), window, sinks, frame
    ("nvfp4", 4, 16, [70, 9, 1], None, True, dict(kept_dtype="fp8_e4m3", **ROTATED)),  # fp8 kept copies
    ("mxfp4", 0, 32, [64, 40, 20], None, False, dict(center_keys=True, center_values=True, **ROTATED)),
    ("fp8_e4m3", 8, 0, [50, 5, 12], None, True, {}),
    ("fp4_e2m1", 4, 8, [64, 30, 3], 24, False, ROTATED),  # window: kept first positions drop out
]


@compiled_once
def _kept_cache(fmt, keep_first, keep_recent, lengths, window, frame, max_len=80):
    """A cache of 8 query heads over 2 KV heads of 64, `max_len` positions, keeping
    positions, filled to `lengths`; `frame`: more init_cache options as (name, value)
    pairs.

    Returns (cache, q [B, 8, 64])."""
    heads, kv_heads, head_dim = 8, 2, 64
    config = one_layer_config(heads, kv_heads, head_dim, window)
    keys = jax.random.split(jax.random.key(sum(lengths) + keep_first), 3)
    k = realistic_keys(keys[0], (len(lengths), max_len, kv_heads, head_dim))
    v = jax.random.normal(keys[1], (len(lengths), max_len, kv_heads, head_dim))
    cache = C.init_cache(
        config, len(lengths), max_len, fmt, keep_first=keep_first, keep_recent=keep_recent, **dict(frame)
    )
    cache = C.update(cache, [k], [v], num_tokens=jnp.asarray(lengths))
    q = jax.random.normal(keys[2], (len(lengths), heads, head_dim), jnp.bfloat16)
    return cache, q


@pytest.mark.parametrize("fmt, keep_first, keep_recent, lengths, window, sinks, frame", KEPT_CASES)
def test_triton_kernel_reads_the_kept_positions_like_the_reference(fmt, keep_first, keep_recent, lengths, window,
                                                                    sinks, frame):
    cache, q = _kept_cache(fmt, keep_first, keep_recent, lengths, window, tuple(frame.items()))
    sink_logits = jnp.linspace(-1.0, 2.0, 8) if sinks else None
    layer = cache.layers[0]
    ref = jitted(decode_attention, q, layer, cache.lengths, sinks=sink_logits, implementation="reference")
    out = jitted(
        decode_attention, q, layer, cache.lengths, sinks=sink_logits, implementation="pallas_triton", block_k=16
    )
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert relative_error(out, ref) < 1e-2
    # The kept positions matter: the stored layer alone attends differently.
    plain = dataclasses.replace(layer, kept_k=None, kept_v=None, keep_first=0, keep_recent=0)
    assert relative_error(jitted(decode_attention, q, plain, cache.lengths, sinks=sink_logits), ref) > 2e-2


def test_the_reference_reads_kept_positions_in_full_precision():
    config = one_layer_config(4, 2, 64, None)
    k = realistic_keys(jax.random.key(3), (1, 40, 2, 64))
    v = jax.random.normal(jax.random.key(4), (1, 40, 2, 64))
    cache = C.init_cache(config, 1, 40, "fp4_e2m1", keep_first=4, keep_recent=8)
    cache = jax.jit(C.update)(cache, [k], [v])
    q = jax.random.normal(jax.random.key(5), (1, 4, 64))
    out = jitted(decode_attention, q, cache.layers[0], cache.lengths, implementation="reference")
    # Positions 0-3 and 32-39 are read in bf16, the others as stored (FP4).
    stored_k, stored_v, _ = C.read_layer(cache, 0)  # [B, Hkv, S, D]
    kept = ((jnp.arange(40) < 4) | (jnp.arange(40) >= 32))[None, None, :, None]
    as_bf16 = lambda x: x.transpose(0, 2, 1, 3).astype(jnp.bfloat16).astype(jnp.float32)
    k_read, v_read = jnp.where(kept, as_bf16(k), stored_k), jnp.where(kept, as_bf16(v), stored_v)
    logits = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(1, 2, 2, 64), k_read, precision="highest") / 8.0
    probs = jax.nn.softmax(logits, axis=-1)
    expected = jnp.einsum("bhgs,bhsd->bhgd", probs, v_read, precision="highest").reshape(1, 4, 64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-5, atol=2e-6)


def test_pallas_kernels_refuse_per_channel_key_scales():
    q = jnp.zeros((2, 4, 64))
    cache = C.init_cache(one_layer_config(4, 2, 64, None), 2, 64, "nvfp4", keep_recent=16, per_channel_keys=True)
    with pytest.raises(ValueError, match="'pallas_triton' does not read per-channel key scales"):
        decode_attention(q, cache.layers[0], cache.lengths, implementation="pallas_triton")


PACKED_KEPT_CASES = [case for case in KEPT_CASES if case[0] in pallas_mosaic.SUPPORTED_FORMATS]


@pytest.mark.parametrize("fmt, keep_first, keep_recent, lengths, window, sinks, frame", PACKED_KEPT_CASES)
def test_mosaic_kernel_reads_the_kept_positions_like_the_reference(fmt, keep_first, keep_recent, lengths, window,
                                                                    sinks, frame):
    cache, q = _kept_cache(fmt, keep_first, keep_recent, lengths, window, tuple(frame.items()), max_len=128)
    sink_logits = jnp.linspace(-1.0, 2.0, 8) if sinks else None
    layer = cache.layers[0]
    ref = jitted(decode_attention, q, layer, cache.lengths, sinks=sink_logits, implementation="reference")
    out = jitted(decode_attention, q, layer, cache.lengths, sinks=sink_logits, implementation="pallas_mosaic",
                 num_splits=2)
    assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, keep_first, keep_recent, lengths, window, sinks, frame", KEPT_CASES)
def test_compiled_warp_kernel_reads_the_kept_positions_like_the_reference(fmt, keep_first, keep_recent, lengths,
                                                                          window, sinks, frame):
    """One split (the kernel leaves its state to the merge all the same) and two."""
    cache, q = _kept_cache(fmt, keep_first, keep_recent, lengths, window, tuple(frame.items()), max_len=128)
    sink_logits = jnp.linspace(-1.0, 2.0, 8) if sinks else None
    layer = cache.layers[0]
    ref = decode_attention(q, layer, cache.lengths, sinks=sink_logits, implementation="reference")
    for num_splits in (1, 2):
        out = decode_attention(q, layer, cache.lengths, sinks=sink_logits, implementation="pallas_mosaic_warp",
                               num_splits=num_splits)
        assert relative_error(out, ref) < 1e-2, num_splits
