"""Building blocks shared by the models: linear layers, RMSNorm, rotary embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fp4kv_jax.models.configs import ModelConfig


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel [in, out] (HF stores [out, in])."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: jnp.dtype):
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...], precision="highest")
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalize in float32, then scale in the input dtype."""

    def __init__(self, size: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> tuple[jax.Array, float]:
    """(inverse frequencies float32 [head_dim / 2], attention scaling of cos/sin).

    Supports the default rope, linear scaling and YaRN, following HF transformers.
    """
    dim = config.head_dim
    inv = 1.0 / config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn(inv, config, scaling)
    raise ValueError(f"rope_scaling: rope type {kind!r} is not supported by the models; valid: default, linear, yarn.")


def _yarn(inv: jax.Array, config: ModelConfig, scaling: dict) -> tuple[jax.Array, float]:
    import math

    dim, base = config.head_dim, config.rope_theta
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)
    mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    return inv, mscale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float) -> jax.Array:
    """HF `rotate_half` RoPE. x [B, T, H, D], positions int32 [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = (jnp.cos(angles) * scale)[:, :, None, :]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
