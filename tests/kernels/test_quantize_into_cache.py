"""quantize_into_cache: both implementations store what `quantize` stores, token by token
at each sequence's slots, leave every other slot's bytes alone, and (with the cache
donated) never copy the cache. The Pallas kernel runs in interpret mode on CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import QuantizedTensor, format_names, get_codec, quantize
from fp4kv_jax.cache import empty_tensor
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.quantize_into_cache import quantize_into_cache

KV_HEADS, HEAD_DIM = 2, 64
# Jitted, so each shape compiles once: eager op-by-op dispatch would dominate these
# small tests.
_quantize = jax.jit(quantize, static_argnames="fmt")
_write = jax.jit(quantize_into_cache, static_argnames=("ring", "implementation", "block_t"))


def _new_values(seed, batch, tokens, head_dim=HEAD_DIM):
    """float32 [B, T, Hkv, D]: unit normals with two outlier channels (x20), a first token
    100 times larger (as attention-sink keys are) and a zero vector in the last token."""
    x = np.random.default_rng(seed).standard_normal((batch, tokens, KV_HEADS, head_dim))
    x[..., [3, head_dim // 2 + 1]] *= 20.0
    x[:, 0] *= 100.0
    x[:, -1, 0] = 0.0
    return jnp.asarray(x, jnp.float32)


def _filled(fmt, new, batch, capacity, seed):
    """A cache tensor [B, Hkv, capacity, D] of random contents, so an untouched slot keeps
    recognizable bytes; fp8 and nvfp4 get a global scale that fits `new`.

    Float buffers get random finite values: XLA on CPU updates float8 buffers through
    float16 and back, which would canonicalize stray NaN bytes (the library stores one
    NaN byte only)."""
    empty = empty_tensor(fmt, (batch, KV_HEADS, capacity, new.shape[-1]))
    rng = np.random.default_rng(seed)

    def random_contents(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, 256, x.shape, x.dtype))
        return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))

    scales = None if empty.scales is None else random_contents(empty.scales)
    global_scale = None
    if get_codec(fmt).has_global_scale:
        global_scale = jnp.float32(np.max(np.abs(np.asarray(new, np.float32))) / 400.0)
    return QuantizedTensor(random_contents(empty.data), scales, global_scale, fmt)


def _xla_encodes_exactly(fmt):
    """Whether the reference (XLA) stores `quantize`'s CPU bytes on this backend. XLA's
    float32 division on the GPU is not always correctly rounded, which moves Four Over
    Six's and the scale search's error comparisons for some blocks; the Pallas kernel
    divides with PTX div.rn.f32 and matches the CPU."""
    chooses_by_error = fmt in ("nvfp4_4over6", "nvfp4_search", "nvfp4_search_b8", "nvfp4_search_b4")
    return not (chooses_by_error and jax.default_backend() == "gpu")


def _bytes(q):
    """Every stored byte of a cache tensor: data and scales as uint8 arrays."""
    arrays = (q.data,) if q.scales is None else (q.data, q.scales)
    return [np.asarray(x).view(np.uint8) for x in arrays]


def _written_one_by_one(stored, new, start, num_tokens, ring):
    """The bytes after storing `quantize(new)` one token at a time, in order: token t < n_b
    of sequence b goes to slot start_b + t (dropped past the capacity), or to
    (start_b + t) % capacity in a ring, where later tokens overwrite earlier ones.
    `quantize` runs on the CPU, whose bytes the format tests check on any machine."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        stored_on_cpu = jax.device_put(stored, cpu)
        quantized = _bytes(_quantize(jax.device_put(new, cpu), fmt=stored.fmt,
                                     global_scale=stored_on_cpu.global_scale))
    out = [x.copy() for x in _bytes(stored)]
    capacity = stored.data.shape[2]
    for b, (first, count) in enumerate(zip(start, num_tokens)):
        for t in range(count):
            slot = (first + t) % capacity if ring else first + t
            if slot < capacity:
                for buffer, values in zip(out, quantized):
                    buffer[b, :, slot] = values[b, t]
    return out


CHUNKS = [
    # tokens, start, num_tokens
    (1, [0, 7, 39], [1, 1, 1]),  # a decode step: first, middle and last slot
    # Three blocks of 8 tokens, the last one ragged: a ragged prefill from slot 0, one
    # that runs past the capacity (the rest is dropped) and one that writes nothing.
    (21, [0, 30, 19], [13, 21, 0]),
]
# A ring of 8 slots: 21 tokens wrap more than twice (only the last 8 survive), 6 tokens
# wrap once, 1 token lands in slot 0. Slots do not depend on the format, so two formats
# (one with block and global scales, one without scales) stand for all.
RING_CHUNK = (21, [3, 14, 0], [21, 6, 1])


