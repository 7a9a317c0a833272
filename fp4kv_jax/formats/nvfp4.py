"""`nvfp4`: NVIDIA's two-level FP4 recipe (TensorRT-LLM, vLLM, SGLang `nvfp4`).

Per block of 16: block_scale = e4m3(absmax / 6 / global_scale), saturating at 448;
q = round_to_e2m1(x / (block_scale * global_scale)), nearest-even, saturating at +-6.
The float32 global scale is per layer, K and V each; `quantize` without one uses
amax / (6 * 448) over the finite values. A block holding NaN or an infinity stores a
NaN block scale and reads back as NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import e2m1
from fp4kv_jax.formats.base import Codec
from fp4kv_jax.formats.registry import register

E4M3_MAX = 448.0


class EncodedBlocks(NamedTuple):
    """One candidate encoding of the blocks of x's even and odd planes: E2M1 codes
    (uint8 [..., n, 8] a plane), e4m3 block scales [..., n], the values divided by
    their block's scale (float32 [..., n, 8] a plane, what the codes round) and that
    divisor (float32 [..., n])."""

    codes: tuple[jax.Array, jax.Array]
    scale: jax.Array
    scaled: tuple[jax.Array, jax.Array]
    denominator: jax.Array

    @property
    def packed(self) -> jax.Array:
        """The codes packed into bytes, uint8 [..., n, 8]."""
        return e2m1.pack_planes(*self.codes)


class Nvfp4Codec(Codec):
    name = "nvfp4"
    data_dtype = jnp.uint8
    elements_per_datum = 2
    plane_exponent = e2m1.PLANE_EXPONENT
    plane_scale_ptx = e2m1.PTX_E4M3_SCALE
    plane_scale_pair_ptx = e2m1.PTX_E4M3_SCALE_PAIR
    block_size = 16
    scale_dtype = jnp.float8_e4m3fn
    has_global_scale = True

    def global_scale_for(self, x):
        amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0))
        return jnp.where(amax > 0, e2m1.divide(amax, e2m1.MAX_MAGNITUDE * E4M3_MAX), 1.0).astype(
            jnp.float32
        )

    def encode(self, x, global_scale):
        return self.encode_planes(e2m1.split_planes(x), global_scale, ptx=False)

    def encode_planes(self, planes, global_scale, *, ptx):
        blocks = self.encode_blocks(planes, global_scale, e2m1.MAX_MAGNITUDE, ptx=ptx)
        return blocks.packed.reshape(planes[0].shape), blocks.scale

    def encode_blocks(self, planes, global_scale, target, *, ptx) -> EncodedBlocks:
        """The planes' blocks encoded with each block scaled so that its absmax maps
        to `target` (6 for nvfp4; at most 6)."""
        blocks = e2m1.plane_blocks(planes, self.block_size)
        absmax, bad = e2m1.block_absmax(blocks)
        block_scale = self.block_scale_for(absmax, bad, global_scale, target, ptx=ptx)
        return self.encode_with_scales(blocks, bad, block_scale, global_scale, ptx=ptx)

    @staticmethod
    def block_scale_for(absmax, bad, global_scale, target, *, ptx) -> jax.Array:
        """float8_e4m3fn [..., n]: absmax / target / global_scale rounded to e4m3,
        saturating at 448; NaN for the non-finite blocks `bad` (bool [..., n])."""
        per_target = e2m1.divide(absmax, target, ptx=ptx)
        wanted = jnp.minimum(e2m1.divide(per_target, global_scale, ptx=ptx), E4M3_MAX)
        return e2m1.round_to_float8(jnp.where(bad, jnp.nan, wanted), jnp.float8_e4m3fn)

    @staticmethod
    def encode_with_scales(blocks, bad, block_scale, global_scale, *, ptx) -> EncodedBlocks:
        """Each plane's blocks (float32 [..., n, b]) rounded to E2M1 under the e4m3 block
        scales `block_scale` [..., n]; the non-finite blocks `bad` get zero codes."""
        denominator = block_scale.astype(jnp.float32) * global_scale
        positive = (denominator > 0)[..., None]
        safe = jnp.where(positive, denominator[..., None], 1.0)
        scaled, codes = [], []
        for block in blocks:
            y = jnp.where(positive, e2m1.divide(block, safe, ptx=ptx), 0.0)
            code = e2m1.with_sign(e2m1.magnitude_index_nearest_even(jnp.abs(y)), y)
            scaled.append(y)
            codes.append(jnp.where(bad[..., None], jnp.uint8(0), code))
        return EncodedBlocks(tuple(codes), block_scale, tuple(scaled), denominator)

    def decode(self, data, scales, global_scale) -> jax.Array:
        values = e2m1.block_view(e2m1.code_values(e2m1.unpack(data)), self.block_size)
        out = values * (scales.astype(jnp.float32) * global_scale)[..., None]
        return out.reshape(*data.shape[:-1], -1)

    def decode_planes(self, data, scales, *, ptx):
        block_scale = scales.astype(jnp.float32)
        return e2m1.decode_packed_planes(data, block_scale, self.block_size, ptx=ptx)


register(Nvfp4Codec())
