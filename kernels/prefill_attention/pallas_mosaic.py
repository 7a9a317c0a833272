"""Flash attention of a prefill chunk over a packed FP4 layer in Pallas (Mosaic GPU
lowering, Hopper): TMA, wgmma, and a warpgroup that decodes the cache for the others.

A work item is `BLOCK_T` = 64 chunk positions of `compute_warpgroups` query heads of
one KV group. The grid is persistent: one program a multiprocessor takes items in turn,
the longest (the chunk's last query blocks) first. A program has one warpgroup a query
head and one more that feeds them:

  - the feeding warpgroup copies each block of `block_k` stored positions (packed
    bytes and block scales) into a ring of `num_stages` shared-memory stages by TMA,
    and decodes them there into a ring of two bf16 tiles for K and for V (the inline
    PTX of `decode_tile_ptx`), which every compute warpgroup reads;
  - each compute warpgroup runs FlashAttention over those tiles with wgmma:
    S [64, block_k] = Q [64, D] @ K_tile^T, then O [64, D] += P @ V_tile, P from
    registers.

So the cache is decoded once a program, not once a head, and the decode overlaps the
tensor cores' work instead of preceding it. Decoded tiles are in channel order, so
the queries and the output are in the layout the caller has.

Scores are in log2 units: each compute warpgroup scales its queries in shared memory
by sm_scale * log2(e) (and K's plane factor), so the softmax is exp2. Only the blocks
on the causal diagonal, the window's edge and the chunk's end are masked; the ones in
between take the unmasked loop.

Over a layer keeping positions in full precision (KIVI's sinks and recent window) a
query at i attends here to the stored positions keep_first <= p <= i - keep_recent
only, and the kernel also writes each row's log-sum-exp, so that `kept_positions` can
attend to the kept ones and merge.

With `feed_warpgroup=False` one warpgroup decodes each block and then attends to it,
P passing through shared memory: the schedule Mosaic GPU interpret mode runs (its
threads cannot run wgmma), there with the codec's portable `decode_planes` as decode.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels import mosaic_tiles, tiles
from fp4kv_jax.kernels.decode_attention import splits
from fp4kv_jax.kernels.prefill_attention import kept_positions

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


class _Item(NamedTuple):
    """One work item: a query block of one head group of one sequence, and the stored
    blocks [lo, hi) it attends to, of which [whole_lo, whole_hi) every row sees whole."""

    batch: jax.Array
    head_group: jax.Array
    start: jax.Array  # the sequence's first chunk position
    first: jax.Array  # the block's first query position
    limit: jax.Array  # positions written: the prefix and the chunk
    lo: jax.Array
    hi: jax.Array
    whole_lo: jax.Array
    whole_hi: jax.Array


def _work_item(start_ref, index, *, head_groups, batch_size, num_blocks, chunk, block_k, window, skip_first,
               skip_recent) -> _Item:
    """Item `index` of the longest-first order: query blocks from the last (which
    attends to the most positions) to the first, each over every head group and sequence.
    A query at i attends to the stored positions skip_first <= p <= i - skip_recent."""
    per_block = head_groups * batch_size
    q_block = num_blocks - 1 - lax.div(index, per_block)
    batch = lax.div(lax.rem(index, per_block), head_groups)
    head_group = lax.rem(index, head_groups)
    start = start_ref[batch]
    first = start + q_block * BLOCK_T
    limit = start + chunk
    last = jnp.minimum(first + BLOCK_T, limit)  # one past the block's last real query
    lo = skip_first // block_k
    if window is not None:
        lo = jnp.maximum(jnp.maximum(first - window + 1, 0) // block_k, lo)
    hi = jnp.maximum(pl.cdiv(jnp.maximum(last - skip_recent, 0), block_k), lo)
    # Blocks every row sees whole: past the window's edge for the last row and the
    # first skipped positions, before the (shifted) diagonal for the first row and
    # inside the written positions.
    whole_lo = pl.cdiv(skip_first, block_k)
    if window is not None:
        whole_lo = jnp.maximum(pl.cdiv(jnp.maximum(first + BLOCK_T - window, 0), block_k), whole_lo)
    whole_lo = jnp.clip(whole_lo, lo, hi)
    whole_hi = jnp.clip((jnp.minimum(first + 1, limit) - skip_recent) // block_k, whole_lo, hi)
    return _Item(batch, head_group, start, first, limit, jnp.asarray(lo), hi, whole_lo, whole_hi)


def _kernel(
    start_ref, q_ref, sinks_ref, q_scale_ref, out_scale_ref, k_data_ref, k_scales_ref, v_data_ref, v_scales_ref,
    *refs, decode, feed_warpgroup, ping_pong, compute_warpgroups, chunk, block_k, window, skip_first, skip_recent,
    items, programs,
):
    """refs: the output (and with skipped positions its log-sum-exp), then the scratch
    (q_smem ... schedule, and with skipped positions lse_smem)."""
    if skip_first or skip_recent:
        o_ref, lse_ref, *refs, lse_smem = refs
    else:
        (o_ref, *refs), lse_ref, lse_smem = refs, None, None
    (q_smem, k_data_smem, k_scales_smem, v_data_smem, v_scales_smem, k_tiles, v_tiles,
     q_barriers, staged, k_ready, v_ready, k_free, v_free, schedule) = refs
    num_stages = k_data_smem.shape[0]
    group = q_ref.shape[2] // k_data_ref.shape[1]
    work_item = functools.partial(
        _work_item, start_ref, head_groups=q_ref.shape[2] // compute_warpgroups, batch_size=q_ref.shape[0],
        num_blocks=pl.cdiv(chunk, BLOCK_T), chunk=chunk, block_k=block_k, window=window, skip_first=skip_first,
        skip_recent=skip_recent,
    )
    # Program p takes items p, 2P - 1 - p, 2P + p, ...: a snake over the longest-first
    # order, so that each program's total is close to the others'.
    program = lax.axis_index("program")
    rounds = pl.cdiv(items, programs)
    index_in = lambda round_: round_ * programs + jnp.where(lax.rem(round_, 2) == 0, program, programs - 1 - program)
    my_rounds = rounds - (index_in(rounds - 1) >= items).astype(jnp.int32)

    def fetch(item, block, stage):
        mosaic_tiles.copy_kv_block(
            (k_data_ref, k_scales_ref, v_data_ref, v_scales_ref),
            (k_data_smem.at[stage], k_scales_smem.at[stage], v_data_smem.at[stage], v_scales_smem.at[stage]),
            staged.at[stage], item.batch, item.head_group * compute_warpgroups // group, block,
        )

    def fill_stages(item, count):
        """Starts the copies of the item's first blocks; `count` blocks came before it."""
        for ahead in range(num_stages):
            pl.when(item.lo + ahead < item.hi)(
                functools.partial(fetch, item, item.lo + ahead, lax.rem(count + ahead, num_stages))
            )

    def feed(item, block, count, slot, wait_free, mark_ready):
        """Decodes block `block`, the program's `count`-th, into tile `slot`, then
        starts the copy of the item's block `num_stages` later into its stage."""
        stage = lax.rem(count, num_stages)
        plgpu.barrier_wait(staged.at[stage])
        wait_free(k_free.at[slot])
        decode(k_data_smem.at[stage], k_scales_smem.at[stage], k_tiles.at[slot])
        plgpu.commit_smem()  # the keys are visible to wgmma
        mark_ready(k_ready.at[slot])
        wait_free(v_free.at[slot])
        decode(v_data_smem.at[stage], v_scales_smem.at[stage], v_tiles.at[slot])
        plgpu.commit_smem()  # the values too, and every thread is done with the stage
        mark_ready(v_ready.at[slot])
        pl.when(block + num_stages < item.hi)(functools.partial(fetch, item, block + num_stages, stage))

    def take_turn(turn):
        """Passes the ping-pong barrier `turn`; nothing when it is None."""
        if turn is not None:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def attend(lane, item, count, slot_of, wait_ready, mark_free, before_block, p_smem=None, turn=None):
        """Query head `lane` of the item's head group (one a compute warpgroup) over
        its blocks, the first the program's `count`-th; writes its output.
        The weights P go to wgmma from registers, or through `p_smem` when given.

        turn: None, or the barrier two compute warpgroups take turns on (ping-pong,
        as in FlashAttention-3): each passes it once its scores are issued and once its
        softmax is done, so one warpgroup's softmax runs under the other's wgmma.
        """
        head = item.head_group * compute_warpgroups + lane
        rows = pl.ds(item.first - item.start, BLOCK_T)
        my_q = q_smem.at[lane]
        plgpu.copy_gmem_to_smem(q_ref.at[item.batch, rows, head], my_q, q_barriers.at[lane])
        plgpu.barrier_wait(q_barriers.at[lane])
        queries = plgpu.load(my_q, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        my_q[...] = (queries * q_scale_ref[0]).astype(jnp.bfloat16)
        plgpu.commit_smem()  # the scaled queries are visible to wgmma
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        peak = plgpu.layout_cast(jnp.full((BLOCK_T,), tiles.MASKED, jnp.float32), row_layout)
        total = plgpu.layout_cast(jnp.zeros((BLOCK_T,), jnp.float32), row_layout)
        out = plgpu.layout_cast(jnp.zeros((BLOCK_T, q_ref.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)

        def block_step(block, carry, masked: bool):
            out, peak, total = carry
            block_count = count + block - item.lo  # blocks this program took before this one
            before_block(item, block, block_count)
            slot = slot_of(block_count)
            wait_ready(k_ready.at[slot])

            def scores_of(acc_ref):
                plgpu.wgmma(acc_ref, my_q, k_tiles.at[slot].transpose((1, 0)))
                take_turn(turn)
                return acc_ref[...]

            scores = pl.run_scoped(scores_of, plgpu.ACC((BLOCK_T, block_k), jnp.float32))
            mark_free(k_free.at[slot])
            if masked:
                shape = (BLOCK_T, block_k)
                queries = item.first + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                keys = block * block_k + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                visible = (keys <= queries - skip_recent) & (keys < item.limit)
                if skip_first:
                    visible &= keys >= skip_first
                if window is not None:
                    visible &= keys > queries - window
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

        carry = (out, peak, total)
        carry = lax.fori_loop(item.lo, item.whole_lo, functools.partial(block_step, masked=True), carry)
        carry = lax.fori_loop(item.whole_lo, item.whole_hi, functools.partial(block_step, masked=False), carry)
        out, peak, total = lax.fori_loop(item.whole_hi, item.hi, functools.partial(block_step, masked=True), carry)

        # The sink joins the denominator only; the output takes V's plane factor.
        sink = sinks_ref[head]
        best = jnp.maximum(peak, sink)
        rescale = jnp.exp2(peak - best)
        denominator = total * rescale + jnp.exp2(sink - best)
        factor = rescale * out_scale_ref[0] / denominator
        if lse_smem is not None:
            # A row that attends to no stored position keeps its peak at MASKED, so its
            # log-sum-exp stays near MASKED and its output weighs nothing in the merge.
            lse_smem.at[lane][...] = best + jnp.log(denominator) * _LOG2E
        plgpu.commit_smem()  # every warp's wgmma is done reading the queries
        my_q[...] = (out * lax.broadcast_in_dim(factor, out.shape, [0])).astype(jnp.bfloat16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, o_ref.at[item.batch, rows, head])
        if lse_smem is not None:
            plgpu.copy_smem_to_gmem(lse_smem.at[lane], lse_ref.at[item.batch, head, rows])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the next item's queries may overwrite it
        return count + item.hi - item.lo

    def over_items(step):
        """Runs step(item, count) -> count over the program's items."""
        lax.fori_loop(0, my_rounds, lambda round_, count: step(work_item(index_in(round_)), count), jnp.int32(0))

    no_barrier = lambda barrier: None
    slot_of = lambda count: lax.rem(count, _DECODED_SLOTS)

    if not feed_warpgroup:
        # One warpgroup decodes each block into slot 0, then attends to it; P goes
        # through shared memory (interpret mode's wgmma takes no register operand).
        def before_block(item, block, count):
            plgpu.commit_smem()  # every warp's wgmma is done with the last block's tiles
            feed(item, block, count, 0, no_barrier, no_barrier)

        def step(p_smem, item, count):
            fill_stages(item, count)
            return attend(0, item, count, lambda count: 0, no_barrier, no_barrier, before_block, p_smem=p_smem)

        pl.run_scoped(lambda p_smem: over_items(functools.partial(step, p_smem)), mosaic_tiles.swizzled_tile(BLOCK_T, block_k))
        plgpu.wait_smem_to_gmem(0)
        return

    @pl.when(lax.axis_index("warpgroup") == compute_warpgroups)
    def _feed():
        plgpu.set_max_registers(_FEED_REGISTERS, action="decrease")

        def step(item, count):
            fill_stages(item, count)

            def feed_block(block, count):
                feed(item, block, count, slot_of(count), plgpu.barrier_wait, plgpu.barrier_arrive)
                return count + 1

            return lax.fori_loop(item.lo, item.hi, feed_block, count)

        over_items(step)

    @pl.when(lax.axis_index("warpgroup") < compute_warpgroups)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        for slot in range(_DECODED_SLOTS):  # both tiles start free
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
        lane = lax.axis_index("warpgroup")
        turn = schedule if ping_pong else None
        if turn is not None:
            pl.when(lane == 1)(lambda: take_turn(turn))  # the second warpgroup starts a turn later
        over_items(lambda item, count: attend(
            lane, item, count, slot_of, plgpu.barrier_wait, plgpu.barrier_arrive, lambda *_: None, turn=turn))
        if turn is not None:
            pl.when(lane == 0)(lambda: take_turn(turn))  # and the first one ends a turn later
        plgpu.wait_smem_to_gmem(0)


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
        "sm_scale", "window", "keep_first", "keep_recent", "block_k", "num_stages", "feed_warpgroup",
        "compute_warpgroups", "ping_pong", "programs", "interpret",
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
    full_k: jax.Array | None = None,
    full_v: jax.Array | None = None,
    keep_first: int = 0,
    keep_recent: int = 0,
    block_k: int = 128,
    num_stages: int = 2,
    feed_warpgroup: bool | None = None,
    compute_warpgroups: int | None = None,
    ping_pong: bool = True,
    programs: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, Hq, D]; k, v packed FP4 [B, Hkv, S, D] holding the chunk at positions
    start .. start + T - 1; start int32 [B] -> [B, T, Hq, D] in q's dtype.

    full_k, full_v: for a layer keeping positions, float [B, Hkv, S, D] full-precision
      values by position (`cache.kept_values`), read for positions p < keep_first and
      p > i - keep_recent of a query at i: the kernel skips those positions and returns
      its log-sum-exp, and `kept_positions` attends to them and merges the two.

    feed_warpgroup: whether a warpgroup of its own decodes the cache for the compute
      warpgroups (the default on the GPU), or one warpgroup decodes each block and then
      attends to it (the only schedule interpret mode runs: its threads cannot run wgmma).
    compute_warpgroups: query heads a program (1 or 2; default
      `default_compute_warpgroups`; 1 without a feed warpgroup).
    ping_pong: whether two compute warpgroups take turns on the tensor cores.
    programs: how many programs share the work items (a query block of one head group
      of one sequence each), longest first; default one a multiprocessor on the GPU
      (a persistent grid: each decodes the next item's first blocks while it finishes
      the last) and one an item in interpret mode.
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
    items = batch * num_blocks * num_heads // compute_warpgroups
    if programs is None:
        programs = items if interpret else jax.devices()[0].core_count
    if programs < 1:
        raise ValueError(f"programs: at least 1, got {programs}.")
    programs = min(programs, items)

    # Queries padded to whole blocks; the kernel scales them into log2 units with K's
    # plane factor.
    qs = jnp.pad(q.astype(jnp.bfloat16), ((0, 0), (0, padded - chunk), (0, 0), (0, 0)))
    q_scale = jnp.reshape(sm_scale * _LOG2E * tiles.plane_factor(k), (1,)).astype(jnp.float32)
    keeps = bool(keep_first or keep_recent)
    sink_logits = jnp.full((num_heads,), tiles.MASKED, jnp.float32)
    if sinks is not None and not keeps:  # with kept positions they join in `kept_positions.merge`
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
        compute_warpgroups=compute_warpgroups, chunk=chunk, block_k=block_k, window=window, skip_first=keep_first,
        skip_recent=keep_recent, items=items, programs=programs,
    )
    stages = lambda shape: plgpu.SMEM((num_stages, *shape), jnp.uint8)
    out_type = jax.ShapeDtypeStruct((batch, padded, num_heads, head_dim), jnp.bfloat16)
    lse_type = jax.ShapeDtypeStruct((batch, num_heads, padded), jnp.float32)  # base 2, seq minor for TMA
    lse_scratch = (plgpu.SMEM((compute_warpgroups, BLOCK_T), jnp.float32),) if keeps else ()
    result = plgpu.kernel(
        kernel,
        out_type=(out_type, lse_type) if keeps else out_type,
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
            *lse_scratch,
        ),
        grid=(programs,),
        grid_names=("program",),
        num_threads=compute_warpgroups + 1 if feed_warpgroup else None,
        thread_name="warpgroup" if feed_warpgroup else None,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(
        start.astype(jnp.int32), qs, sink_logits, q_scale, out_scale,
        k.data, mosaic_tiles.scale_rows(k.scales), v.data, mosaic_tiles.scale_rows(v.scales),
    )
    if not keeps:
        return result[:, :chunk].astype(q.dtype)
    out, lse = result
    kept = kept_positions.kept_state(q, full_k, full_v, start, keep_first=keep_first, keep_recent=keep_recent,
                                     window=window, sm_scale=sm_scale)
    stored_lse = lse[:, :, :chunk].transpose(0, 2, 1)
    return kept_positions.merge(out[:, :chunk], stored_lse, kept, sinks).astype(q.dtype)
