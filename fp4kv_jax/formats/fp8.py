"""FP8 caches, `fp8_e4m3` and `fp8_e5m2`, with one float32 scale per tensor.

The stored value is x / global_scale in float8; the cache keeps one global scale per
layer for K and one for V (default 1.0, settable or calibrated). Finite values beyond
the format's range saturate; NaN and infinities are stored as NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import e2m1
from fp4kv_jax.formats.base import Codec
from fp4kv_jax.formats.registry import register


class Fp8Codec(Codec):
    has_global_scale = True

    def __init__(self, name: str, dtype: jnp.dtype, ptx_type: str):
        self.name = name
        self.data_dtype = dtype
        # Hopper converts fp8 pairs to f16 pairs in one instruction.
        self.word_f16_pairs_ptx = (
            "{\n.reg .b16 low, high;\nmov.b32 {low, high}, $2;\n"
            f"cvt.rn.f16x2.{ptx_type}x2 $0, low;\ncvt.rn.f16x2.{ptx_type}x2 $1, high;\n}}"
        )

    def encode(self, x, global_scale):
        return self.encode_planes((x,), global_scale, ptx=False)

    def encode_planes(self, planes, global_scale, *, ptx):
        (x,) = planes
        y = e2m1.divide_by_scalar(x, global_scale, ptx=ptx)
        if ptx:
            # The conversion saturates finite values as the clip below does, and would
            # saturate infinities too; x * 0 is NaN exactly where x is not finite, so
            # adding it turns them into NaN (one instruction where a test and a select
            # take two), which the conversion stores as the one NaN byte.
            stored = e2m1.saturated_float8_bytes(y + x * 0.0, self.data_dtype)
            return jax.lax.bitcast_convert_type(stored, self.data_dtype), None
        largest = float(jnp.finfo(self.data_dtype).max)
        y = jnp.where(jnp.isfinite(x), jnp.clip(y, -largest, largest), jnp.nan)
        return e2m1.round_to_float8(y, self.data_dtype), None

    def decode(self, data, scales, global_scale) -> jax.Array:
        return data.astype(jnp.float32) * global_scale


register(Fp8Codec("fp8_e4m3", jnp.float8_e4m3fn, "e4m3"))
register(Fp8Codec("fp8_e5m2", jnp.float8_e5m2, "e5m2"))
