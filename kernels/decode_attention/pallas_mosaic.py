"""Flash-decoding over a packed FP4 layer in Pallas (Mosaic GPU lowering, Hopper).

Grid (split, kv_head, batch), one warpgroup a program. TMA copies each block of
`block_k` positions (packed bytes and block scales) into a ring of `num_stages`
shared-memory slots; the warpgroup decodes the block there into bf16 tiles, and wgmma
reads them straight from shared memory:

    S^T [block_k, N] = K_tile [block_k, D] @ q^T [D, N]      (positions as wgmma's M)
    O^T [D, N]      += V_tile^T [D, block_k] @ P^T [block_k, N]

where N = 8 or 16 rows hold the GQA group's query heads (padded). Putting positions, not
heads, on M keeps the tensor cores' work at 8 or 16 rows instead of wgmma's minimum 64.
The loop is software-pipelined: a block's values are decoded while its scores are in
flight on the tensor cores, and the next block's keys while its weighted values are.
Decoded tiles are in channel order, so the queries and O^T need no permutation. The
splits' partial softmax states are merged in XLA with the sinks (`splits.merge`), as
for the Triton kernel.

On the GPU the decode is inline PTX (`decode_tile_ptx`); in Mosaic GPU interpret mode
it is the codec's portable `decode_planes`, and a GPU test checks they agree bit for
bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.cache import LayerCache
from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels import mosaic_tiles, tiles
from fp4kv_jax.kernels.decode_attention import kept_positions, splits

SUPPORTED_FORMATS = splits.PACKED_FP4_FORMATS


# Explicit layouts (Lane semantics): the inline-PTX decode owns its threads' work.
# approx_math: exp by ex2.approx, as FlashAttention-3 does. No automatic barriers
# around every shared-memory store, copy and branch: `_kernel` places its own.
COMPILER_PARAMS = plgpu.CompilerParams(
    lowering_semantics=mgpu.LoweringSemantics.Lane, approx_math=True, unsafe_no_auto_barriers=True
)


def _kernel(
    lengths_ref, q_ref, k_data_ref, k_scales_ref, v_data_ref, v_scales_ref,
    o_ref, m_ref, l_ref,
    q_smem, k_data_smem, k_scales_smem, v_data_smem, v_scales_smem, q_barrier, barriers,
    *, decode, block_k, chunk, capacity, window, ring, skip_first, skip_recent, num_stages,
):
    batch = lax.axis_index("batch")
    head = lax.axis_index("kv_head")
    split = lax.axis_index("split")
    length = lengths_ref[batch]
    head_rows, head_dim = q_smem.shape

    lo = split * chunk
    hi = jnp.minimum(jnp.minimum(lo + chunk, capacity), length)
    if window is not None and not ring:
        lo = jnp.maximum(lo, length - window)
    # A layer's full-precision positions (the first and the newest) are attended outside.
    lo = jnp.maximum(lo, skip_first)
    hi = jnp.minimum(hi, length - skip_recent)
    first = lo // block_k
    last = jnp.where(hi > lo, pl.cdiv(hi, block_k), first)

    def fetch(block, slot):
        mosaic_tiles.copy_kv_block(
            (k_data_ref, k_scales_ref, v_data_ref, v_scales_ref),
            (k_data_smem.at[slot], k_scales_smem.at[slot], v_data_smem.at[slot], v_scales_smem.at[slot]),
            barriers.at[slot], batch, head, block,
        )

    plgpu.copy_gmem_to_smem(q_ref.at[batch, head], q_smem, q_barrier)
    for stage in range(num_stages):
        pl.when(first + stage < last)(functools.partial(fetch, first + stage, stage))
    plgpu.barrier_wait(q_barrier)

    def decode_keys(block, k_tile):
        slot = lax.rem(block - first, num_stages)
        plgpu.barrier_wait(barriers.at[slot])
        decode(k_data_smem.at[slot], k_scales_smem.at[slot], k_tile)
        plgpu.commit_smem()  # visible to wgmma

    def attend(k_tile, v_tile, p_smem):
        """Runs the blocks of this split, software-pipelined: block i's values are
        decoded while its scores are computed, and block i + 1's keys while its
        weighted values are."""
        column = plgpu.Layout.WGMMA.reduce(0)
        peak = plgpu.layout_cast(jnp.full((head_rows,), tiles.MASKED, jnp.float32), column)
        total = plgpu.layout_cast(jnp.zeros((head_rows,), jnp.float32), column)
        out = plgpu.layout_cast(jnp.zeros((head_dim, head_rows), jnp.float32), plgpu.Layout.WGMMA)
        pl.when(first < last)(functools.partial(decode_keys, first, k_tile))

        def body(block, carry):
            out, peak, total = carry
            slot = lax.rem(block - first, num_stages)
            # Every warp is past the last block's weighted values (its wgmma read the
            # value tile and P, both rewritten below); the keys' decode was committed.
            plgpu.commit_smem()

            def scores_of(acc_ref):
                plgpu.wgmma(acc_ref, k_tile, q_smem.transpose((1, 0)))
                decode(v_data_smem.at[slot], v_scales_smem.at[slot], v_tile)
                return acc_ref[...]

            scores = pl.run_scoped(scores_of, plgpu.ACC((block_k, head_rows), jnp.float32))
            slots = block * block_k + plgpu.broadcasted_iota(
                jnp.int32, (block_k, head_rows), 0, layout=plgpu.Layout.WGMMA
            )
            valid = (slots >= lo) & (slots < hi)
            if ring and window is not None:
                positions = length - 1 - lax.rem(length - 1 - slots, capacity)
                valid &= positions >= length - window
            scores = jnp.where(valid, scores, tiles.MASKED)
            new_peak = jnp.maximum(peak, scores.max(axis=0))
            correction = jnp.exp(peak - new_peak)
            weights = jnp.exp(scores - lax.broadcast_in_dim(new_peak, scores.shape, [1]))
            weights = jnp.where(valid, weights, 0.0)
            total = total * correction + weights.sum(axis=0)
            p_smem.transpose((1, 0))[...] = weights.astype(jnp.bfloat16)
            plgpu.commit_smem()  # P and the values are visible to wgmma, the slot is read
            pl.when(block + num_stages < last)(functools.partial(fetch, block + num_stages, slot))

            def block_out_of(acc_ref):
                plgpu.wgmma(acc_ref, v_tile.transpose((1, 0)), p_smem.transpose((1, 0)))
                pl.when(block + 1 < last)(functools.partial(decode_keys, block + 1, k_tile))
                return acc_ref[...]

            block_out = pl.run_scoped(block_out_of, plgpu.ACC((head_dim, head_rows), jnp.float32))
            out = out * lax.broadcast_in_dim(correction, out.shape, [1]) + block_out
            return out, new_peak, total

        return lax.fori_loop(first, last, body, (out, peak, total))

    out, peak, total = pl.run_scoped(
        attend,
        mosaic_tiles.swizzled_tile(block_k, head_dim),  # decoded keys
        mosaic_tiles.swizzled_tile(block_k, head_dim),  # decoded values
        mosaic_tiles.swizzled_tile(head_rows, block_k),  # P, the weights
    )

    plgpu.commit_smem()  # every warp is done with `attend`'s tiles

    def write(o_smem, ml_smem):  # shared memory reused from `attend`'s tiles
        o_smem[...] = out
        ml_smem[0] = peak
        ml_smem[1] = total
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[batch, head, split])
        plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[batch, head, split])
        plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[batch, head, split])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        write, plgpu.SMEM((head_dim, head_rows), jnp.float32), plgpu.SMEM((2, head_rows), jnp.float32)
    )


def check_supported(k: QuantizedTensor, group: int, block_k: int = 64) -> None:
    """Raises ValueError unless this implementation handles the layer's K (and V) for a
    GQA group of `group` query heads per KV head."""
    splits.check_layer("pallas_mosaic", k, group, block_k, SUPPORTED_FORMATS)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "window", "ring", "block_k", "num_splits", "num_stages", "interpret"),
)
def decode_attention(
    q: jax.Array,
    k: QuantizedTensor,
    v: QuantizedTensor,
    lengths: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    ring: bool,
    sinks: jax.Array | None,
    kept: LayerCache | None = None,
    block_k: int = 64,
    num_splits: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """q [B, Hq, D]; k, v packed FP4 [B, Hkv, S, D]; lengths int32 [B] -> [B, Hq, D] in q's dtype.

    kept: the layer, when it keeps positions in full precision (`LayerCache.kept_k`):
      the kernel skips them and they join the merge as one more split
      (`kept_positions`).
    """
    codec = get_codec(k.fmt)
    batch, num_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    check_supported(k, group, block_k)
    head_rows = 8 if group <= 8 else 16  # wgmma's N: the group's query heads, padded
    chunk, num_split_programs = splits.plan(batch, kv_heads, capacity, block_k, num_splits)

    # K's plane factor joins the queries, V's the output.
    qg = splits.grouped_queries(q, k, head_rows, sm_scale).astype(jnp.bfloat16)

    block_scale_rows = block_k * head_dim // codec.block_size // mosaic_tiles.SCALE_ROW
    decode = mosaic_tiles.decode_portable if interpret else mosaic_tiles.decode_tile_ptx
    decode = functools.partial(decode, codec)

    packed = (block_k, head_dim // 2)
    kernel = functools.partial(
        _kernel, decode=decode, block_k=block_k, chunk=chunk, capacity=capacity,
        window=window, ring=ring, num_stages=num_stages, **kept_positions.skipped(kept),
    )
    stage = lambda shape: plgpu.SMEM((num_stages, *shape), jnp.uint8)
    out, peak, total = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, head_dim, head_rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, head_rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, head_rows), jnp.float32),
        ),
        scratch_types=(
            mosaic_tiles.swizzled_tile(head_rows, head_dim, jnp.bfloat16),  # q
            stage(packed),
            stage((block_scale_rows, mosaic_tiles.SCALE_ROW)),
            stage(packed),
            stage((block_scale_rows, mosaic_tiles.SCALE_ROW)),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_arrivals=4, num_barriers=num_stages),  # K, V data and scales
        ),
        grid=(num_split_programs, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=COMPILER_PARAMS,
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(
        lengths.astype(jnp.int32), qg,
        k.data, mosaic_tiles.scale_rows(k.scales), v.data, mosaic_tiles.scale_rows(v.scales),
    )
    # O^T [D, N] -> [1 plane, N, D], the layout the split merge takes.
    out = jnp.swapaxes(out, -1, -2)[:, :, :, None]
    out, peak, total = kept_positions.with_kept_split(
        (out, peak, total), q, kept, lengths, sm_scale=sm_scale, rows=head_rows, num_planes=1,
        value_factor=tiles.plane_factor(v),
    )
    return (splits.merge(out, peak, total, sinks, group) * tiles.plane_factor(v)).astype(q.dtype)
