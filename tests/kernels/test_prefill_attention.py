"""prefill_attention: the Pallas kernel (interpret mode on CPU) against the float32
reference, the reference against float64 numpy, and what the chunk attends to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import cache as C
from fp4kv_jax.formats import dequantize
from fp4kv_jax.kernels.decode_attention import decode_attention
from fp4kv_jax.kernels.prefill_attention import prefill_attention
from fp4kv_jax.models.transformer import causal_attention

from attention_inputs import compiled_once, jitted, one_layer_config, realistic_keys, relative_error


@compiled_once
def _chunk_after_prefix(
    seed, fmt, heads, kv_heads, head_dim, prefix, chunk, window=None, trim=False, rotate=False, capacity=None
):
    """A cache holding each sequence's prefix, then a chunk written after it (keys and
    values Hadamard-rotated when `rotate`), of `capacity` positions (default: just
    more than the longest sequence).

    Returns (layer, start, q [B, T, Hq, D], chunk k, v [B, T, Hkv, D]).
    """
    batch = len(prefix)
    keys = jax.random.split(jax.random.key(seed), 5)
    longest = max(max(prefix), 1)
    max_len = capacity or longest + chunk + 3
    cache = C.init_cache(
        one_layer_config(heads, kv_heads, head_dim, window), batch, max_len, fmt, trim_sliding_layers=trim,
        rotate_keys=rotate, rotate_values=rotate,
    )
    pk = realistic_keys(keys[0], (batch, longest, kv_heads, head_dim))
    cache = C.update(cache, [pk], [jax.random.normal(keys[1], pk.shape)], num_tokens=jnp.asarray(prefix))
    k = realistic_keys(keys[2], (batch, chunk, kv_heads, head_dim))
    v = jax.random.normal(keys[3], k.shape)
    start = cache.lengths
    cache = C.write_layer(cache, 0, k, v)
    q = jax.random.normal(keys[4], (batch, chunk, heads, head_dim), jnp.bfloat16)
    return cache.layers[0], start, q, k, v


CASES = [
    # fmt, heads, kv_heads, head_dim, prefix lengths, chunk, window, sinks, full-precision chunk
    ("fp4_e2m1", 8, 2, 64, [0, 13], 20, None, False, False),  # empty prefix, ragged
    ("fp4_e2m1", 16, 1, 128, [37], 9, 24, True, False),  # MQA, group 16, window, sinks
    ("nvfp4", 14, 2, 128, [5, 40], 33, 16, True, True),  # group 7, full-precision chunk
    ("mxfp4", 4, 2, 64, [17, 0], 1, None, False, False),  # a one-token chunk
    ("nvfp4_search_b8", 8, 2, 128, [19, 3], 24, None, True, False),  # blocks of 8
    ("nvfp4_search_b4", 4, 2, 64, [11, 2], 16, None, False, False),  # blocks of 4
    ("fp8_e4m3", 8, 2, 64, [3, 70], 12, None, False, True),
    ("fp8_e5m2", 4, 4, 64, [21], 16, 8, True, False),  # group 1
    ("bf16", 4, 4, 64, [0], 512, 100, False, False),  # a 512-token chunk
    ("fp16", 8, 2, 64, [9, 2], 7, None, True, False),
    ("float32", 8, 4, 64, [30, 0], 5, None, False, False),
]


@pytest.mark.parametrize("fmt, heads, kv_heads, head_dim, prefix, chunk, window, sinks, exact", CASES)
def test_pallas_kernel_matches_reference(fmt, heads, kv_heads, head_dim, prefix, chunk, window, sinks, exact):
    layer, start, q, k, v = _chunk_after_prefix(chunk + heads, fmt, heads, kv_heads, head_dim, prefix, chunk, window)
    if fmt == "float32":  # a lossless cache: check the kernel's math, not bf16 output rounding
        q = q.astype(jnp.float32)
    args = dict(sinks=jnp.linspace(-2.0, 3.0, heads) if sinks else None)
    if exact:
        args.update(chunk_k=k, chunk_v=v)
    ref = jitted(prefill_attention, q, layer, start, implementation="reference", **args)
    block_k = 64 if chunk > 64 else 16
    out = jitted(prefill_attention, q, layer, start, implementation="pallas_triton", block_k=block_k, **args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))  # every element written
    assert relative_error(out, ref) < (1e-5 if fmt == "float32" else 1e-2)


MOSAIC_CASES = [
    # fmt, heads, kv_heads, head_dim, prefix lengths, chunk, capacity, window, sinks, block_k, programs
    ("fp4_e2m1", 8, 2, 64, [0, 13], 20, 128, None, False, 64, 3),  # empty prefix, ragged; 16 items over 3 programs
    ("nvfp4", 16, 1, 128, [37], 9, 128, 24, True, 64, None),  # MQA, group 16, window, sinks
    ("mxfp4", 6, 2, 128, [100, 0], 150, 256, None, True, 128, 5),  # group 3, three query blocks; 36 items over 5
    ("nvfp4_4over6", 4, 2, 64, [70, 5], 1, 128, 32, False, 64, None),  # a one-token chunk
    ("nvfp4_search_b8", 4, 2, 128, [40, 0], 30, 128, None, True, 64, None),  # blocks of 8
    ("nvfp4_search_b4", 4, 2, 64, [21], 12, 128, None, False, 64, None),  # blocks of 4
]


@pytest.mark.parametrize(
    "fmt, heads, kv_heads, head_dim, prefix, chunk, capacity, window, sinks, block_k, programs", MOSAIC_CASES
)
def test_mosaic_kernel_matches_reference(fmt, heads, kv_heads, head_dim, prefix, chunk, capacity, window, sinks,
                                         block_k, programs):
    layer, start, q, _, _ = _chunk_after_prefix(
        chunk + heads, fmt, heads, kv_heads, head_dim, prefix, chunk, window, capacity=capacity
    )
    sink_logits = jnp.linspace(-2.0, 3.0, heads) if sinks else None
    ref = jitted(prefill_attention, q, layer, start, sinks=sink_logits, implementation="reference")
    out = jitted(
        prefill_attention, q, layer, start, sinks=sink_logits, implementation="pallas_mosaic", block_k=block_k,
        programs=programs,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert relative_error(out, ref) < 1e-2


def _empty_layer(fmt, capacity):
    """An empty one-layer cache of 8 query heads over 2 KV heads of 64, and a 4-token
    chunk's q, k, v of zeros: enough for the checks that refuse before any work."""
    layer = C.init_cache(one_layer_config(8, 2, 64), 1, capacity, fmt).layers[0]
    k = jnp.zeros((1, 4, 2, 64))
    return layer, jnp.array([3]), jnp.zeros((1, 4, 8, 64), jnp.bfloat16), k, k


