"""Float32 reference for prefill attention over a stored layer: dequantize, then attend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax import channel_keys
from fp4kv_jax.cache import positions_in_slots
from fp4kv_jax.formats import dequantize
from fp4kv_jax.kernels.masked_softmax import masked_softmax


def _with_chunk(stored, chunk_values, start):
    """stored f32 [B, Hkv, S, D] with positions start .. start + T - 1 replaced by
    chunk_values [B, T, Hkv, D]."""
    chunk = chunk_values.astype(jnp.float32).transpose(0, 2, 1, 3)
    return jax.vmap(lambda s, c, i: jax.lax.dynamic_update_slice(s, c, (0, i, 0)))(stored, chunk, start)


def prefill_attention(
    q, k, v, start, *, sm_scale, window, ring, sinks, chunk_k=None, chunk_v=None, kept=None,
    keys_per_channel=False,
):
    """q [B, T, Hq, D]; k, v QuantizedTensor [B, Hkv, S, D]; start int32 [B];
    chunk_k, chunk_v None or [B, T, Hkv, D] -> f32 [B, T, Hq, D].

    kept: None, or (full_k, full_v, keep_first, keep_recent): a query at position i
    reads position p from full_k, full_v [B, Hkv, S, D] where p < keep_first or
    p > i - keep_recent, and from k, v elsewhere. keys_per_channel: k is stored per
    channel (`fp4kv_jax.channel_keys`).
    """
    batch, chunk, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    keys = channel_keys.decode(k) if keys_per_channel else dequantize(k)
    values = dequantize(v)
    if chunk_k is not None:
        keys, values = _with_chunk(keys, chunk_k, start), _with_chunk(values, chunk_v, start)
    qg = q.astype(jnp.float32).reshape(batch, chunk, num_kv_heads, group, head_dim)
    score = lambda keys: jnp.einsum("bthgd,bhsd->bhgts", qg, keys, precision="highest") * sm_scale
    attend = lambda probs, values: jnp.einsum("bhgts,bhsd->bthgd", probs, values, precision="highest")
    scores = score(keys)
    query_pos = (start[:, None] + jnp.arange(chunk)[None, :])[:, None, None, :, None]
    # Slots past the chunk hold positions >= start + chunk, which no query attends to.
    key_pos = positions_in_slots(start + chunk, capacity, ring)[:, None, None, None, :]
    mask = (key_pos >= 0) & (key_pos <= query_pos)
    if window is not None:
        mask &= key_pos > query_pos - window
    if kept is not None:
        full_k, full_v, keep_first, keep_recent = kept
        in_full = (key_pos < keep_first) | (key_pos > query_pos - keep_recent)
        scores = jnp.where(in_full, score(full_k), scores)
    sink = None if sinks is None else sinks.astype(jnp.float32).reshape(1, num_kv_heads, group, 1, 1)
    probs = masked_softmax(scores, mask, sink)
    if kept is None:
        out = attend(probs, values)
    else:
        out = attend(jnp.where(in_full, probs, 0.0), full_v) + attend(jnp.where(in_full, 0.0, probs), values)
    return out.reshape(batch, chunk, num_heads, head_dim)
