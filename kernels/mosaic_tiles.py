"""What the Mosaic GPU attention kernels share: shared-memory tiles in wgmma's layout,
block scales in rows a TMA copy takes, and the decode of a packed FP4 tile into a bf16
tile (inline PTX on the GPU, the codec's portable decode in interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.kernels.decode_tile_ptx import decode_tile as decode_tile_ptx

SCALE_ROW = 16  # block scales are copied as [*, 16]-byte rows (TMA's 16-byte minimum)

__all__ = [
    "SCALE_ROW", "copy_kv_block", "decode_portable", "decode_tile_ptx", "scale_rows", "swizzled_tile", "swizzled_tiles",
]


def _swizzle(dtype) -> tuple:
    cols_per_tile = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, cols_per_tile)), plgpu.SwizzleTransform(128))


def swizzled_tile(rows: int, cols: int, dtype=jnp.bfloat16) -> plgpu.SMEM:
    """A [rows, cols] shared tile in wgmma's 128-byte-swizzled layout."""
    return plgpu.SMEM((rows, cols), dtype, transforms=_swizzle(dtype))


def swizzled_tiles(count: int, rows: int, cols: int, dtype=jnp.bfloat16) -> plgpu.SMEM:
    """`count` such tiles, [count, rows, cols]; `.at[i]` is tile i."""
    return plgpu.SMEM((count, rows, cols), dtype, transforms=_swizzle(dtype))


def scale_rows(scales: jax.Array) -> jax.Array:
    """Block scales [B, H, S, D/bs] -> uint8 [B, H, S * D/bs / 16, 16], TMA-copyable."""
    if scales.dtype != jnp.uint8:
        scales = lax.bitcast_convert_type(scales, jnp.uint8)
    batch, heads = scales.shape[:2]
    return scales.reshape(batch, heads, -1, SCALE_ROW)


def copy_kv_block(sources, stages, barrier, batch, head, block) -> None:
    """Starts the TMA copies of block `block` of one KV head: `sources` are (K data, K
    scale rows, V data, V scale rows) in global memory, [B, H, N, C] each; `stages` the
    shared [R, C] refs they go to, in that order, R rows a block; all complete on
    `barrier` (4 arrivals)."""
    for source, stage in zip(sources, stages, strict=True):
        rows = stage.shape[0]
        plgpu.copy_gmem_to_smem(source.at[batch, head, pl.ds(block * rows, rows)], stage, barrier)


def decode_portable(codec, data_ref, scales_ref, out_ref):
    """Packed tile [R, D/2] and its scale rows -> bf16 tile [R, D] in channel order, by
    the codec's `decode_planes` (what `decode_tile_ptx` computes, for interpret mode)."""
    rows = data_ref.shape[0]
    scales = scales_ref[...].reshape(rows, -1)
    if jnp.dtype(codec.scale_dtype) != jnp.uint8:
        scales = lax.bitcast_convert_type(scales, codec.scale_dtype)
    even, odd = codec.decode_planes(data_ref[...], scales, ptx=False)
    out_ref[...] = jnp.stack([even, odd], axis=-1).reshape(rows, -1).astype(jnp.bfloat16)
