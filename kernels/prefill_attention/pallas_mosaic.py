"""Flash attention of a prefill chunk over a packed FP4 layer in Pallas (Mosaic GPU
lowering, Hopper): TMA, wgmma, and a warpgroup that decodes the cache for the others.

Grid (head group, query block, batch). A program takes `block_t` = 64 chunk positions
for `compute_warpgroups` query heads of one KV group, one head a warpgroup, and one
more warpgroup that feeds them:

  - the feeding warpgroup copies each block of `block_k` stored positions (packed
    bytes and block scales) into a ring of `num_stages` shared-memory stages by TMA,
    and decodes them there into a ring of two bf16 tiles for K and for V (the inline
    PTX of `decode_tile_ptx`), which every compute warpgroup reads;
  - each compute warpgroup runs FlashAttention over those tiles with wgmma:
    S [64, block_k] = Q [64, D] @ K_tile^T, then O [64, D] += P @ V_tile, P from
    registers.

So the cache is decoded once a program, not once a head, and the decode overlaps the
tensor cores' work instead of preceding it. Decoded tiles are plane-major (columns
[0, D/2) the even elements, [D/2, D) the odd ones, as a packed byte holds one of each);
the queries are permuted to match outside the kernel and the output back.

Scores are in log2 units: the queries come scaled by sm_scale * log2(e) (and K's plane
factor), so the softmax is exp2. Only the blocks on the causal diagonal, the window's
edge and the chunk's end are masked; the ones in between take the unmasked loop.

With `feed_warpgroup=False` one warpgroup decodes each block and then attends to it,
P passing through shared memory: the schedule Mosaic GPU interpret mode runs (its
threads cannot run wgmma), there with the codec's portable `decode_planes` as decode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels import mosaic_tiles, tiles
from fp4kv_jax.kernels.decode_attention import splits

SUPPORTED_FORMATS = splits.PACKED_FP4_FORMATS
BLOCK_T = 64  # chunk positions a program takes: wgmma's M
_DECODED_SLOTS = 2  # bf16 K and V tiles in flight between the decoding and the compute warpgroups
_LOG2E = math.log2(math.e)

# Registers a thread (setmaxnreg): the compute warpgroups hold S, O and P; the feeding
# warpgroup only addresses and decodes. Two compute warpgroups and the feed take
# 2 x 216 + 72 = 504 of the 512 a warpgroup's share of the register file (65536 / 128)
# allows, FlashAttention-3's total; with all 512 (216 and 80) the kernel deadlocked on
# an H200, the compute warpgroups waiting for registers that never came free.
_COMPUTE_REGISTERS = 216
_FEED_REGISTERS = 72


def _kernel(
    start_ref, q_ref, sinks_ref, out_scale_ref, k_data_ref, k_scales_ref, v_data_ref, v_scales_ref,
    o_ref,
    q_smem, k_data_smem, k_scales_smem, v_data_smem, v_scales_smem, k_tiles, v_tiles,
    q_barriers, staged, k_ready, v_ready, k_free, v_free, schedule,
    *, decode, feed_warpgroup, ping_pong, compute_warpgroups, chunk, block_k, window,
):
    batch = lax.axis_index("batch")
    head_group = lax.axis_index("head_group")
    kv_head = head_group * compute_warpgroups // (q_ref.shape[2] // k_data_ref.shape[1])
    num_stages = k_data_smem.shape[0]

    start = start_ref[batch]
    first = start + lax.axis_index("q_block") * BLOCK_T  # the block's first query position
    limit = start + chunk  # positions written: the prefix and the chunk
    last = jnp.minimum(first + BLOCK_T, limit)  # one past the block's last real query
    lo_block = 0 if window is None else jnp.maximum(first - window + 1, 0) // block_k
    hi_block = pl.cdiv(last, block_k)
    # Blocks every row sees whole: past the window's edge for the last row, before the
    # diagonal for the first and inside the written positions.
    whole_lo = lo_block if window is None else pl.cdiv(jnp.maximum(first + BLOCK_T - window, 0), block_k)
    whole_lo = jnp.clip(whole_lo, lo_block, hi_block)
    whole_hi = jnp.clip(jnp.minimum(first + 1, limit) // block_k, whole_lo, hi_block)

    def fetch(block, stage):
        mosaic_tiles.copy_kv_block(
            (k_data_ref, k_scales_ref, v_data_ref, v_scales_ref),
            (k_data_smem.at[stage], k_scales_smem.at[stage], v_data_smem.at[stage], v_scales_smem.at[stage]),
            staged.at[stage], batch, kv_head, block,
        )

    def feed(block, slot, wait_free, mark_ready):
        """Decodes staged block `block` into tile `slot`, then refills its stage."""
        stage = lax.rem(block - lo_block, num_stages)
        plgpu.barrier_wait(staged.at[stage])
        wait_free(k_free.at[slot])
        decode(k_data_smem.at[stage], k_scales_smem.at[stage], k_tiles.at[slot])
        plgpu.commit_smem()  # the keys are visible to wgmma
        mark_ready(k_ready.at[slot])
        wait_free(v_free.at[slot])
        decode(v_data_smem.at[stage], v_scales_smem.at[stage], v_tiles.at[slot])
        plgpu.commit_smem()  # the values too, and every thread is done with the stage
        mark_ready(v_ready.at[slot])
        pl.when(block + num_stages < hi_block)(functools.partial(fetch, block + num_stages, stage))

    def attend(lane, slot_of, wait_ready, mark_free, before_block, p_smem=None, turn=None):
        """Query head `lane` of this program (one a compute warpgroup) over blocks
        [lo_block, hi_block); writes its output.
        The weights P go to wgmma from registers, or through `p_smem` when given.

        turn: None, or the barrier two compute warpgroups take turns on (ping-pong,
        as in FlashAttention-3): each passes it once its scores are issued and once its
        softmax is done, so one warpgroup's softmax runs under the other's wgmma.
        """
        def take_turn():
            if turn is not None:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        head = head_group * compute_warpgroups + lane
        my_q = q_smem.at[lane]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first - start, BLOCK_T), head], my_q, q_barriers.at[lane])
        plgpu.barrier_wait(q_barriers.at[lane])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        peak = plgpu.layout_cast(jnp.full((BLOCK_T,), tiles.MASKED, jnp.float32), row_layout)
        total = plgpu.layout_cast(jnp.zeros((BLOCK_T,), jnp.float32), row_layout)
        out = plgpu.layout_cast(jnp.zeros((BLOCK_T, q_ref.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)

        def block_step(block, carry, masked: bool):
            out, peak, total = carry
            before_block(block)
            slot = slot_of(block)
            wait_ready(k_ready.at[slot])

            def scores_of(acc_ref):
                plgpu.wgmma(acc_ref, my_q, k_tiles.at[slot].transpose((1, 0)))
                take_turn()
                return acc_ref[...]

            scores = pl.run_scoped(scores_of, plgpu.ACC((BLOCK_T, block_k), jnp.float32))
            mark_free(k_free.at[slot])
            if masked:
                shape = (BLOCK_T, block_k)
                rows = first + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                keys = block * block_k + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                visible = (keys <= rows) & (keys < limit)
                if window is not None:
                    visible &= keys > rows - window
                scores = jnp.where(visible, scores, tiles.MASKED)
            new_peak = jnp.maximum(peak, scores.max(axis=1))
            correction = jnp.exp2(peak - new_peak)
            weights = jnp.exp2(scores - lax.broadcast_in_dim(new_peak, scores.shape, [0]))
            total = total * correction + weights.sum(axis=1)
            out = out * lax.broadcast_in_dim(correction, out.shape, [0])
            if turn is not None:
                plgpu.barrier_arrive(turn)  # this softmax is done
            wait_ready(v_ready.at[slot])
            if turn is not None:
                plgpu.barrier_wait(turn)  # the tensor cores are free
            if p_smem is None:  # accumulate in place
                def weighted_values(acc_ref):
                    plgpu.wgmma(acc_ref, weights.astype(jnp.bfloat16), v_tiles.at[slot])

                out = pl.run_state(weighted_values)(plgpu.ACC.init(out))
            else:
                p_smem[...] = weights.astype(jnp.bfloat16)
                plgpu.commit_smem()  # P is visible to wgmma

                def weighted_values(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_tiles.at[slot])
                    return acc_ref[...]

                out = out + pl.run_scoped(weighted_values, plgpu.ACC(out.shape, jnp.float32))
            mark_free(v_free.at[slot])
            return out, new_peak, total

        if turn is not None:
            pl.when(lane == 1)(take_turn)  # the second warpgroup starts a turn later
        carry = (out, peak, total)
        carry = lax.fori_loop(lo_block, whole_lo, functools.partial(block_step, masked=True), carry)
        carry = lax.fori_loop(whole_lo, whole_hi, functools.partial(block_step, masked=False), carry)
        out, peak, total = lax.fori_loop(whole_hi, hi_block, functools.partial(block_step, masked=True), carry)
        if turn is not None:
            pl.when(lane == 0)(take_turn)  # and the first one ends a turn later

        # The sink joins the denominator only; the output takes V's plane factor.
        sink = sinks_ref[head]
        best = jnp.maximum(peak, sink)
        rescale = jnp.exp2(peak - best)
        denominator = total * rescale + jnp.exp2(sink - best)
        factor = rescale * out_scale_ref[0] / denominator
        plgpu.commit_smem()  # every warp's wgmma is done reading the queries
        my_q[...] = (out * lax.broadcast_in_dim(factor, out.shape, [0])).astype(jnp.bfloat16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, o_ref.at[batch, pl.ds(first - start, BLOCK_T), head])
        plgpu.wait_smem_to_gmem(0)

    def fill_stages():
        for stage in range(num_stages):
            pl.when(lo_block + stage < hi_block)(functools.partial(fetch, lo_block + stage, stage))

    no_barrier = lambda barrier: None
    slot_of = lambda block: lax.rem(block - lo_block, _DECODED_SLOTS)

    if not feed_warpgroup:
        # One warpgroup decodes each block into slot 0, then attends to it; P goes
        # through shared memory (interpret mode's wgmma takes no register operand).
        def before_block(block):
            plgpu.commit_smem()  # every warp's wgmma is done with the last block's tiles
            feed(block, 0, no_barrier, no_barrier)

        fill_stages()
        pl.run_scoped(
            functools.partial(attend, 0, lambda block: 0, no_barrier, no_barrier, before_block),
            mosaic_tiles.swizzled_tile(BLOCK_T, block_k),
        )
        return

    @pl.when(lax.axis_index("warpgroup") == compute_warpgroups)
    def _feed():
        plgpu.set_max_registers(_FEED_REGISTERS, action="decrease")
        fill_stages()
        pl.loop(lo_block, hi_block)(lambda block: feed(block, slot_of(block), plgpu.barrier_wait, plgpu.barrier_arrive))

    @pl.when(lax.axis_index("warpgroup") < compute_warpgroups)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        for slot in range(_DECODED_SLOTS):  # both tiles start free
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
        turn = schedule if ping_pong else None
        attend(lax.axis_index("warpgroup"), slot_of, plgpu.barrier_wait, plgpu.barrier_arrive, lambda block: None, turn=turn)


def check_supported(k: QuantizedTensor, group: int, block_k: int = 128) -> None:
    """Raises ValueError unless this implementation handles the layer's K (and V) for a
    GQA group of `group` query heads per KV head."""
    splits.check_layer("pallas_mosaic", k, group, block_k, SUPPORTED_FORMATS)
    if block_k not in (64, 128):
        raise ValueError(f"block_k: 'pallas_mosaic' takes 64 or 128, got {block_k}.")


def default_compute_warpgroups(group: int) -> int:
    """Two query heads a program where the group splits in pairs, else one."""
    return 2 if group % 2 == 0 else 1


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "window", "block_k", "num_stages", "feed_warpgroup", "compute_warpgroups", "ping_pong",
        "interpret",
    ),
)
def prefill_attention(
    q: jax.Array,
    k: QuantizedTensor,
    v: QuantizedTensor,
    start: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    sinks: jax.Array | None,
    block_k: int = 128,
    num_stages: int = 2,
    feed_warpgroup: bool | None = None,
    compute_warpgroups: int | None = None,
    ping_pong: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, Hq, D]; k, v packed FP4 [B, Hkv, S, D] holding the chunk at positions
    start .. start + T - 1; start int32 [B] -> [B, T, Hq, D] in q's dtype.

    feed_warpgroup: whether a warpgroup of its own decodes the cache for the compute
      warpgroups (the default on the GPU), or one warpgroup decodes each block and then
      attends to it (the only schedule interpret mode runs: its threads cannot run wgmma).
    compute_warpgroups: query heads a program (1 or 2; default
      `default_compute_warpgroups`; 1 without a feed warpgroup).
    ping_pong: whether two compute warpgroups take turns on the tensor cores.
    """
    codec = get_codec(k.fmt)
    batch, chunk, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    check_supported(k, group, block_k)
    feed_warpgroup = not interpret if feed_warpgroup is None else feed_warpgroup
    if feed_warpgroup and interpret:
        raise ValueError("feed_warpgroup: interpret mode runs only the schedule without one (False).")
    if compute_warpgroups is None:
        compute_warpgroups = default_compute_warpgroups(group) if feed_warpgroup else 1
    if compute_warpgroups not in (1, 2) or group % compute_warpgroups or (compute_warpgroups > 1 and not feed_warpgroup):
        raise ValueError(
            "compute_warpgroups: 1, or 2 for an even GQA group with a feed warpgroup; got "
            f"{compute_warpgroups} for a group of {group}{'' if feed_warpgroup else ' without one'}."
        )
    slots = _DECODED_SLOTS if feed_warpgroup else 1
    num_blocks = pl.cdiv(chunk, BLOCK_T)
    padded = num_blocks * BLOCK_T

    # Queries plane-major, in log2 units, with K's plane factor; padded to whole blocks.
    qs = q.astype(jnp.float32) * (sm_scale * _LOG2E * tiles.plane_factor(k))
    qs = jnp.concatenate([qs[..., 0::2], qs[..., 1::2]], axis=-1)
    qs = jnp.pad(qs, ((0, 0), (0, padded - chunk), (0, 0), (0, 0))).astype(jnp.bfloat16)
    sink_logits = jnp.full((num_heads,), tiles.MASKED, jnp.float32)
    if sinks is not None:
        sink_logits = sinks.astype(jnp.float32) * _LOG2E
    out_scale = jnp.reshape(tiles.plane_factor(v), (1,)).astype(jnp.float32)

    packed = (block_k, head_dim // 2)
    block_scale_rows = block_k * head_dim // codec.block_size // mosaic_tiles.SCALE_ROW
    decode = (
        functools.partial(mosaic_tiles.decode_portable, codec)
        if interpret
        else functools.partial(mosaic_tiles.decode_tile_ptx, codec)
    )
    kernel = functools.partial(
        _kernel, decode=decode, feed_warpgroup=feed_warpgroup, ping_pong=bool(ping_pong) and compute_warpgroups == 2,
        compute_warpgroups=compute_warpgroups, chunk=chunk,
        block_k=block_k, window=window,
    )
    stages = lambda shape: plgpu.SMEM((num_stages, *shape), jnp.uint8)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((batch, padded, num_heads, head_dim), jnp.bfloat16),
        scratch_types=(
            mosaic_tiles.swizzled_tiles(compute_warpgroups, BLOCK_T, head_dim),  # q, then the output
            stages(packed),
            stages((block_scale_rows, mosaic_tiles.SCALE_ROW)),
            stages(packed),
            stages((block_scale_rows, mosaic_tiles.SCALE_ROW)),
            mosaic_tiles.swizzled_tiles(slots, block_k, head_dim),  # decoded keys
            mosaic_tiles.swizzled_tiles(slots, block_k, head_dim),  # decoded values
            plgpu.Barrier(num_barriers=compute_warpgroups),
            plgpu.Barrier(num_arrivals=4, num_barriers=num_stages),  # K, V data and scales
            plgpu.Barrier(num_barriers=slots),  # decoded K ready, V ready, K tile free, V tile free
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_arrivals=compute_warpgroups, num_barriers=slots),
            plgpu.Barrier(num_arrivals=compute_warpgroups, num_barriers=slots),
            plgpu.Barrier(num_arrivals=compute_warpgroups),  # the ping-pong's turns
        ),
        grid=(num_heads // compute_warpgroups, num_blocks, batch),
        grid_names=("head_group", "q_block", "batch"),
        num_threads=compute_warpgroups + 1 if feed_warpgroup else None,
        thread_name="warpgroup" if feed_warpgroup else None,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(
        start.astype(jnp.int32), qs, sink_logits, out_scale,
        k.data, mosaic_tiles.scale_rows(k.scales), v.data, mosaic_tiles.scale_rows(v.scales),
    )
    out = out[:, :chunk].reshape(batch, chunk, num_heads, 2, head_dim // 2)
    return jnp.swapaxes(out, -1, -2).reshape(batch, chunk, num_heads, head_dim).astype(q.dtype)
