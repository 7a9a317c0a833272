"""Quantize-and-write in Pallas (Triton lowering): new K or V to packed cache rows in one pass.

Grid (batch, kv_head, token block). Each program loads `block_t` new tokens of one
(sequence, KV head) as the codec's planes (for packed FP4 the even and odd columns,
two tiles [block_t, D / 2], so that a byte's two codes sit in the same thread),
encodes them with the codec's `encode_planes` (the bytes of `encode`, with PTX
divisions and conversions when compiled), and stores its data and scale rows at their
slots (`reference.token_slots`) with masked stores: tokens past the chunk or past
num_tokens, and those the cache drops, are not written.

The cache buffers are aliased to the outputs (`input_output_aliases`) and a program
touches only the rows it stores, so under a jit that donates the cache nothing is
copied. Tiles are powers of two wide, as Triton requires; a plane width that is not
one is padded with masked columns, which never reach memory (each block scale covers
columns of one block only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels.quantize_into_cache.reference import token_slots


def _kernel(*refs, codec, has_global_scale: bool, block_t: int, value_dtype: jnp.dtype,
            width: int, capacity: int, ring: bool, ptx: bool):
    """refs: this sequence's start and num_tokens, the global scale if the format has
    one, this (sequence, KV head)'s new values [T, D] (or [T, D / 2] words, see
    `_value_words`), its cache buffers as inputs, then as outputs [capacity, ...]. The
    inputs are aliased to the outputs and never read."""
    start_ref, count_ref, *refs = refs
    global_scale = refs.pop(0)[...] if has_global_scale else None
    new_ref, *buffer_refs = refs
    out_refs = buffer_refs[len(buffer_refs) // 2 :]

    t = pl.program_id(2) * block_t + jnp.arange(block_t)
    planes = _load_planes(new_ref, t, width, codec.elements_per_datum, value_dtype)
    encoded = codec.encode_planes(planes, global_scale, ptx=ptx)
    slots = token_slots(start_ref[...], count_ref[...], t, capacity, ring)
    for out_ref, values in zip(out_refs, encoded):
        columns = jnp.arange(values.shape[1])
        plgpu.store(
            out_ref.at[slots[:, None], columns[None, :]],
            values,
            mask=(slots < capacity)[:, None] & (columns < out_ref.shape[1])[None, :],
        )


def _load_planes(new_ref, t, width: int, num_planes: int, value_dtype: jnp.dtype):
    """The codec's planes of tokens t as float32 [block_t, width] tiles, zero past the
    chunk and past each plane's columns."""
    chunk, columns_stored = new_ref.shape
    columns = jnp.arange(width)

    def load(column_index, columns_in_range):
        return plgpu.load(
            new_ref.at[t[:, None], column_index[None, :]],
            mask=(t < chunk)[:, None] & (columns < columns_in_range)[None, :],
            other=0,
        )

    if num_planes == 1:
        return (load(columns, columns_stored).astype(jnp.float32),)
    if _loads_words(num_planes, value_dtype):
        words = load(columns, columns_stored)
        halves = ((words & 0xFFFF).astype(jnp.uint16), (words >> 16).astype(jnp.uint16))
        return tuple(
            jax.lax.bitcast_convert_type(h, value_dtype).astype(jnp.float32) for h in halves
        )
    return tuple(
        load(columns * num_planes + i, columns_stored // num_planes).astype(jnp.float32)
        for i in range(num_planes)
    )


def _loads_words(num_planes: int, value_dtype: jnp.dtype) -> bool:
    """Whether the kernel reads pairs of values as one 32-bit word (`_value_words`)."""
    return num_planes == 2 and jnp.dtype(value_dtype).itemsize == 2


def _value_words(new: jax.Array, num_planes: int) -> jax.Array:
    """For packed formats, 16-bit new values [B, T, Hkv, D] as uint32 words [B, T, Hkv,
    D / 2], the even column in the low half: a byte's two values load as one word, and
    a tile of words as wide vector loads (a column stride would split them). Other
    values as they are; 32-bit pairs would need 64-bit words, which JAX has only
    under x64, so their planes load with a column stride."""
    if not _loads_words(num_planes, new.dtype):
        return new
    pairs = new.reshape(*new.shape[:-1], new.shape[-1] // 2, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.uint32)


@functools.partial(jax.jit, static_argnames=("ring", "block_t", "num_warps", "interpret"))
def quantize_into_cache(
    new: jax.Array,
    stored: QuantizedTensor,
    start: jax.Array,
    num_tokens: jax.Array,
    *,
    ring: bool,
    block_t: int = 16,
    num_warps: int = 4,
    interpret: bool = False,
) -> QuantizedTensor:
    """new float [B, T, Hkv, D] into stored [B, Hkv, S, D] at start, num_tokens int32 [B].

    Args:
      block_t: tokens per program (rounded down to the chunk's next power of two). The
        default is the fastest on an H200 over the formats (docs/benchmarks.md): the
        encoders' registers limit occupancy, more so in larger tiles.
      num_warps: Triton warps per program.
      interpret: run in Pallas interpret mode (CPU); divisions then use XLA's.
    """
    codec = get_codec(stored.fmt)
    batch, chunk, kv_heads, head_dim = new.shape
    capacity = stored.data.shape[2]
    block_t = min(block_t, pl.next_power_of_2(chunk))
    has_global_scale = codec.has_global_scale
    buffers = [stored.data] if stored.scales is None else [stored.data, stored.scales]

    def per_sequence():
        return pl.BlockSpec((None,), lambda b, h, j: (b,))

    def whole_rows(buffer):
        return pl.BlockSpec((None, None, capacity, buffer.shape[-1]), lambda b, h, j: (b, h, 0, 0))

    scalars = [start.astype(jnp.int32), num_tokens.astype(jnp.int32)]
    scalar_specs = [per_sequence(), per_sequence()]
    if has_global_scale:
        scalars.append(jnp.reshape(stored.global_scale, (1,)).astype(jnp.float32))
        scalar_specs.append(pl.BlockSpec((None,), lambda b, h, j: (0,)))
    kernel = functools.partial(
        _kernel,
        codec=codec,
        has_global_scale=has_global_scale,
        block_t=block_t,
        value_dtype=new.dtype,
        width=pl.next_power_of_2(head_dim // codec.elements_per_datum),
        capacity=capacity,
        ring=ring,
        ptx=not interpret,
    )
    new_columns = _value_words(new, codec.elements_per_datum)
    first_buffer = len(scalars) + 1
    written = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, pl.cdiv(chunk, block_t)),
        in_specs=[
            *scalar_specs,
            pl.BlockSpec((None, chunk, None, new_columns.shape[-1]), lambda b, h, j: (b, 0, h, 0)),
            *[whole_rows(x) for x in buffers],
        ],
        out_specs=[whole_rows(x) for x in buffers],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in buffers],
        input_output_aliases={first_buffer + i: i for i in range(len(buffers))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"quantize_into_cache_{stored.fmt}",
    )(*scalars, new_columns, *buffers)
    scales = written[1] if len(written) > 1 else None
    return QuantizedTensor(written[0], scales, stored.global_scale, stored.fmt)
