"""`nvfp4_search`: nvfp4 bytes with each block scale searched over the e4m3 grid.

Plain nvfp4 rounds absmax / 6 / global to e4m3; Four Over Six (`nvfp4_4over6`) also
tries absmax / 4. Here every block of 16 tries the e4m3 value nvfp4 picks, the
STEPS_UP e4m3 values above it (each 11% to 13% larger; four reach about absmax / 4)
and the one below it (which clips the block's largest values to 6), and keeps the one
whose encoding has the smallest squared error, sum of (x - code * scale)**2. Ties keep
the earlier candidate in that order; blocks with a zero or NaN scale are not searched.

The squared error is computed alike by every backend, so the Pallas write stores the
CPU's bytes: each value's miss |x / scale - code| is exact in float32 (the code is
the grid point next to x / scale), is truncated to a multiple of 2**-12 and capped at
1 (only candidates clipped at the e4m3 maximum, or stepped below a subnormal e4m3
scale, miss by more), and is squared and summed as integers, whose sum no summation
order or fused multiply-add changes; the sum times scale**2 is two float32 products.

The stored bytes are plain nvfp4 (`Nvfp4Codec.decode`), so every nvfp4 reader, the
kernels included, reads them as they are. Encoding costs six nvfp4 encodes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import e2m1
from fp4kv_jax.formats.nvfp4 import E4M3_MAX, EncodedBlocks, Nvfp4Codec
from fp4kv_jax.formats.registry import register

STEPS_UP = 4
# Candidates after nvfp4's own scale, in e4m3 steps: the order in which ties are kept.
SCALE_STEPS = (*range(1, STEPS_UP + 1), -1)
# The squared error's fixed point: misses in units of 2**-12 of the block scale, so a
# block of 16 sums to at most 16 * 4096**2 = 2**28, inside int32.
MISS_UNITS = 4096
_LARGEST_SCALE_BITS = int(jnp.float8_e4m3fn(E4M3_MAX).view(jnp.uint8))


class Nvfp4SearchCodec(Nvfp4Codec):
    name = "nvfp4_search"

    def encode_planes(self, planes, global_scale, *, ptx):
        blocks = e2m1.plane_blocks(planes, self.block_size)
        absmax, bad = e2m1.block_absmax(blocks)
        nearest = self.block_scale_for(absmax, bad, global_scale, e2m1.MAX_MAGNITUDE, ptx=ptx)
        nearest_bits = jax.lax.bitcast_convert_type(nearest, jnp.uint8).astype(jnp.int32)
        searched = ~bad & (nearest_bits > 0)
        first = self.encode_with_scales(blocks, bad, nearest, global_scale, ptx=ptx)
        best_codes, best_scale, best_error = first.codes, first.scale, squared_error(first)
        for step in SCALE_STEPS:
            # Positive e4m3 values increase with their bits: one more is the next value up.
            moved = jnp.clip(nearest_bits + step, 1, _LARGEST_SCALE_BITS)
            scale_bits = jnp.where(searched, moved, nearest_bits).astype(jnp.uint8)
            scale = jax.lax.bitcast_convert_type(scale_bits, jnp.float8_e4m3fn)
            candidate = self.encode_with_scales(blocks, bad, scale, global_scale, ptx=ptx)
            error = squared_error(candidate)
            better = error < best_error
            best_codes = tuple(jnp.where(better[..., None], c, b) for c, b in zip(candidate.codes, best_codes))
            best_scale = jnp.where(better, scale, best_scale)
            best_error = jnp.where(better, error, best_error)
        return e2m1.pack_planes(*best_codes).reshape(planes[0].shape), best_scale


def squared_error(encoded: EncodedBlocks) -> jax.Array:
    """float32 [..., n]: each block's squared error sum (x - code * scale)**2, from
    the misses truncated to multiples of 2**-12 of the scale (see the module
    docstring); NaN for a NaN scale."""
    total = 0
    for y, codes in zip(encoded.scaled, encoded.codes):
        miss = jnp.minimum(jnp.abs(y - e2m1.value_by_bits(codes)), 1.0)
        units = (miss * MISS_UNITS).astype(jnp.int32)
        total = total + jnp.sum(units * units, axis=-1)
    return total.astype(jnp.float32) * encoded.denominator * encoded.denominator


register(Nvfp4SearchCodec())
