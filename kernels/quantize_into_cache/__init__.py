"""Quantize new keys or values straight into one cache tensor's stored buffers.

    stored = quantize_into_cache(new, stored, start, num_tokens=None, ring=False,
                                 implementation=None)

`write_rows(stored, data, scales, start, num_tokens, ring=False)` places a chunk
already encoded in the cache's format the same way (query-aware key rounding encodes
its own codes).

`new` is token-major [B, T, Hkv, D], as attention computes K and V (and as
`cache.write_layer` takes them); the cache is head-major [B, Hkv, S, ...]. Token t of
sequence b goes to position start[b] + t, in the slot given by `token_slots`. The
stored bytes equal `quantize(new, stored.fmt, global_scale=stored.global_scale)`
written row by row; rows not written keep their bytes.

Implementations:
  "reference"      `quantize` on the whole chunk, then one scatter of its rows.
  "pallas_triton"  one pass: each program encodes a tile of tokens in registers and
                   stores its rows; on CPU it runs in Pallas interpret mode.
The default is "pallas_triton" on GPU (unless the cache is one the kernel cannot
address, see `tiles.overflows_int32_offsets`) and "reference" elsewhere. Both
update the buffers in place when the caller's jit donates them (`donate_argnums`);
without donation XLA copies them first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.quantize_into_cache import pallas_triton, reference
from fp4kv_jax.kernels.quantize_into_cache.reference import token_slots, write_rows

IMPLEMENTATIONS = ("reference", "pallas_triton")


def quantize_into_cache(
    new: jax.Array,
    stored: QuantizedTensor,
    start: jax.Array,
    *,
    num_tokens: jax.Array | int | None = None,
    ring: bool = False,
    implementation: str | None = None,
    **tuning,
) -> QuantizedTensor:
    """Quantizes a chunk of new keys (or values) and writes it into `stored`.

    Args:
      new: float [B, T, Hkv, D], T new tokens per sequence.
      stored: the cache tensor, logically [B, Hkv, S, D] (S slots); its global scale
        (fp8, nvfp4; a positive finite float32) is the one the chunk is stored with.
      start: int32 [B], the position (>= 0) of each sequence's token 0: its current length.
      num_tokens: int or int32 [B], the leading tokens of the chunk to write per
        sequence, clipped to [0, T]; default all T.
      ring: the tensor is a ring buffer: position p lives in slot p % S, and of a
        chunk only the last S written tokens survive. Otherwise positions from S on
        are dropped.
      implementation: one of IMPLEMENTATIONS, or None for
        `tiles.default_implementation(stored)`.
      **tuning: passed to the Pallas implementation (block_t, num_warps).

    Returns:
      `stored` with the chunk written: the same shapes, dtypes and global scale.
    """
    implementation = implementation or tiles.default_implementation(stored)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: unknown {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}."
        )
    start = jnp.asarray(start)
    _check(new, stored, start)
    batch, chunk = new.shape[:2]
    if num_tokens is None:
        num_tokens = chunk
    num_tokens = jnp.asarray(num_tokens)
    if num_tokens.shape not in ((), (batch,)) or not jnp.issubdtype(num_tokens.dtype, jnp.integer):
        raise ValueError(
            f"num_tokens: expected an int or integer shape ({batch},), got "
            f"{num_tokens.dtype} shape {num_tokens.shape}."
        )
    counts = jnp.clip(jnp.broadcast_to(num_tokens, (batch,)), 0, chunk).astype(jnp.int32)
    start = start.astype(jnp.int32)
    if implementation == "reference":
        if tuning:
            raise ValueError(f"tuning: the reference takes none, got {sorted(tuning)}.")
        return reference.quantize_into_cache(new, stored, start, counts, ring=ring)
    interpret = tiles.interpret_mode(stored, arg="stored")
    return pallas_triton.quantize_into_cache(
        new, stored, start, counts, ring=ring, interpret=interpret, **tuning
    )


def _check(new: jax.Array, stored: QuantizedTensor, start: jax.Array) -> None:
    codec = get_codec(stored.fmt, arg="stored")
    if new.ndim != 4:
        raise ValueError(f"new: expected [batch, T, kv_heads, head_dim], got shape {new.shape}.")
    if not jnp.issubdtype(new.dtype, jnp.floating):
        raise TypeError(f"new: expected a floating-point dtype, got {new.dtype}.")
    codec.check_last_dim(new.shape[-1], arg="new")
    if stored.data.ndim != 4:
        raise ValueError(
            f"stored: expected data [batch, kv_heads, slots, ...], got shape {stored.data.shape}."
        )
    batch, kv_heads, slots, head_dim = stored.shape
    if (new.shape[0], new.shape[2], new.shape[3]) != (batch, kv_heads, head_dim):
        raise ValueError(
            f"new: shape {new.shape} does not match the cache's batch {batch}, kv_heads "
            f"{kv_heads} and head_dim {head_dim}."
        )
    if stored.data.dtype != codec.data_dtype:
        raise TypeError(
            f"stored: format {stored.fmt!r} stores data as {jnp.dtype(codec.data_dtype)}, "
            f"got {stored.data.dtype}."
        )
    if codec.block_size is not None:
        expected = (batch, kv_heads, slots, head_dim // codec.block_size)
        if stored.scales is None or stored.scales.shape != expected:
            got = None if stored.scales is None else stored.scales.shape
            raise ValueError(f"stored: expected scales of shape {expected}, got {got}.")
        if stored.scales.dtype != codec.scale_dtype:
            raise TypeError(
                f"stored: format {stored.fmt!r} stores scales as "
                f"{jnp.dtype(codec.scale_dtype)}, got {stored.scales.dtype}."
            )
    if codec.has_global_scale and (
        stored.global_scale is None or jnp.shape(stored.global_scale) != ()
    ):
        raise ValueError(f"stored: format {stored.fmt!r} needs a scalar global scale.")
    if start.shape != (batch,) or not jnp.issubdtype(start.dtype, jnp.integer):
        raise ValueError(
            f"start: expected integer shape ({batch},), got {start.dtype} shape {start.shape}."
        )


__all__ = ["IMPLEMENTATIONS", "quantize_into_cache", "token_slots", "write_rows"]
