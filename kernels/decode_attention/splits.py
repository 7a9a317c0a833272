"""What the decode kernels share outside their kernels: the query group each program
takes, flash-decoding's split of each sequence's positions across programs, and the
merge of the splits' partial softmax states (where the attention sinks join the
denominator)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fp4kv_jax.formats import QuantizedTensor, format_names, get_codec
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.decode_tile_ptx import MIN_BLOCK_SIZE

PROGRAMS_PER_SM = 4
DEFAULT_SMS = 132
# What the Mosaic GPU kernels take: GQA groups of up to 16, and for pallas_mosaic the
# packed FP4 formats, whose codecs give the PTX of a block-scale decode, in blocks the
# tile decode takes (`decode_tile_ptx.MIN_BLOCK_SIZE` values or more).
PACKED_FP4_FORMATS = tuple(
    name for name in format_names()
    if get_codec(name).plane_scale_ptx is not None and get_codec(name).block_size >= MIN_BLOCK_SIZE
)
MAX_PACKED_GROUP = 16


def check_layer(implementation: str, k: QuantizedTensor, group: int, block: int, formats: tuple[str, ...]) -> None:
    """Raises ValueError, naming `implementation`, unless k is a layer in one of
    `formats` with head_dim 64 or 128 and a capacity that is a multiple of `block`,
    read by GQA groups of at most MAX_PACKED_GROUP query heads."""
    if k.fmt not in formats:
        raise ValueError(
            f"implementation: {implementation!r} handles {', '.join(formats)}, "
            f"not {k.fmt!r}; use 'pallas_triton'."
        )
    head_dim, capacity = k.shape[-1], k.shape[-2]
    if head_dim not in (64, 128):
        raise ValueError(f"implementation: {implementation!r} needs head_dim 64 or 128, got {head_dim}.")
    if capacity % block:
        raise ValueError(
            f"implementation: {implementation!r} needs a cache capacity that is a multiple of "
            f"{block}, got {capacity}."
        )
    if group > MAX_PACKED_GROUP:
        raise ValueError(
            f"implementation: {implementation!r} takes up to {MAX_PACKED_GROUP} query heads per KV "
            f"head, got {group}."
        )


def grouped_queries(q: jax.Array, k: QuantizedTensor, rows: int, sm_scale: float) -> jax.Array:
    """q [B, Hq, D] -> float32 [B, Hkv, rows, D]: each KV head's query heads, padded
    with zero rows, times the softmax scale and K's plane factor (which the kernels
    leave out of the decoded keys)."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = (q.astype(jnp.float32) * (sm_scale * tiles.plane_factor(k))).reshape(
        batch, kv_heads, num_heads // kv_heads, head_dim
    )
    return jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - grouped.shape[2]), (0, 0)))


def plan(batch: int, kv_heads: int, capacity: int, block_k: int, num_splits: int | None):
    """(chunk, splits): positions per split, a multiple of block_k, and their count."""
    blocks = pl.cdiv(capacity, block_k)
    if num_splits is None:
        target = PROGRAMS_PER_SM * DEFAULT_SMS
        num_splits = max(1, min(blocks, pl.cdiv(target, batch * kv_heads)))
    chunk = pl.cdiv(blocks, num_splits) * block_k
    return chunk, pl.cdiv(capacity, chunk)


def plan_waves(batch: int, kv_heads: int, capacity: int, block: int, warps: int, resident: int,
               num_splits: int | None):
    """(chunk, splits) for programs of `warps` warps taking blocks of `block`
    positions, `resident` of which run on the GPU at once.

    By default the split count minimizes waves of programs per split (the time, if
    every block costs the same), over splits that leave each warp a block; a split
    beyond one must gain a tenth, because its states are merged outside the kernel.
    """
    blocks = pl.cdiv(capacity, block)
    if num_splits is None:
        programs = batch * kv_heads
        cost = lambda s: pl.cdiv(programs * s, resident) / s
        candidates = range(1, max(1, min(blocks // warps, pl.cdiv(2 * resident, programs))) + 1)
        best = min(candidates, key=cost)
        num_splits = 1 if cost(1) <= 1.1 * cost(best) else best
    chunk = pl.cdiv(blocks, num_splits) * block
    return chunk, pl.cdiv(capacity, chunk)


def merge(out, peak, total, sinks, group):
    """Combines per-split (unnormalized out, running max, sum) into float32 [B, Hq, D].

    out [B, Hkv, splits, P, rows, D/P]; peak, total [B, Hkv, splits, rows].
    """
    batch, kv_heads, _, _, rows, _ = out.shape
    best = jnp.max(peak, axis=2)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(kv_heads, group)
        sink = jnp.pad(sink, ((0, 0), (0, rows - group)), constant_values=tiles.MASKED)[None]
        best = jnp.maximum(best, sink)
    weight = jnp.exp(peak - best[:, :, None])
    denominator = jnp.sum(total * weight, axis=2)
    if sinks is not None:
        denominator += jnp.exp(sink - best)
    merged = jnp.sum(out * weight[:, :, :, None, :, None], axis=2)
    merged = merged / denominator[:, :, None, :, None]
    merged = tiles.merge_planes(merged)  # [B, Hkv, rows, D]
    return merged[:, :, :group].reshape(batch, kv_heads * group, -1)