def test_mosaic_kernel_refuses_what_it_does_not_handle():
    layer, start, q, k, v = _empty_layer("fp8_e4m3", 128)
    with pytest.raises(ValueError, match="'pallas_mosaic' handles nvfp4_search_b4, nvfp4_search_b8, fp4_e2m1, nvfp4, nvfp4_4over6, nvfp4_search, mxfp4, not 'fp8_e4m3'"):
        prefill_attention(q, layer, start, implementation="pallas_mosaic")
    layer, start, q, k, v = _empty_layer("nvfp4", 128)
    with pytest.raises(ValueError, match="'pallas_mosaic' attends to the chunk as stored"):
        prefill_attention(q, layer, start, chunk_k=k, chunk_v=v, implementation="pallas_mosaic")
    with pytest.raises(ValueError, match="block_k: 'pallas_mosaic' takes 64 or 128, got 32"):
        prefill_attention(q, layer, start, implementation="pallas_mosaic", block_k=32)
    with pytest.raises(ValueError, match="feed_warpgroup: interpret mode runs only the schedule without one"):
        prefill_attention(q, layer, start, implementation="pallas_mosaic", feed_warpgroup=True)
    with pytest.raises(ValueError, match="compute_warpgroups: 1, or 2 for an even GQA group with a feed warpgroup"):
        prefill_attention(q, layer, start, implementation="pallas_mosaic", compute_warpgroups=2)
    odd, start, q, _, _ = _empty_layer("nvfp4", 100)
    with pytest.raises(ValueError, match="'pallas_mosaic' needs a cache capacity that is a multiple of 128"):
        prefill_attention(q, odd, start, implementation="pallas_mosaic")


def test_a_full_precision_chunk_without_prefix_is_plain_causal_attention():
    layer, start, q, k, v = _chunk_after_prefix(3, "fp4_e2m1", 8, 2, 64, [0, 0], 24, window=10)
    sinks = jnp.linspace(-1.0, 1.0, 8)
    expected = causal_attention(q.astype(jnp.float32), k, v, window=10, sinks=sinks)
    kernel = dict(implementation="pallas_triton", block_k=16)
    exact = jitted(prefill_attention, q, layer, start, sinks=sinks, chunk_k=k, chunk_v=v, **kernel)
    stored = jitted(prefill_attention, q, layer, start, sinks=sinks, **kernel)
    assert relative_error(exact, expected) < 1e-2
    # FP4 storage visibly changes what the chunk attends to.
    assert relative_error(stored, expected) > 3 * relative_error(exact, expected)


