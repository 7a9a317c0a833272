"""Quantize-and-write in Pallas (Triton lowering): new K or V to packed cache rows in one pass.

Grid (batch, kv_head, token block). Each program loads `block_t` new tokens of one
(sequence, KV head), a float tile [block_t, D], encodes it with the codec's
`encode_tile` (the bytes of `encode`, with PTX divisions when compiled), and stores
its data and scale rows at their slots (`reference.token_slots`) with masked stores:
tokens past the chunk or past num_tokens, and those the cache drops, are not written.

The cache buffers are aliased to the outputs (`input_output_aliases`) and a program
touches only the rows it stores, so under a jit that donates the cache nothing is
copied. Tiles are powers of two wide, as Triton requires; a head_dim that is not one
is padded with masked columns, which never reach memory (each block scale covers
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


def _kernel(*refs, codec, has_global_scale: bool, block_t: int, width: int, capacity: int,
            ring: bool, ptx: bool):
    """refs: this sequence's start and num_tokens, the global scale if the format has
    one, this (sequence, KV head)'s new values [T, D], its cache buffers as inputs, then
    as outputs [capacity, ...]. The inputs are aliased to the outputs and never read."""
    start_ref, count_ref, *refs = refs
    global_scale = refs.pop(0)[...] if has_global_scale else None
    new_ref, *buffer_refs = refs
    out_refs = buffer_refs[len(buffer_refs) // 2 :]
    chunk, head_dim = new_ref.shape

    first = pl.program_id(2) * block_t
    t = first + jnp.arange(block_t)
    columns = jnp.arange(width)
    tile = plgpu.load(
        new_ref.at[pl.ds(first, block_t), pl.ds(0, width)],
        mask=(t < chunk)[:, None] & (columns < head_dim)[None, :],
        other=0,
    )
    encoded = codec.encode_tile(tile.astype(jnp.float32), global_scale, ptx=ptx)
    slots = token_slots(start_ref[...], count_ref[...], t, capacity, ring)
    for out_ref, values in zip(out_refs, encoded):
        columns = jnp.arange(values.shape[1])
        plgpu.store(
            out_ref.at[slots[:, None], columns[None, :]],
            values,
            mask=(slots < capacity)[:, None] & (columns < out_ref.shape[1])[None, :],
        )


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
        width=pl.next_power_of_2(head_dim),
        capacity=capacity,
        ring=ring,
        ptx=not interpret,
    )
    first_buffer = len(scalars) + 1
    written = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, pl.cdiv(chunk, block_t)),
        in_specs=[
            *scalar_specs,
            pl.BlockSpec((None, chunk, None, head_dim), lambda b, h, j: (b, 0, h, 0)),
            *[whole_rows(x) for x in buffers],
        ],
        out_specs=[whole_rows(x) for x in buffers],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in buffers],
        input_output_aliases={first_buffer + i: i for i in range(len(buffers))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"quantize_into_cache_{stored.fmt}",
    )(*scalars, new, *buffers)
    scales = written[1] if len(written) > 1 else None
    return QuantizedTensor(written[0], scales, stored.global_scale, stored.fmt)
