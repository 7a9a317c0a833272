"""Float32 reference for decode attention over a stored layer: dequantize, then attend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.cache import positions_in_slots
from fp4kv_jax.formats import dequantize
from fp4kv_jax.kernels.masked_softmax import masked_softmax


def attended_mask(
    lengths: jax.Array, capacity: int, window: int | None, ring: bool
) -> jax.Array:
    """bool [B, capacity]: the slots a query at position length - 1 attends to.

    Positions p < length; with a window, only p >= length - window (the last `window`
    positions, the query's own included).
    """
    positions = positions_in_slots(lengths, capacity, ring)
    lengths = lengths[:, None]
    mask = (positions >= 0) & (positions < lengths)
    if window is not None:
        mask &= positions >= lengths - window
    return mask


def decode_attention(
    q: jax.Array,
    k,
    v,
    lengths: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    ring: bool,
    sinks: jax.Array | None,
) -> jax.Array:
    """q float [B, Hq, D]; k, v QuantizedTensor [B, Hkv, S, D] -> float32 [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    keys = dequantize(k)
    values = dequantize(v)
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, precision="highest") * sm_scale
    mask = attended_mask(lengths, capacity, window, ring)[:, None, None, :]
    sink = None if sinks is None else sinks.astype(jnp.float32).reshape(1, num_kv_heads, group, 1)
    probs = masked_softmax(scores, mask, sink)
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, values, precision="highest")
    return out.reshape(batch, num_heads, head_dim)
