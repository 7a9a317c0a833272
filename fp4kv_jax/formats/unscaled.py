"""Unscaled floating-point caches: `float32` (reference runs), `bf16` and `fp16`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fp4kv_jax.formats.base import Codec
from fp4kv_jax.formats.registry import register


class CastCodec(Codec):
    """Stores each element cast to `data_dtype`; fp16 saturates at its largest finite value.

    NaN stores the one NaN numpy writes for the dtype: a backend's conversion picks its
    own (XLA on CPU keeps numpy's, the GPU's cvt writes all ones), and stored bytes
    should not depend on where they were written.
    """

    def __init__(self, name: str, dtype: jnp.dtype):
        self.name = name
        self.data_dtype = dtype

    def encode(self, x, global_scale):
        largest = float(jnp.finfo(self.data_dtype).max)
        saturated = jnp.where(jnp.isfinite(x), jnp.clip(x, -largest, largest), x)
        bits_dtype = jnp.dtype(f"uint{8 * jnp.dtype(self.data_dtype).itemsize}")
        nan_bits = np.array(np.nan, self.data_dtype).view(bits_dtype)
        stored = jax.lax.bitcast_convert_type(saturated.astype(self.data_dtype), bits_dtype)
        stored = jnp.where(jnp.isnan(x), nan_bits, stored)
        return jax.lax.bitcast_convert_type(stored, self.data_dtype), None

    def decode(self, data, scales, global_scale) -> jax.Array:
        return data.astype(jnp.float32)


register(CastCodec("float32", jnp.float32))
register(CastCodec("bf16", jnp.bfloat16))
register(CastCodec("fp16", jnp.float16))