def test_stored_chunk_agrees_with_decode_for_its_last_query():
    layer, start, q, _, _ = _chunk_after_prefix(4, "nvfp4", 8, 2, 128, [11, 30], 6)
    prefill = jitted(prefill_attention, q, layer, start, implementation="reference")
    decode = jitted(decode_attention, q[:, -1], layer, start + 6, implementation="reference")
    assert relative_error(prefill[:, -1], decode) < 1e-6


@pytest.mark.parametrize("exact", [False, True])
def test_rotated_keys_and_values_leave_the_output_unchanged(exact):
    kwargs = dict(fmt="float32", heads=8, kv_heads=2, head_dim=64, prefix=[9, 0], chunk=7)
    plain, start, q, k, v = _chunk_after_prefix(8, **kwargs)
    rotated, _, _, _, _ = _chunk_after_prefix(8, **kwargs, rotate=True)
    extra = dict(chunk_k=k, chunk_v=v) if exact else {}
    expected = jitted(prefill_attention, q.astype(jnp.float32), plain, start, implementation="reference", **extra)
    out = jitted(prefill_attention, q.astype(jnp.float32), rotated, start, implementation="reference", **extra)
    assert relative_error(out, expected) < 1e-5


def test_ring_buffer_layer_serves_one_token_chunks():
    kwargs = dict(fmt="fp4_e2m1", heads=4, kv_heads=2, head_dim=64, prefix=[45, 20], chunk=1, window=16)
    full, start, q, _, _ = _chunk_after_prefix(5, **kwargs)
    ring, ring_start, _, _, _ = _chunk_after_prefix(5, **kwargs, trim=True)
    assert ring.ring and ring.capacity == 16
    expected = jitted(prefill_attention, q, full, start, implementation="reference")
    kernel = jitted(prefill_attention, q, ring, ring_start, implementation="pallas_triton", block_k=16)
    assert relative_error(kernel, expected) < 1e-2


