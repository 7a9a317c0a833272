"""`mxfp4`: OCP Microscaling MXFP4 (v1.0), blocks of 32 with an E8M0 scale.

Per block: shared exponent e = floor(log2(absmax)) - 2 (2 is E2M1's emax), stored as
e + 127, clamped to [0, 254]; an all-zero block stores 0. Elements are x / 2**e rounded
to nearest-even on the E2M1 grid, saturating at +-6. A block holding NaN or an infinity
stores 255, E8M0's NaN, and reads back as NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import e2m1
from fp4kv_jax.formats.base import Codec
from fp4kv_jax.formats.registry import register

E8M0_NAN = 255
_EMAX_E2M1 = 2


class Mxfp4Codec(Codec):
    name = "mxfp4"
    data_dtype = jnp.uint8
    elements_per_datum = 2
    plane_exponent = e2m1.PLANE_EXPONENT
    plane_scale_ptx = e2m1.ptx_exponent_scale(E8M0_NAN)
    plane_scale_pair_ptx = e2m1.ptx_exponent_scale_pair()
    block_size = 32
    scale_dtype = jnp.uint8

    def encode(self, x, global_scale):
        return self.encode_planes(e2m1.split_planes(x), global_scale, ptx=False)

    def encode_planes(self, planes, global_scale, *, ptx):
        blocks = e2m1.plane_blocks(planes, self.block_size)
        absmax, bad = e2m1.block_absmax(blocks)
        exponent = jnp.clip(e2m1.exponent_of(absmax) - _EMAX_E2M1, -127, 127)[..., None]
        codes = []
        for block in blocks:
            y = e2m1.scale_by_pow2(block, -exponent)
            codes.append(e2m1.with_sign(e2m1.magnitude_index_nearest_even(jnp.abs(y)), y))
        packed = jnp.where(bad[..., None], jnp.uint8(0), e2m1.pack_planes(*codes))
        scales = jnp.where(bad, E8M0_NAN, exponent[..., 0] + 127).astype(jnp.uint8)
        return packed.reshape(planes[0].shape), scales

    def decode(self, data, scales, global_scale) -> jax.Array:
        values = e2m1.block_view(e2m1.code_values(e2m1.unpack(data)), self.block_size)
        out = e2m1.scale_by_pow2(values, scales.astype(jnp.int32)[..., None] - 127)
        out = jnp.where((scales == E8M0_NAN)[..., None], jnp.nan, out)
        return out.reshape(*data.shape[:-1], -1)

    def decode_planes(self, data, scales, *, ptx):
        return e2m1.decode_packed_planes(data, e2m1.exponent_byte_scale(scales, E8M0_NAN), self.block_size, ptx=ptx)


register(Mxfp4Codec())