@pytest.mark.parametrize(
    "fmt, chunk, capacity, ring",
    [(fmt, chunk, 40, False) for fmt in format_names() for chunk in CHUNKS]
    + [(fmt, RING_CHUNK, 8, True) for fmt in ("nvfp4", "fp8_e5m2")],
)
def test_both_implementations_store_quantize_bytes_at_the_slots_and_nothing_else(
    fmt, chunk, capacity, ring
):
    tokens, start, num_tokens = chunk
    batch = len(start)
    new = _new_values(tokens + capacity, batch, tokens)
    stored = _filled(fmt, new, batch, capacity, seed=7)
    expected = _written_one_by_one(stored, new, start, num_tokens, ring)
    args = (new, stored, jnp.array(start))
    kwargs = dict(num_tokens=jnp.array(num_tokens), ring=ring)
    reference = _write(*args, **kwargs, implementation="reference")
    kernel = _write(*args, **kwargs, implementation="pallas_triton", block_t=8)
    for written in (reference, kernel) if _xla_encodes_exactly(fmt) else (kernel,):
        np.testing.assert_array_equal(written.global_scale, stored.global_scale)
        for got, want in zip(_bytes(written), expected, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="the compiled kernels take head_dim multiples of 64 (tiles.interpret_mode)")
def test_head_dim_that_is_not_a_power_of_two_matches_the_reference():
    # The kernel pads each plane's tile to 64 columns and masks the padding out of the stores.
    new = _new_values(1, 2, 5, head_dim=96)
    stored = _filled("fp4_e2m1", new, 2, 16, seed=2)
    args = (new, stored, jnp.array([0, 9]))
    reference = _write(*args, implementation="reference")
    kernel = _write(*args, implementation="pallas_triton")
    for got, want in zip(_bytes(kernel), _bytes(reference), strict=True):
        np.testing.assert_array_equal(got, want)


def _full_buffer_copies(hlo: str, stored) -> list[str]:
    """Instructions in compiled HLO text that copy or convert a whole stored buffer."""
    found = []
    for buffer in (stored.data, stored.scales):
        if buffer is not None:
            dims = ",".join(map(str, buffer.shape))
            pattern = re.compile(rf"= \w+\[{dims}\]\{{[^}}]*\}} (copy|convert|bitcast-convert)\(")
            found += [line.strip() for line in hlo.splitlines() if pattern.search(line)]
    return found


# One format per buffer layout: 4- and 2-byte data, packed bytes with uint8 scales. XLA
# on CPU widens float8 buffers (fp8 data, nvfp4 scales) to float16 for any update, a
# full pass, which the GPU does not; the GPU test below checks every format.
@pytest.mark.parametrize("fmt", ["float32", "bf16", "fp4_e2m1"])
def test_reference_updates_a_donated_cache_in_place(fmt):
    stored = empty_tensor(fmt, (2, KV_HEADS, 4096, HEAD_DIM))
    new = jnp.ones((2, 3, KV_HEADS, HEAD_DIM))

    def write(new, stored, start):
        return quantize_into_cache(new, stored, start, implementation="reference")

    def compiled(**jit_kwargs):
        lowered = jax.jit(write, **jit_kwargs).lower(new, stored, jnp.array([0, 7]))
        return lowered.compile().as_text()

    donated = compiled(donate_argnums=1)
    assert "input_output_alias" in donated.splitlines()[0]
    assert _full_buffer_copies(donated, stored) == []
    # The same check sees the copy XLA makes when the cache is not donated.
    assert _full_buffer_copies(compiled(), stored) != []


