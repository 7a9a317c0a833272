"""`fp4_e2m1`: SGLang's FP4 KV recipe (`FP4MXBlock16KVQuantizeUtil`), byte for byte.

Per block of 16 elements along head_dim:
  e = ceil(log2(max(absmax / 6, 1e-10)))      (float32 log2, correctly rounded)
  scale byte = e + 127                         (an all-zero block stores 94, 2**-33)
  y = x / 2**e; magnitude index = count of (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0) that
  |y| reaches (ties round away from zero); sign bit where y < 0.
Dequantize: value(code) * 2**(byte - 127). The ceil scale means nothing saturates on
write; on read, the one value past float32's range (4.0 * 2**126, from inputs of
|x| >= 3.5 * 2**126) saturates to float32's largest value.
A block holding NaN or an infinity stores scale byte 255 and reads back as NaN; that
is our choice, SGLang leaves it undefined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import e2m1
from fp4kv_jax.formats.base import Codec
from fp4kv_jax.formats.registry import register

NONFINITE_SCALE = 255
_MIN_SCALED_ABSMAX = 1e-10


class SglangFp4Codec(Codec):
    name = "fp4_e2m1"
    data_dtype = jnp.uint8
    elements_per_datum = 2
    plane_exponent = e2m1.PLANE_EXPONENT
    plane_scale_ptx = e2m1.ptx_exponent_scale(NONFINITE_SCALE)
    plane_scale_pair_ptx = e2m1.ptx_exponent_scale_pair()
    block_size = 16
    scale_dtype = jnp.uint8

    def encode(self, x, global_scale):
        return self.encode_planes(e2m1.split_planes(x), global_scale, ptx=False)

    def encode_planes(self, planes, global_scale, *, ptx):
        blocks = e2m1.plane_blocks(planes, self.block_size)
        absmax, bad = e2m1.block_absmax(blocks)
        per_six = e2m1.divide(absmax, e2m1.MAX_MAGNITUDE, ptx=ptx)
        exponent = e2m1.ceil_log2_rounded(jnp.maximum(per_six, jnp.float32(_MIN_SCALED_ABSMAX)))
        power = e2m1.exact_pow2(-exponent)[..., None]
        codes = []
        for block in blocks:
            y = block * power
            codes.append(e2m1.with_sign(e2m1.magnitude_index_ties_away(jnp.abs(y)), y))
        packed = jnp.where(bad[..., None], jnp.uint8(0), e2m1.pack_planes(*codes))
        scales = jnp.where(bad, NONFINITE_SCALE, exponent + 127).astype(jnp.uint8)
        return packed.reshape(planes[0].shape), scales

    def decode(self, data, scales, global_scale) -> jax.Array:
        values = e2m1.block_view(e2m1.code_values(e2m1.unpack(data)), self.block_size)
        exponent = scales.astype(jnp.int32) - 127
        out = e2m1.scale_by_pow2(values, exponent[..., None])
        # Code 4.0 under scale byte 253 is 2**128, one binade past float32: saturate it.
        largest = jnp.finfo(jnp.float32).max
        out = jnp.clip(out, -largest, largest)
        out = jnp.where((scales == NONFINITE_SCALE)[..., None], jnp.nan, out)
        return out.reshape(*data.shape[:-1], -1)

    def decode_planes(self, data, scales, *, ptx):
        return e2m1.decode_packed_planes(data, e2m1.exponent_byte_scale(scales, NONFINITE_SCALE), self.block_size, ptx=ptx)


register(SglangFp4Codec())