def _numpy_prefill(q, k, v, start, sm_scale, window):
    """float64 causal attention of q [B, T, Hq, D] over dequantized [B, Hkv, S, D]."""
    batch, chunk, heads, _ = q.shape
    group = heads // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(batch):
        for t in range(chunk):
            pos = start[b] + t
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(heads):
                logits = k[b, h // group, lo : pos + 1] @ q[b, t, h] * sm_scale
                weights = np.exp(logits - logits.max())
                out[b, t, h] = weights @ v[b, h // group, lo : pos + 1] / weights.sum()
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_float64_numpy(window):
    layer, start, q, _, _ = _chunk_after_prefix(6, "mxfp4", 4, 2, 64, [9, 0], 7, window)
    k = np.asarray(dequantize(layer.k), np.float64)
    v = np.asarray(dequantize(layer.v), np.float64)
    expected = _numpy_prefill(np.asarray(q, np.float64), k, v, np.asarray(start), 0.125, window)
    out = jitted(prefill_attention, q.astype(jnp.float32), layer, start, implementation="reference")
    assert relative_error(out, expected) < 1e-5


def test_bad_arguments_are_named():
    layer, start, q, k, v = _chunk_after_prefix(1, "bf16", 4, 2, 64, [3], 4)
    with pytest.raises(ValueError, match="implementation: unknown 'cuda'; valid: reference, pallas_triton, pallas_mosaic"):
        prefill_attention(q, layer, start, implementation="cuda")
    with pytest.raises(ValueError, match="q: 3 heads is not a multiple of the 2 KV heads"):
        prefill_attention(q[:, :, :3], layer, start)
    with pytest.raises(ValueError, match="start: expected shape"):
        prefill_attention(q, layer, start[None])
    with pytest.raises(ValueError, match="chunk_k, chunk_v: pass both or neither"):
        prefill_attention(q, layer, start, chunk_k=k)
    with pytest.raises(ValueError, match="chunk_v: expected shape"):
        prefill_attention(q, layer, start, chunk_k=k, chunk_v=v[:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "fp4_e2m1", "nvfp4", "mxfp4", "nvfp4_search_b8", "nvfp4_search_b4"])
def test_compiled_kernel_matches_reference_on_gpu(fmt):
    layer, start, q, k, v = _chunk_after_prefix(7, fmt, 64, 8, 128, [0, 1000, 333], 700, window=None)
    sinks = jnp.linspace(-1.0, 1.0, 64)
    for extra in ({}, dict(chunk_k=k, chunk_v=v)):
        ref = prefill_attention(q, layer, start, sinks=sinks, implementation="reference", **extra)
        out = prefill_attention(q, layer, start, sinks=sinks, implementation="pallas_triton", **extra)
        assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nvfp4", "mxfp4", "nvfp4_search_b8", "nvfp4_search_b4"])
def test_compiled_mosaic_kernel_matches_reference_on_gpu(fmt):
    """The default schedule over ragged prefixes with sinks, and over a window."""
    ragged = _chunk_after_prefix(9, fmt, 64, 8, 128, [0, 1000, 333], 700, capacity=1792)
    windowed = _chunk_after_prefix(10, fmt, 16, 2, 128, [50, 400], 300, window=200, capacity=768)
    for (layer, start, q, _, _), sinks in ((ragged, jnp.linspace(-1.0, 1.0, 64)), (windowed, None)):
        ref = prefill_attention(q, layer, start, sinks=sinks, implementation="reference")
        out = prefill_attention(q, layer, start, sinks=sinks, implementation="pallas_mosaic")
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
def test_compiled_mosaic_kernel_tunings_match_reference_on_gpu():
    """head_dim 64, each tuning away from the default: the one-warpgroup schedule,
    one compute warpgroup, no ping-pong, 64-position blocks, 7 programs for 72 items."""
    layer, start, q, _, _ = _chunk_after_prefix(12, "nvfp4", 16, 2, 64, [0, 517], 260, window=300, capacity=896)
    sinks = jnp.linspace(-1.0, 1.0, 16)
    ref = prefill_attention(q, layer, start, sinks=sinks, implementation="reference")
    for tuning in (dict(feed_warpgroup=False), dict(compute_warpgroups=1), dict(ping_pong=False), dict(block_k=64),
                   dict(programs=7)):
        out = prefill_attention(q, layer, start, sinks=sinks, implementation="pallas_mosaic", **tuning)
        assert relative_error(out, ref) < 1e-2, tuning


@pytest.mark.gpu
def test_gpu_default_is_the_mosaic_kernel_where_it_handles_the_layer():
    from fp4kv_jax.kernels.prefill_attention import _default_implementation

    layer, start, q, k, v = _chunk_after_prefix(11, "nvfp4", 16, 2, 128, [200, 7], 64, capacity=384)
    assert _default_implementation(q, layer, None) == "pallas_mosaic"
    assert _default_implementation(q, layer, k) == "pallas_triton"  # a full-precision chunk
    ref = prefill_attention(q, layer, start, implementation="reference")
    assert relative_error(prefill_attention(q, layer, start), ref) < 1e-2
    odd, _, q_odd, _, _ = _chunk_after_prefix(11, "nvfp4", 16, 2, 128, [200, 7], 64, capacity=300)
    bf16, _, q_bf16, _, _ = _chunk_after_prefix(11, "bf16", 16, 2, 128, [200, 7], 64, capacity=384)
    assert _default_implementation(q_odd, odd, None) == "pallas_triton"
    assert _default_implementation(q_bf16, bf16, None) == "pallas_triton"


KEPT_CASES = [
    # fmt, keep_first, keep_recent, prefix lengths, chunk, window, sinks, centered
    ("nvfp4", 4, 16, [40, 3], 20, None, True, False),  # the chunk passes the ring; a prefix shorter than it
    # recent window only; centered K/V, an empty prefix whose means the chunk sets
    ("mxfp4", 0, 32, [0, 50], 33, None, False, True),
    ("fp4_e2m1", 8, 8, [30, 12], 9, 16, False, False),  # window: the first kept positions drop out
    ("fp8_e4m3", 16, 0, [25], 40, None, True, False),  # sinks only
]


@compiled_once
def _kept_chunk_after_prefix(fmt, keep_first, keep_recent, prefix, chunk, window, centered, capacity=None,
                             kept_dtype="bf16"):
    """A layer of 8 query heads over 2 KV heads of 64 keeping positions (copies in
    `kept_dtype`), holding each sequence's prefix, then a chunk written after it, of
    `capacity` positions (default: just more than the longest sequence).

    Returns (layer, start, q [B, T, 8, 64], full_k, full_v [B, 2, capacity, 64]).
    """
    heads, kv_heads, head_dim = 8, 2, 64
    keys = jax.random.split(jax.random.key(chunk + keep_first), 5)
    longest = max(max(prefix), 1)
    cache = C.init_cache(one_layer_config(heads, kv_heads, head_dim, window), len(prefix),
                         capacity or longest + chunk + 3, fmt,
                         keep_first=keep_first, keep_recent=keep_recent, kept_dtype=kept_dtype, rotate_keys=True,
                         center_keys=centered,
                         center_values=centered)
    pk = realistic_keys(keys[0], (len(prefix), longest, kv_heads, head_dim))
    cache = C.update(cache, [pk], [jax.random.normal(keys[1], pk.shape)], num_tokens=jnp.asarray(prefix))
    k = realistic_keys(keys[2], (len(prefix), chunk, kv_heads, head_dim))
    v = jax.random.normal(keys[3], k.shape)
    before, start = cache.layers[0], cache.lengths
    layer = C.write_layer(cache, 0, k, v).layers[0]
    full_k, full_v = C.kept_values(before, start, *C.to_stored_frame(layer, k, v))
    q = jax.random.normal(keys[4], (len(prefix), chunk, heads, head_dim), jnp.bfloat16)
    return layer, start, q, full_k, full_v


@pytest.mark.parametrize("fmt, keep_first, keep_recent, prefix, chunk, window, sinks, centered", KEPT_CASES)
def test_pallas_kernel_reads_kept_positions_like_the_reference(fmt, keep_first, keep_recent, prefix, chunk, window,
                                                               sinks, centered):
    layer, start, q, full_k, full_v = _kept_chunk_after_prefix(fmt, keep_first, keep_recent, prefix, chunk, window,
                                                               centered)
    args = dict(sinks=jnp.linspace(-2.0, 3.0, 8) if sinks else None, full_k=full_k, full_v=full_v)
    ref = jitted(prefill_attention, q, layer, start, implementation="reference", **args)
    out = jitted(prefill_attention, q, layer, start, implementation="pallas_triton", block_k=16, **args)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert relative_error(out, ref) < 1e-2


MOSAIC_KEPT_CASES = [
    # fmt, keep_first, keep_recent, prefix lengths, chunk, window, sinks, centered, capacity, kept_dtype
    # two query blocks; early rows read no stored position; fp8 kept copies
    ("nvfp4", 4, 16, [40, 3], 70, None, True, False, 192, "fp8_e4m3"),
    ("mxfp4", 72, 8, [130, 10], 20, None, False, True, 192, "bf16"),  # kept first positions past a 64-position block
    ("fp4_e2m1", 8, 40, [100, 0], 30, 64, False, False, 192, "bf16"),  # window: the first kept positions drop out
]


@pytest.mark.parametrize("fmt, keep_first, keep_recent, prefix, chunk, window, sinks, centered, capacity, kept_dtype",
                         MOSAIC_KEPT_CASES)
def test_mosaic_kernel_reads_kept_positions_like_the_reference(fmt, keep_first, keep_recent, prefix, chunk, window,
                                                               sinks, centered, capacity, kept_dtype):
    layer, start, q, full_k, full_v = _kept_chunk_after_prefix(fmt, keep_first, keep_recent, prefix, chunk, window,
                                                               centered, capacity, kept_dtype)
    args = dict(sinks=jnp.linspace(-2.0, 3.0, 8) if sinks else None, full_k=full_k, full_v=full_v)
    ref = jitted(prefill_attention, q, layer, start, implementation="reference", **args)
    out = jitted(prefill_attention, q, layer, start, implementation="pallas_mosaic", block_k=64, **args)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
def test_compiled_mosaic_kernel_reads_kept_positions_on_gpu():
    """The default schedule over ragged prefixes, the best 8k recipe's 8 first and 40
    newest positions kept, with sinks and with centered keys and values."""
    for sinks, centered in ((True, False), (False, True)):
        layer, start, q, full_k, full_v = _kept_chunk_after_prefix("nvfp4_search", 8, 40, [0, 1000, 333], 300, None,
                                                                   centered, 1408)
        args = dict(sinks=jnp.linspace(-2.0, 3.0, 8) if sinks else None, full_k=full_k, full_v=full_v)
        ref = prefill_attention(q, layer, start, implementation="reference", **args)
        out = prefill_attention(q, layer, start, implementation="pallas_mosaic", **args)
        assert relative_error(out, ref) < 1e-2
        assert relative_error(prefill_attention(q, layer, start, **args), ref) < 1e-2  # the default