@pytest.mark.parametrize(
    "fmt, slots, overflows",
    [
        ("fp8_e4m3", 32768, False),  # 2 GiB: the largest offset is 2**31 - 1
        ("fp8_e4m3", 65536, True),  # 4 GiB of 1-byte elements under int32 offsets
        ("bf16", 65536, False),  # 8 GiB: the lowering switches to int64 offsets
        ("fp4_e2m1", 131072, True),  # 4 GiB of packed bytes
    ],
)
def test_kernel_refuses_only_buffers_its_lowering_would_address_wrongly(fmt, slots, overflows):
    codec = get_codec(fmt)
    rows = (64, 8, slots)  # B = 64, Hkv = 8, D = 128
    data = jax.ShapeDtypeStruct((*rows, 128 // codec.elements_per_datum), codec.data_dtype)
    scales = None
    if codec.block_size is not None:
        scales = jax.ShapeDtypeStruct((*rows, 128 // codec.block_size), codec.scale_dtype)
    stored = QuantizedTensor(data, scales, None, fmt)
    assert tiles.overflows_int32_offsets(stored) == overflows


def _fp4_cache(scales_dtype=jnp.uint8):
    stored = empty_tensor("fp4_e2m1", (2, KV_HEADS, 8, HEAD_DIM))
    return QuantizedTensor(stored.data, stored.scales.astype(scales_dtype), None, "fp4_e2m1")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(implementation="cuda"), ValueError,
         "implementation: unknown 'cuda'; valid: reference, pallas_triton"),
        (dict(new=jnp.ones((2, 3, 1, HEAD_DIM))), ValueError,
         "new: shape .* does not match the cache's batch 2, kv_heads 2"),
        (dict(new=jnp.ones((2, 3, KV_HEADS, 24))), ValueError,
         "new: format 'fp4_e2m1' needs the last axis .* multiple of 16; got 24"),
        (dict(new=jnp.ones((2, 3, KV_HEADS, HEAD_DIM), jnp.int32)), TypeError,
         "new: expected a floating-point dtype"),
        (dict(start=jnp.zeros((3,), jnp.int32)), ValueError, r"start: expected integer shape \(2,\)"),
        (dict(start=jnp.zeros((2,))), ValueError, r"start: expected integer shape \(2,\)"),
        (dict(num_tokens=jnp.ones((3,), jnp.int32)), ValueError, "num_tokens: expected"),
        (dict(stored=_fp4_cache(scales_dtype=jnp.float8_e4m3fn)), TypeError,
         "stored: format 'fp4_e2m1' stores scales as uint8"),
        (dict(implementation="reference", block_t=8), ValueError, "tuning: the reference takes none"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    args = dict(new=jnp.ones((2, 3, KV_HEADS, HEAD_DIM)), stored=_fp4_cache(),
                start=jnp.zeros((2,), jnp.int32)) | change
    with pytest.raises(error, match=match):
        quantize_into_cache(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", format_names())
def test_compiled_kernel_matches_reference_on_gpu_without_copying_the_cache(fmt):
    batch, tokens, capacity = 4, 300, 4096
    new = _new_values(5, batch, tokens, head_dim=128).astype(jnp.bfloat16)
    stored = _filled(fmt, new, batch, capacity, seed=6)
    start = jnp.array([0, 1000, 3900, 4095])  # the last two run past the capacity
    num_tokens = jnp.array([300, 1, 300, 300])
    expected = _written_one_by_one(stored, new, np.asarray(start), np.asarray(num_tokens), False)
    for implementation in ("reference", "pallas_triton"):
        def write(new, stored, start, num_tokens, implementation=implementation):
            return quantize_into_cache(new, stored, start, num_tokens=num_tokens,
                                       implementation=implementation)

        step = jax.jit(write, donate_argnums=1)
        hlo = step.lower(new, stored, start, num_tokens).compile().as_text()
        assert _full_buffer_copies(hlo, stored) == [], implementation
        if implementation == "reference" and not _xla_encodes_exactly(fmt):
            continue
        fresh = jax.tree.map(jnp.copy, stored)  # the step consumes its cache
        for got, want in zip(_bytes(step(new, fresh, start, num_tokens)), expected, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=implementation)


def _awkward_values(seed, batch, tokens, head_dim):
    """float32 [B, T, Hkv, D] of the values encoders get wrong first: E2M1 midpoints and
    fp8 midpoints (exact ties) times powers of two, zeros of both signs, values past
    fp8's range, and NaN (of both signs) and infinities in a few blocks."""
    rng = np.random.default_rng(seed)
    e2m1_ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    fp8_ties = [1 + (2 * j + 1) / 16 for j in range(8)] + [1 + (2 * j + 1) / 8 for j in range(4)]
    pool = np.array(e2m1_ties + fp8_ties + [0.0, 1000.0, 1e5, 1e-3], np.float32)
    x = rng.choice(pool, (batch, tokens, KV_HEADS, head_dim))
    x *= rng.choice([-1.0, 1.0], x.shape) * 2.0 ** rng.integers(-3, 4, x.shape)
    x[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, -np.nan]  # NaN of both signs
    x[-1, -1, -1, 17] = -np.inf
    x[0, -1, 0, 40:48] = -0.0
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("fmt", format_names())
@pytest.mark.parametrize(
    "tokens, dtype", [(1, jnp.float32), (37, jnp.float32), (37, jnp.bfloat16), (37, jnp.float16)]
)
def test_kernel_stores_the_cpu_reference_bytes_for_ties_and_non_finite_values(fmt, tokens, dtype):
    """On a GPU the compiled kernel (PTX divisions and conversions), on CPU interpret
    mode; 16-bit values load as pairs in one word for packed formats."""
    batch, capacity, head_dim = 2, 64, 128
    new = _awkward_values(7, batch, tokens, head_dim).astype(dtype)
    stored = empty_tensor(fmt, (batch, KV_HEADS, capacity, head_dim))  # global scale 1.0
    start = jnp.array([0, 5])
    got = _bytes(_write(new, stored, start, implementation="pallas_triton"))
    want = _written_one_by_one(stored, new, np.asarray(start), np.full(batch, tokens), False)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
