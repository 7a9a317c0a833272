"""Unscaled floating-point caches: `float32` (reference runs), `bf16` and `fp16`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.formats.base import Codec
from fp4kv_jax.formats.registry import register


class CastCodec(Codec):
    """Stores each element cast to `data_dtype`; fp16 saturates at its largest finite value."""

    def __init__(self, name: str, dtype: jnp.dtype):
        self.name = name
        self.data_dtype = dtype

    def encode(self, x, global_scale):
        largest = float(jnp.finfo(self.data_dtype).max)
        saturated = jnp.where(jnp.isfinite(x), jnp.clip(x, -largest, largest), x)
        return saturated.astype(self.data_dtype), None

    def decode(self, data, scales, global_scale) -> jax.Array:
        return data.astype(jnp.float32)


register(CastCodec("float32", jnp.float32))
register(CastCodec("bf16", jnp.bfloat16))
register(CastCodec("fp16", jnp.float16))
