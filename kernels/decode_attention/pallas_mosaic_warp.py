"""Flash-decoding over a stored layer with one warp a split: the decode goes straight
into mma.sync's operand registers (Mosaic GPU lowering, Hopper).

Grid (split, kv_head, batch) of `warpgroups` warpgroups; each of its W warps takes
every W-th block of `block` positions (16 or 32) of the split and keeps its own
softmax state, so the loop has no shared memory, no barrier and no cross-warp
reduction. Per block a warp

  1. loads its lanes' stored bytes (and block scales) from global memory (the next
     block's while it works on this one: `prefetch`),
  2. decodes the keys into the A registers of S^T [positions, heads] = K q^T,
     mma.sync m16n8k16 with the GQA group's query heads as N (8, or 16 in two tiles),
  3. takes the online softmax in base 2 (the queries carry log2 e); a head's scores
     lie in the 8 lanes of one t. The running peak moves, and the output is rescaled,
     only when some head's block peak passes it by more than RESCALE_THRESHOLD (a
     warp-uniform branch): until then the weights may reach 2**RESCALE_THRESHOLD,
     which float32 sums and 16-bit weights hold exactly as well,
  4. moves the 16-bit weights into mma's B layout (`movmatrix`, a transpose in
     registers) and decodes the values in position pairs into the A registers of
     O^T [D, heads] += V^T P^T.
At the end the W warps merge their states in shared memory. With one split the
program then writes the normalized output itself (the sinks join its denominator);
with more, or over a layer keeping positions in full precision (which the kernel
skips: `kept_positions` attends to them as one more split), the splits' states are
merged in XLA with the sinks (`splits.merge`).

Which lane reads and decodes what is the layer layout's (`warp_operands`: packed FP4,
FP8 with f16 operands, bf16 and fp16); the lane holds output channels (D/8) g + 2c + r
in row g + 8r of channel tile c whatever the layout.

The body is inline PTX throughout, so it has no interpret mode: it runs on GPUs only
and is tested there (tests/kernels); the layouts' channel orders are checked on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu, llvm, scf
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.cache import LayerCache
from fp4kv_jax.formats import QuantizedTensor, format_names, get_codec
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.decode_attention import kept_positions, splits
from fp4kv_jax.kernels.decode_attention.warp_emitter import Emitter
from fp4kv_jax.kernels.decode_attention.warp_operands import operands_for

WARPGROUP_WARPS = 4
# Warps an SM holds at once at the 156 registers a thread ptxas gives programs of up
# to 3 warpgroups (measured): three programs of 1, or one of 3. A program of 4 is held
# to 128 registers and fills an SM alone.
RESIDENT_WARPS = 12
RESCALE_THRESHOLD = 8.0  # log2 units: weights stay at most 256 between rescales
SUPPORTED_FORMATS = tuple(name for name in format_names() if operands_for(get_codec(name)) is not None)
BLOCKS = (16, 32)  # positions a warp takes at a time: one or two mma tiles
COMPILER_PARAMS = plgpu.CompilerParams(
    lowering_semantics=mgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=True
)


def lane_rows(block: int):
    """A lane's rows of a block, as offsets from its first: keys [mt][rr] after
    position g (tile mt's rows g and g + 8); values [kk][pp][q] after 2t (k-step kk's
    positions 2t + q and 2t + 8 + q)."""
    tiles_ = range(block // 16)
    keys = [[16 * mt + 8 * rr for rr in range(2)] for mt in tiles_]
    values = [[[16 * kk + 8 * pp + q for q in range(2)] for pp in range(2)] for kk in tiles_]
    return keys, values


def check_supported(k: QuantizedTensor, group: int, block: int | None = None) -> None:
    """Raises ValueError unless this implementation handles the layer's K (and V) for a
    GQA group of `group` query heads per KV head, in blocks of `block` positions (None:
    the format's default)."""
    if block is not None and block not in BLOCKS:
        raise ValueError(f"block: one of {BLOCKS}, got {block!r}.")
    layout = operands_for(get_codec(k.fmt))
    if block is None and layout is not None:  # a format without one is refused below
        block = layout.default_block
    splits.check_layer("pallas_mosaic_warp", k, group, block or BLOCKS[0], SUPPORTED_FORMATS)


def _emit(refs, *, codec, head_dim, group, head_tiles, block, tensor_arrays, chunk, capacity, window, ring,
          skip_first, skip_recent, prefetch, kv_heads, num_splits, final, warps, sink_operand, out_dtype, sm_scale):
    """The kernel body for one thread (see the module docstring); refs are the
    kernel's operands, outputs and shared scratch in `decode_attention`'s order, K and
    V as `tensor_arrays` arrays each. `final`: the program writes the normalized
    output (one split, no kept positions), else its softmax state."""
    lengths, q_ref, k_global, v_global, *refs = refs
    k_refs, v_refs, refs = refs[:tensor_arrays], refs[tensor_arrays : 2 * tensor_arrays], refs[2 * tensor_arrays :]
    sink_ref = refs.pop(0) if sink_operand else None  # with one split only
    *outputs, o_smem, ml_smem = refs
    e = Emitter()
    i32, c = e.i32, e.int
    D = head_dim
    key_rows, value_rows = lane_rows(block)
    m_tiles = block // 16

    thread = mgpu_utils.thread_idx()
    lane = arith.andi(thread, c(31))
    warp = arith.shrui(thread, c(5))
    g, t = arith.shrui(lane, c(2)), arith.andi(lane, c(3))
    # Pallas launches its grid (split, kv_head, batch) reversed: batch is CUDA's x.
    block_id = lambda dim: arith.index_cast(i32, gpu.block_id(dim))
    batch, head, split = block_id(gpu.Dimension.x), block_id(gpu.Dimension.y), block_id(gpu.Dimension.z)
    row = e.wide(arith.addi(arith.muli(batch, c(kv_heads)), head))  # (batch, kv head)
    layout = operands_for(codec)(e, codec, head_dim, capacity, row, g, t)
    mma_dtype = layout.mma_dtype

    [length] = e.load(e.at(e.address(lengths), arith.muli(batch, c(4))), 4)
    lo = arith.muli(split, c(chunk))
    hi = arith.minsi(arith.minsi(arith.addi(lo, c(chunk)), c(capacity)), length)
    if window is not None and not ring:
        lo = arith.maxsi(lo, arith.subi(length, c(window)))
    # A layer's full-precision positions (the first and the newest) are attended outside.
    if skip_first:
        lo = arith.maxsi(lo, c(skip_first))
    if skip_recent:
        hi = arith.minsi(hi, arith.subi(length, c(skip_recent)))
    first = arith.divsi(lo, c(block))
    nonempty = arith.cmpi(arith.CmpIPredicate.sgt, hi, lo)
    last = arith.select(nonempty, arith.divsi(arith.addi(hi, c(block - 1)), c(block)), first)
    mine = arith.maxsi(arith.subi(arith.subi(last, first), warp), c(0))
    iterations = arith.divui(arith.addi(mine, c(warps - 1)), c(warps))

    # Each lane's base addresses (`warp_operands`) move by one block a step; its rows
    # are immediate offsets from them.
    key_lanes, value_lanes = layout.key_lanes(k_refs), layout.value_lanes(v_refs)

    def block_at(lanes, index):
        position0 = arith.muli(index, c(block))
        return [e.at(address, arith.muli(position0, c(width))) for address, width in lanes]

    def load_keys(index):
        at = block_at(key_lanes, index)
        return [[layout.load_key_row(at, r) for r in rows] for rows in key_rows]

    def load_values(index):
        at = block_at(value_lanes, index)
        return [[[layout.load_value_row(at, r) for r in pair] for pair in pairs] for pairs in value_rows]

    span = arith.subi(hi, lo)

    def valid(p):
        ok = arith.cmpi(arith.CmpIPredicate.ult, arith.subi(p, lo), span)  # lo <= p < hi
        if ring and window is not None:
            newest = arith.subi(length, c(1))
            position = arith.subi(newest, arith.remsi(arith.subi(newest, p), c(capacity)))
            ok = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.sge, position, arith.subi(length, c(window))))
        return ok

    # Queries: lane (g, t) reads channels [(D/4) t, (D/4) (t + 1)) of head 8 nt + g of
    # its group (zero past the group), scales them into pairs of the mma type, and
    # orders them into mma's B registers as the layout orders the keys.
    # The queries carry the softmax scale, log2 e (base-2 softmax) and K's plane factor.
    k_factor = arith.bitcast(e.f32, e.load(e.address(k_global), 4)[0])
    q_scale = arith.mulf(k_factor, e.float(sm_scale * math.log2(math.e) * 2.0**-codec.plane_exponent))
    queries = []  # [head tile][k-step] -> (b0, b1)
    for nt in range(head_tiles):
        in_group = arith.addi(g, c(8 * nt))
        present = arith.cmpi(arith.CmpIPredicate.slt, in_group, c(group))
        q_row = arith.addi(
            arith.muli(batch, c(kv_heads * group)),
            arith.addi(arith.muli(head, c(group)), arith.minsi(in_group, c(group - 1))),
        )
        q_lane = e.at(e.address(q_ref), arith.addi(arith.muli(q_row, c(2 * D)), arith.muli(t, c(D // 2))))
        words = e.load(q_lane, D // 2)
        words = [arith.select(present, e.scaled_pair(w, q_scale, mma_dtype), c(0)) for w in words]
        queries.append(layout.query_steps(words))

    # Masked scores are -inf, so their weights are 0 under any peak; the peaks start
    # finite (MASKED), so a fully masked block leaves them there.
    unseen, masked, zero = e.float(-math.inf), e.float(tiles.MASKED), e.float(0.0)

    def attend(index, raw, state):
        outs, peaks_, totals_ = state
        keys, values = raw
        position0 = arith.muli(index, c(block))
        # Keys -> A registers [mt][s] (rows g, g + 8 of each k-step's two halves).
        steps = [[layout.key_steps(row_raw) for row_raw in tile] for tile in keys]  # [mt][rr][s]
        key_operands = [
            [[steps[mt][0][s][0], steps[mt][1][s][0], steps[mt][0][s][1], steps[mt][1][s][1]] for s in range(D // 16)]
            for mt in range(m_tiles)
        ]
        first_row = arith.addi(position0, g)
        ok = [[valid(arith.addi(first_row, c(r))) for r in rows] for rows in key_rows]

        # Values -> A registers [c][kk]: channel (D/8) g + 2c + r is row g + 8r of
        # tile c, positions 2t, 2t + 1 (pp = 0) and 2t + 8, 2t + 9 (pp = 1).
        pairs = [[layout.value_pairs(*values[kk][pp]) for pp in range(2)] for kk in range(m_tiles)]
        value_operands = [
            [[pairs[kk][0][2 * tile], pairs[kk][0][2 * tile + 1], pairs[kk][1][2 * tile], pairs[kk][1][2 * tile + 1]]
             for kk in range(m_tiles)]
            for tile in range(D // 16)
        ]

        scores = []  # [nt][mt] -> 4 floats (rows g, g + 8; heads 8 nt + 2t, 8 nt + 2t + 1)
        for nt in range(head_tiles):
            scores.append([])
            for mt in range(m_tiles):
                acc = [zero] * 4
                for s in range(D // 16):
                    acc = e.mma(key_operands[mt][s], queries[nt][s], acc, mma_dtype)
                scores[nt].append([arith.select(ok[mt][i // 2], acc[i], unseen) for i in range(4)])
        block_peaks = []  # [nt][h] for heads 8 nt + 2t + h, common to a t's 8 lanes
        for nt in range(head_tiles):
            block_peaks.append([])
            for h in range(2):
                block_peak = e.max([scores[nt][mt][2 * rr + h] for mt in range(m_tiles) for rr in range(2)])
                for distance in (4, 8, 16):
                    block_peak = arith.maximumf(block_peak, mgpu_utils.shfl_bfly(block_peak, distance))
                block_peaks[nt].append(block_peak)
        passed = [
            arith.cmpf(arith.CmpFPredicate.OGT, block_peaks[nt][h], arith.addf(peaks_[nt][h], e.float(RESCALE_THRESHOLD)))
            for nt in range(head_tiles)
            for h in range(2)
        ]

        def rescaled():
            """The state under the block's peaks: outputs and totals times 2**(old - new)."""
            peaks_new = [[arith.maximumf(peaks_[nt][h], block_peaks[nt][h]) for h in range(2)] for nt in range(head_tiles)]
            corrections = [
                [e.exp2(arith.subf(peaks_[nt][h], peaks_new[nt][h])) for h in range(2)] for nt in range(head_tiles)
            ]
            outs_new = [
                [[arith.mulf(x, corrections[nt][i % 2]) for i, x in enumerate(tile)] for tile in outs[nt]]
                for nt in range(head_tiles)
            ]
            totals_new = [[arith.mulf(totals_[nt][h], corrections[nt][h]) for h in range(2)] for nt in range(head_tiles)]
            return outs_new, peaks_new, totals_new

        outs, peaks_, totals_ = e.update_if(e.any_lane(functools.reduce(arith.ori, passed)), rescaled,
                                            (outs, peaks_, totals_))

        new_outs, new_totals = [], []
        for nt in range(head_tiles):
            weights = [[e.exp2(arith.subf(x, peaks_[nt][i % 2])) for i, x in enumerate(scores[nt][mt])]
                       for mt in range(m_tiles)]
            new_totals.append(
                [arith.addf(totals_[nt][h], e.sum([weights[mt][2 * rr + h] for mt in range(m_tiles) for rr in range(2)]))
                 for h in range(2)]
            )
            # P^T in mma's B layout for k-step kk (= key tile kk): a transpose of each
            # 8 x 8 quarter of 16-bit weights.
            weight_operands = [
                [e.transpose8x8(e.pair(weights[kk][2 * rr], weights[kk][2 * rr + 1], mma_dtype)) for rr in range(2)]
                for kk in range(m_tiles)
            ]
            tiles_out = []
            for tile in range(D // 16):
                acc = outs[nt][tile]
                for kk in range(m_tiles):
                    acc = e.mma(value_operands[tile][kk], weight_operands[kk], acc, mma_dtype)
                tiles_out.append(acc)
            new_outs.append(tiles_out)
        return new_outs, peaks_, new_totals

    state = (
        [[[zero] * 4 for _ in range(D // 16)] for _ in range(head_tiles)],
        [[masked] * 2 for _ in range(head_tiles)],
        [[zero] * 2 for _ in range(head_tiles)],
    )
    block_of = lambda i: arith.addi(first, arith.addi(warp, arith.muli(i, c(warps))))
    last_block = c(capacity // block - 1)
    loaders = (load_keys, load_values)
    ahead = loaders[:prefetch]  # loaded one block early, while the block before is worked on
    steps = arith.index_cast(ir.IndexType.get(), iterations)

    @mgpu_utils.fori(steps, ([f(arith.minsi(block_of(c(0)), last_block)) for f in ahead], state))
    def loop(i, carry):
        early, state = carry
        index = block_of(arith.index_cast(i32, i))
        upcoming = [f(arith.minsi(arith.addi(index, c(warps)), last_block)) for f in ahead]
        keys, values = [*early, *(f(index) for f in loaders[prefetch:])]
        return upcoming, attend(index, (keys, values), state)

    _, state = loop.results
    outs, peaks_, totals_ = state

    # The warps' states meet in shared memory, so each program leaves one: a head's
    # total is first summed over the 8 lane groups (its peak is already common).
    rows = 8 * head_tiles
    o_at, ml_at = e.shared_address(o_smem), e.shared_address(ml_smem)
    first_of_group = arith.cmpi(arith.CmpIPredicate.eq, g, c(0))
    for nt in range(head_tiles):
        for h in range(2):
            total = totals_[nt][h]
            for distance in (4, 8, 16):
                total = arith.addf(total, mgpu_utils.shfl_bfly(total, distance))
            state_index = arith.addi(arith.muli(warp, c(rows)), arith.addi(c(8 * nt + h), arith.muli(t, c(2))))
            peak_at = arith.addi(ml_at, arith.muli(state_index, c(4)))
            e.store(peak_at, [peaks_[nt][h]], space="shared", predicate=first_of_group)
            e.store(arith.addi(peak_at, c(4 * warps * rows)), [total], space="shared", predicate=first_of_group)
            # Channels (D/8) g + 2 tile + r, contiguous: O^T rows g + 8 r of each tile.
            values = [outs[nt][j // 2][2 * (j % 2) + h] for j in range(D // 8)]
            row_at = arith.addi(o_at, arith.muli(arith.addi(arith.muli(state_index, c(D)), arith.muli(g, c(D // 8))), c(4)))
            for part in range(D // 32):
                e.store(arith.addi(row_at, c(16 * part)), values[4 * part : 4 * part + 4], space="shared")
    e.barrier()

    # Thread i of the first warpgroup merges elements [i E, (i + 1) E) of the
    # program's [rows, D] output.
    merging = 32 * WARPGROUP_WARPS
    per_thread = rows * D // merging
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, thread, c(merging))):
        element0 = arith.muli(thread, c(per_thread))
        r, column0 = arith.divui(element0, c(D)), arith.remui(element0, c(D))
        state_at = lambda index: arith.addi(arith.addi(ml_at, c(4 * index)), arith.muli(r, c(4)))  # of [2, warps, rows]
        warp_peaks = [e.load_shared(state_at(w * rows), 1)[0] for w in range(warps)]
        best = e.max(warp_peaks)
        sink = None
        if sink_ref is not None:  # the sink logit, in base 2, joins the denominator
            head_in_group = arith.minui(r, c(group - 1))
            sink_at = arith.muli(arith.addi(arith.muli(head, c(group)), head_in_group), c(4))
            [sink] = e.load(e.at(e.address(sink_ref), sink_at), 4)
            sink = arith.mulf(arith.bitcast(e.f32, sink), e.float(math.log2(math.e)))
            best = arith.maximumf(best, sink)
        weights = [e.exp2(arith.subf(m, best)) for m in warp_peaks]
        total = e.sum([arith.mulf(wt, e.load_shared(state_at((warps + w) * rows), 1)[0]) for w, wt in enumerate(weights)])
        merged = [e.float(0.0)] * per_thread
        for w, wt in enumerate(weights):
            at = arith.addi(o_at, arith.muli(arith.addi(arith.muli(arith.addi(c(w * rows), r), c(D)), column0), c(4)))
            parts = [x for part in range(per_thread // 4) for x in e.load_shared(arith.addi(at, c(16 * part)), 4)]
            merged = [arith.addf(acc, arith.mulf(wt, x)) for acc, x in zip(merged, parts)]
        if final:
            _store_output(e, outputs, merged, total, sink, best, v_global, codec, batch, head,
                          r, column0, group=group, kv_heads=kv_heads, head_dim=D, out_dtype=out_dtype)
        else:
            _store_state(e, outputs, merged, total, best, row, split, r, column0, num_splits=num_splits, rows=rows,
                         head_dim=D)


def _store_output(e, outputs, merged, total, sink, best, v_global, codec, batch, head, r, column0, *, group,
                  kv_heads, head_dim, out_dtype):
    """Writes a thread's part of row r of the program's normalized output: out [B, Hq,
    D] in out_dtype (bfloat16 or float32) at head `head * group + r`, for r < group."""
    [out] = outputs
    c = e.int
    denominator = total if sink is None else arith.addf(total, e.exp2(arith.subf(sink, best)))
    v_factor = arith.mulf(arith.bitcast(e.f32, e.load(e.address(v_global), 4)[0]), e.float(2.0**-codec.plane_exponent))
    factor = arith.divf(v_factor, denominator)
    values = [arith.mulf(x, factor) for x in merged]
    if out_dtype == jnp.bfloat16:
        values = [e.pair(values[i], values[i + 1], "bf16") for i in range(0, len(values), 2)]
    query_row = arith.addi(arith.muli(batch, c(kv_heads * group)), arith.addi(arith.muli(head, c(group)), r))
    element = arith.addi(arith.muli(e.wide(query_row), arith.constant(e.i64, head_dim)), e.wide(column0))
    at = e.address(out, arith.muli(element, arith.constant(e.i64, jnp.dtype(out_dtype).itemsize)))
    in_group = arith.cmpi(arith.CmpIPredicate.ult, r, c(group))
    for part in range(0, len(values), 4):
        e.store(arith.addi(at, arith.constant(e.i64, 4 * part)), values[part : part + 4], predicate=in_group)


def _store_state(e, outputs, merged, total, best, row, split, r, column0, *, num_splits, rows, head_dim):
    """Writes a thread's part of row r of the program's softmax state: out [B, Hkv,
    splits, rows, D] unnormalized; peaks (natural log units) and totals [B, Hkv,
    splits, rows]."""
    out, peaks, totals = outputs
    i64 = lambda value: arith.constant(e.i64, value)
    state_row = arith.addi(arith.muli(row, i64(num_splits)), e.wide(split))
    index = arith.addi(arith.muli(state_row, i64(rows)), e.wide(r))
    out_at = arith.muli(arith.addi(arith.muli(index, i64(head_dim)), e.wide(column0)), i64(4))
    for part in range(len(merged) // 4):
        e.store(e.address(out, arith.addi(out_at, i64(16 * part))), merged[4 * part : 4 * part + 4])
    row_leader = arith.cmpi(arith.CmpIPredicate.eq, column0, e.int(0))
    index_bytes = arith.muli(index, i64(4))
    e.store(e.address(peaks, index_bytes), [arith.mulf(best, e.float(math.log(2.0)))], predicate=row_leader)
    e.store(e.address(totals, index_bytes), [total], predicate=row_leader)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "window", "ring", "num_splits", "prefetch", "warpgroups", "block")
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
    num_splits: int | None = None,
    prefetch: int = 1,
    warpgroups: int | None = None,
    block: int | None = None,
) -> jax.Array:
    """q [B, Hq, D]; k, v [B, Hkv, S, D] in one of SUPPORTED_FORMATS; lengths int32 [B]
    -> [B, Hq, D] in q's dtype.

    prefetch: 0, 1 or 2: none, the keys, or the keys and values of a warp's next block
      are loaded while it works on the current one (more registers, fewer stalls).
    warpgroups: 1 to 4 warpgroups a program (each of 4 warps); None: the layout's
      default. A program of 4 fills an SM, so with a batch of B Hkv >= the SM count
      the packed FP4 default needs no split and no merge outside the kernel.
    block: 16 or 32 positions a warp takes at a time; None: the layout's default.
    kept: the layer, when it keeps positions in full precision (`LayerCache.kept_k`):
      the kernel skips them and they join the merge as one more split
      (`kept_positions`), so the kernel always leaves its states to that merge.
    (The defaults are the fastest at the target shape, docs/benchmarks.md.)
    """
    codec = get_codec(k.fmt)
    batch, num_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    check_supported(k, group, block)
    layout = operands_for(codec)
    block = layout.default_block if block is None else block
    warpgroups = layout.default_warpgroups if warpgroups is None else warpgroups
    if prefetch not in (0, 1, 2):
        raise ValueError(f"prefetch: 0, 1 or 2, got {prefetch!r}.")
    if warpgroups not in (1, 2, 3, 4):
        raise ValueError(f"warpgroups: 1, 2, 3 or 4, got {warpgroups!r}.")
    warps = WARPGROUP_WARPS * warpgroups
    head_tiles = 1 if group <= 8 else 2
    rows = 8 * head_tiles
    resident = splits.DEFAULT_SMS * max(1, RESIDENT_WARPS // warps)
    chunk, num_split_programs = splits.plan_waves(batch, kv_heads, capacity, block, warps, resident, num_splits)
    final = num_split_programs == 1 and kept is None
    out_dtype = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32

    tensor_arrays = layout.arrays(k)

    def kernel(*refs):
        emit = plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))(
            lambda ctx, *refs: _emit(
                refs, codec=codec, head_dim=head_dim, group=group, head_tiles=head_tiles, block=block,
                tensor_arrays=len(tensor_arrays), chunk=chunk, capacity=capacity, window=window, ring=ring,
                prefetch=prefetch, kv_heads=kv_heads, num_splits=num_split_programs, final=final, warps=warps,
                sink_operand=final and sinks is not None, **kept_positions.skipped(kept),
                out_dtype=out_dtype, sm_scale=sm_scale,
            )
        )
        emit(*refs)

    # The global scales (1 without one) stay arrays of one element, so no XLA op runs
    # before the kernel; the kernel multiplies in the constant parts of the factors.
    global_of = lambda x: jnp.ones((1,), jnp.float32) if x.global_scale is None else x.global_scale.reshape(1)
    operands = [
        lengths.astype(jnp.int32), q.astype(jnp.bfloat16), global_of(k), global_of(v), *tensor_arrays,
        *layout.arrays(v),
    ]
    if final:
        out_type = jax.ShapeDtypeStruct((batch, num_heads, head_dim), out_dtype)
        if sinks is not None:
            operands.append(sinks.astype(jnp.float32))
    else:
        state = lambda *shape: jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, *shape), jnp.float32)
        out_type = (state(rows, head_dim), state(rows), state(rows))
    result = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=(
            plgpu.SMEM((warps, rows, head_dim), jnp.float32),  # the warps' outputs
            plgpu.SMEM((2, warps, rows), jnp.float32),  # and their peaks and totals
        ),
        grid=(num_split_programs, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        num_threads=warpgroups,
        thread_name="warpgroup",
        compiler_params=COMPILER_PARAMS,
    )(*operands)
    if final:
        return result.astype(q.dtype)
    out, peak, total = result
    out, peak, total = kept_positions.with_kept_split(
        (out[:, :, :, None], peak, total), q, kept, lengths, sm_scale=sm_scale, rows=rows, num_planes=1,
        value_factor=tiles.plane_factor(v),
    )
    merged = splits.merge(out, peak, total, sinks, group)
    return (merged * tiles.plane_factor(v)).astype(q.dtype)
