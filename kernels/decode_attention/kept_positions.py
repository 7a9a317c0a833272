"""Decode over a layer that keeps positions in full precision (KIVI's sinks and recent
window, `LayerCache.kept_k`): the kernel attends to the stored positions in between,
this module to the kept ones, and the two softmax states merge like flash-decoding's
splits (`splits.merge`, where the sinks join): `skipped` tells a kernel what to leave
out, `with_kept_split` adds the kept positions' state to the kernel's.

For the query at position i = length - 1, after its own write, the layer's kept copies
hold exactly what it reads from them: positions p < keep_first in slots 0.., and the
last keep_recent positions in a ring (slot keep_first + p % keep_recent). The kernel
then reads the stored positions [keep_first, length - keep_recent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4kv_jax.cache import LayerCache, kept_slot_positions
from fp4kv_jax.kernels import tiles


def served_slot_positions(layer: LayerCache, lengths: jax.Array) -> jax.Array:
    """int32 [B, keep_first + keep_recent]: the position each kept slot serves to the
    newest query, or -1 where it serves none (not yet written, a ring slot repeating a
    first position, or outside the layer's window)."""
    positions = kept_slot_positions(layer, lengths)
    in_ring = jnp.arange(positions.shape[1]) >= layer.keep_first
    served = (positions >= 0) & (~in_ring | (positions >= layer.keep_first))
    if layer.window is not None:
        served &= positions >= lengths[:, None] - layer.window
    return jnp.where(served, positions, -1)


def skipped(kept: LayerCache | None) -> dict:
    """A decode kernel's skip_first, skip_recent: the leading and newest positions it
    leaves to `with_kept_split` (none without a layer keeping positions)."""
    if kept is None:
        return dict(skip_first=0, skip_recent=0)
    return dict(skip_first=kept.keep_first, skip_recent=kept.keep_recent)


def with_kept_split(states, q: jax.Array, kept: LayerCache | None, lengths: jax.Array, *, sm_scale: float,
                    rows: int, num_planes: int, value_factor: jax.Array):
    """A decode kernel's split states (out, peak, total), with the kept positions' state
    appended as one more split when `kept` is a layer keeping positions.

    Args:
      states: out float32 [B, Hkv, splits, P, rows, D / P] (unnormalized), peak and
        total float32 [B, Hkv, splits, rows], peaks in natural-log units.
      q: float [B, Hq, D], in the layer's stored (rotated) frame.
      rows: query rows per KV head in the kernel's states (the group, padded).
      num_planes: the kernel's planes (`split_planes`) of its output.
      value_factor: float32 [], what the merged output is multiplied by afterwards (V's
        plane factor); the kept output is divided by it here.

    Returns:
      the three states, with one more split when `kept` is given.
    """
    if kept is None:
        return states
    kept_split = _kept_state(q, kept, lengths, sm_scale=sm_scale, rows=rows, num_planes=num_planes,
                             value_factor=value_factor)
    return tuple(jnp.concatenate(pair, axis=2) for pair in zip(states, kept_split))


def _kept_state(q, layer: LayerCache, lengths, *, sm_scale, rows, num_planes, value_factor):
    """The kept positions' softmax state as one split of `with_kept_split`'s states."""
    batch, num_heads, head_dim = q.shape
    kv_heads = layer.kept_k.shape[1]
    group = num_heads // kv_heads
    grouped = (q.astype(jnp.float32) * sm_scale).reshape(batch, kv_heads, group, head_dim)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    served = (served_slot_positions(layer, lengths) >= 0)[:, None, None, :]  # [B, 1, 1, slots]
    scores = jnp.einsum("bhrd,bhsd->bhrs", grouped, layer.kept_k.astype(jnp.float32))
    scores = jnp.where(served, scores, tiles.MASKED)
    peak = jnp.max(scores, axis=-1)
    weights = jnp.where(served, jnp.exp(scores - peak[..., None]), 0.0)
    out = jnp.einsum("bhrs,bhsd->bhrd", weights, layer.kept_v.astype(jnp.float32)) / value_factor
    out = tiles.split_planes(out, num_planes)
    return out[:, :, None], peak[:, :, None], jnp.sum(weights, axis=-1)[:, :, None]
