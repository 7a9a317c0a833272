"""`nvfp4_4over6`: nvfp4 bytes with each block's scale chosen by Four Over Six.

Four Over Six (Cook et al., 2025) encodes every block of 16 twice, scaled so that its
absmax maps to 6 (plain nvfp4) and to 4, and keeps the encoding with the smaller error:
E2M1 has no code between 4 and 6, so a block whose large values sit near 5 loses less
on the grid 0..4 at a finer scale. The error here is the block's largest absolute
error, max |x / scale - code| * scale, computed from the exact division that the codes
round, so every backend (XLA, the Pallas kernels) makes the same choice bit for bit;
the paper's squared error would depend on summation order. Ties keep the scale of 6.

The stored bytes are plain nvfp4 (`Nvfp4Codec.decode`), so every nvfp4 reader, the
kernels and SGLang's included, reads them as they are.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from fp4kv_jax.formats import e2m1
from fp4kv_jax.formats.nvfp4 import Nvfp4Codec
from fp4kv_jax.formats.registry import register

SMALLER_TARGET = 4.0  # the absmax's code in the finer candidate


class Nvfp4FourOverSixCodec(Nvfp4Codec):
    name = "nvfp4_4over6"

    def encode_planes(self, planes, global_scale, *, ptx):
        six = self.encode_blocks(planes, global_scale, e2m1.MAX_MAGNITUDE, ptx=ptx)
        four = self.encode_blocks(planes, global_scale, SMALLER_TARGET, ptx=ptx)

        def error(blocks):
            # scaled - code is exact (the code is the nearest grid point), so only the
            # final product rounds; a non-finite block's NaN error keeps the six.
            worst = functools.reduce(jnp.maximum, [
                jnp.max(jnp.abs(y - e2m1.value_by_bits(c)), axis=-1)
                for y, c in zip(blocks.scaled, blocks.codes)
            ])
            return worst * blocks.denominator

        use_four = error(four) < error(six)
        packed = jnp.where(use_four[..., None], four.packed, six.packed)
        return packed.reshape(planes[0].shape), jnp.where(use_four, four.scale, six.scale)


register(Nvfp4FourOverSixCodec())
