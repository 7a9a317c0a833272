"""Reference quantize-and-write: `quantize` the whole chunk, then scatter its rows.

The scatter, not a `lax.dynamic_update_slice` per sequence: a chunk written at start
overruns the buffer when start + T > capacity (dynamic_update_slice would clamp start
and shift every row), a ragged `num_tokens` must leave the chunk's tail unwritten, and
a ring wraps around; a vmapped dynamic_update_slice with per-sequence starts lowers to
a scatter anyway. XLA updates a donated operand of a scatter in place, except that XLA
on CPU updates float8 buffers (fp8 data, nvfp4 scales) through float16 and back, a full
pass over them; the GPU scatters float8 in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import QuantizedTensor, quantize


def token_slots(
    start: jax.Array, num_tokens: jax.Array, t: jax.Array, capacity: int, ring: bool
) -> jax.Array:
    """The slot token t of a chunk is stored in, or `capacity` where it is not stored.

    Token t of a chunk written at `start` has position start + t and is stored when
    t < num_tokens. Without a ring, position p goes to slot p, and positions from
    `capacity` on are dropped. In a ring, p goes to slot p % capacity and only the last
    `capacity` of the num_tokens tokens are stored: the same chunk would overwrite the
    earlier ones. The arguments are int32 and broadcast against each other; so does
    the int32 result.
    """
    positions = start + t
    keep = t < num_tokens
    if ring:
        keep &= t >= num_tokens - capacity
        slots = positions % capacity
    else:
        keep &= positions < capacity
        slots = positions
    return jnp.where(keep, slots, capacity)


def quantize_into_cache(
    new: jax.Array, stored: QuantizedTensor, start: jax.Array, num_tokens: jax.Array, *, ring: bool
) -> QuantizedTensor:
    """new float [B, T, Hkv, D] into stored [B, Hkv, S, D] at start, num_tokens int32 [B]."""
    q = quantize(new, stored.fmt, global_scale=stored.global_scale)
    return write_rows(stored, q.data, q.scales, start, num_tokens, ring=ring)


def write_rows(
    stored: QuantizedTensor, data: jax.Array, scales: jax.Array | None, start: jax.Array,
    num_tokens: jax.Array, *, ring: bool,
) -> QuantizedTensor:
    """Writes a chunk already encoded in stored's format and global scale, data [B, T,
    Hkv, ...] and scales [B, T, Hkv, D/bs] (or None), into stored [B, Hkv, S, D] at
    start, num_tokens int32 [B], as `quantize_into_cache` places rows."""
    batch, chunk = data.shape[:2]
    slots = token_slots(start[:, None], num_tokens[:, None], jnp.arange(chunk)[None, :],
                        stored.data.shape[2], ring)
    rows = jnp.arange(batch)[:, None]

    def put(buffer, values):
        # Advanced indices around a slice put [B, T] first: values are [B, T, Hkv, ...].
        return buffer.at[rows, :, slots].set(values, mode="drop")

    new_scales = None if stored.scales is None else put(stored.scales, scales)
    return dataclasses.replace(stored, data=put(stored.data, data), scales=new_scales)
