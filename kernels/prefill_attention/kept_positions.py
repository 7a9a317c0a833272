"""Prefill over a layer that keeps positions in full precision (KIVI's sinks and recent
window), for a kernel that attends only to the stored positions in between
(`pallas_mosaic`): this module attends to the kept ones and merges the two softmax
states, where the attention sinks join.

A query at position i reads positions p < keep_first and i - keep_recent < p <= i from
the full-precision keys and values by position (`cache.kept_values`), the rest from the
cache. The recent positions of a block of BLOCK queries lie in BLOCK + keep_recent
consecutive positions, so this costs about (1 + keep_recent / BLOCK) times the chunk's
own attention, whatever the prefix's length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fp4kv_jax.kernels import tiles

BLOCK = 64  # queries that share one span of recent positions


def kept_state(q: jax.Array, full_k: jax.Array, full_v: jax.Array, start: jax.Array, *, keep_first: int,
               keep_recent: int, window: int | None, sm_scale: float):
    """The softmax state of each query over the kept positions it reads.

    Args:
      q: float [B, T, Hq, D] at positions start + t, in the layer's stored (rotated) frame.
      full_k, full_v: float [B, Hkv, S, D], the full-precision keys and values by position.
      start: int32 [B], each sequence's length before the chunk.
      window: each query sees only its last `window` positions, if given.

    Returns:
      out float32 [B, T, Hq, D] (unnormalized), peak and total float32 [B, T, Hq]; peaks
      in natural-log units, tiles.MASKED (total 0) for a query that reads none.
    """
    batch, chunk, num_heads, head_dim = q.shape
    kv_heads, capacity = full_k.shape[1], full_k.shape[2]
    group = num_heads // kv_heads
    blocks = pl.cdiv(chunk, BLOCK)
    span = BLOCK + keep_recent  # a block's recent positions: [its first - keep_recent, its first + BLOCK)
    if capacity < span:  # so that a span always fits (the padding is never read)
        pad = ((0, 0), (0, 0), (0, span - capacity), (0, 0))
        full_k, full_v, capacity = jnp.pad(full_k, pad), jnp.pad(full_v, pad), span
    block_first = start[:, None] + BLOCK * jnp.arange(blocks)  # [B, blocks]
    queries = block_first[:, :, None] + jnp.arange(BLOCK)  # [B, blocks, BLOCK]
    span_first = jnp.clip(block_first - keep_recent, 0, capacity - span)
    recent = span_first[:, :, None] + jnp.arange(span)  # [B, blocks, span]
    first = jnp.broadcast_to(jnp.arange(keep_first), (batch, blocks, keep_first))
    positions = jnp.concatenate([first, recent], axis=-1)  # [B, blocks, K]: the keys each block may read
    keys = full_k[jnp.arange(batch)[:, None, None], :, positions]  # [B, blocks, K, Hkv, D]
    values = full_v[jnp.arange(batch)[:, None, None], :, positions]

    i, p = queries[..., :, None], positions[..., None, :]  # [B, blocks, BLOCK, K]
    is_first = jnp.arange(positions.shape[-1]) < keep_first
    read = (p <= i) & jnp.where(is_first, True, (p >= keep_first) & (p > i - keep_recent))
    if window is not None:
        read &= p > i - window
    read = read[:, :, None, None]  # [B, blocks, 1, 1, BLOCK, K]

    grouped = jnp.pad(q.astype(jnp.float32) * sm_scale, ((0, 0), (0, blocks * BLOCK - chunk), (0, 0), (0, 0)))
    grouped = grouped.reshape(batch, blocks, BLOCK, kv_heads, group, head_dim)
    scores = jnp.einsum("bntkgd,bnskd->bnkgts", grouped, keys.astype(jnp.float32))
    scores = jnp.where(read, scores, tiles.MASKED)
    peak = jnp.max(scores, axis=-1)
    weights = jnp.where(read, jnp.exp(scores - peak[..., None]), 0.0)
    out = jnp.einsum("bnkgts,bnskd->bntkgd", weights, values.astype(jnp.float32))
    by_query = lambda x: x.reshape(batch, blocks * BLOCK, num_heads, *x.shape[5:])[:, :chunk]
    to_rows = lambda x: by_query(x.transpose(0, 1, 4, 2, 3))  # [B, blocks, Hkv, G, BLOCK] -> [B, T, Hq]
    return by_query(out), to_rows(peak), to_rows(jnp.sum(weights, axis=-1))


def merge(stored_out: jax.Array, stored_lse2: jax.Array, kept, sinks: jax.Array | None) -> jax.Array:
    """Combines the stored positions' attention with the kept positions' state.

    Args:
      stored_out: float [B, T, Hq, D], normalized over the stored positions (0 where a
        query reads none).
      stored_lse2: float32 [B, T, Hq], its log-sum-exp in base 2 (tiles.MASKED where none).
      kept: `kept_state`'s (out, peak, total).
      sinks: float [Hq] learned sink logits that join the denominator only.

    Returns:
      float32 [B, T, Hq, D].
    """
    kept_out, kept_peak, kept_total = kept
    stored_lse = stored_lse2 * math.log(2.0)
    best = jnp.maximum(stored_lse, kept_peak)
    if sinks is not None:
        best = jnp.maximum(best, sinks.astype(jnp.float32))
    stored_weight, kept_weight = jnp.exp(stored_lse - best), jnp.exp(kept_peak - best)
    denominator = stored_weight + kept_total * kept_weight
    if sinks is not None:
        denominator += jnp.exp(sinks.astype(jnp.float32) - best)
    out = stored_out.astype(jnp.float32) * stored_weight[..., None] + kept_out * kept_weight[..., None]
    return out / denominator[..., None]
