"""Flash-decoding over a packed FP4 layer with one warp a split: the E2M1 decode goes
straight into mma.sync's operand registers (Mosaic GPU lowering, Hopper).

Grid (split, kv_head, batch) of one warpgroup; each of its 4 warps takes every 4th
block of 32 positions of the split and keeps its own softmax state, so the loop has no
shared memory, no barrier and no cross-warp reduction. Per block of 32 positions a
warp

  1. loads its lanes' packed bytes and block scales from global memory (the next
     block's while it works on this one, with `prefetch`),
  2. decodes the keys into the A registers of S^T [positions, heads] = K q^T,
     mma.sync m16n8k16 with the GQA group's 8 query heads as N (16 in two tiles),
  3. takes the online softmax in base 2 (the queries carry log2 e), each head's row
     lying in one quad of lanes,
  4. moves the bf16 weights into mma's B layout (`movmatrix`, a transpose in
     registers), decodes the values in position pairs into A registers of
     O^T [D, heads] += V^T P^T.

`warp_fragments` says which lane holds what. The warps' partial states leave as 4
splits a program and are merged in XLA with the sinks (`splits.merge`). The body is
inline PTX throughout, so it has no interpret mode: on CPU the fragment plan is
checked by emulation and the kernel itself on the GPU (tests/kernels).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu, llvm
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.formats import QuantizedTensor, e2m1, get_codec
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.decode_attention import splits, warp_fragments

BLOCK = 32  # positions a warp takes at a time: two mma tiles of 16
WARPS = 4
_MAX_GROUP = 16
SUPPORTED_FORMATS = ("fp4_e2m1", "nvfp4", "mxfp4")
COMPILER_PARAMS = plgpu.CompilerParams(
    lowering_semantics=mgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=True
)

_MMA = (
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
    "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
)


def check_supported(k: QuantizedTensor, group: int) -> None:
    """Raises ValueError unless this implementation handles the layer's K (and V) for a
    GQA group of `group` query heads per KV head."""
    if k.fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"implementation: 'pallas_mosaic_warp' handles {', '.join(SUPPORTED_FORMATS)}, "
            f"not {k.fmt!r}; use 'pallas_triton'."
        )
    head_dim, capacity = k.shape[-1], k.shape[-2]
    if head_dim not in (64, 128):
        raise ValueError(f"implementation: 'pallas_mosaic_warp' needs head_dim 64 or 128, got {head_dim}.")
    if capacity % BLOCK:
        raise ValueError(
            f"implementation: 'pallas_mosaic_warp' needs a cache capacity that is a multiple of "
            f"{BLOCK}, got {capacity}."
        )
    if group > _MAX_GROUP:
        raise ValueError(
            f"implementation: 'pallas_mosaic_warp' takes up to {_MAX_GROUP} query heads per KV head, "
            f"got {group}."
        )


class _Emitter:
    """MLIR and inline-PTX building blocks for one thread's view of the kernel."""

    def __init__(self):
        self.i32 = ir.IntegerType.get_signless(32)
        self.i64 = ir.IntegerType.get_signless(64)
        self.f32 = ir.F32Type.get()

    def int(self, value):
        return arith.constant(self.i32, value)

    def float(self, value):
        return arith.constant(self.f32, value)

    def wide(self, value):
        return arith.extui(self.i64, value)

    def address(self, ref, byte_offset_i64=None):
        base = llvm.ptrtoint(self.i64, mgpu_utils.memref_ptr(ref))
        return base if byte_offset_i64 is None else arith.addi(base, byte_offset_i64)

    def at(self, base_i64, byte_offset_i32):
        return arith.addi(base_i64, self.wide(byte_offset_i32))

    def load(self, address, nbytes):
        """Read-only global load of 1, 2, 4, 8 or 16 bytes -> i32 words (a byte or a
        half zero-extended)."""
        if nbytes < 4:
            ptx = f"ld.global.nc.u{8 * nbytes} $0, [$1];"
            return [mgpu_utils.inline_ptx(ptx, address, result_types=self.i32)]
        words = nbytes // 4
        if words == 1:
            return [mgpu_utils.inline_ptx("ld.global.nc.b32 $0, [$1];", address, result_types=self.i32)]
        outs = ", ".join(f"${i}" for i in range(words))
        return list(
            mgpu_utils.inline_ptx(
                f"ld.global.nc.v{words}.b32 {{{outs}}}, [${words}];", address, result_types=[self.i32] * words
            )
        )

    def store(self, address, values, predicate=None):
        """Global store of 1 or 4 float32 values."""
        if len(values) == 1:
            mgpu_utils.inline_ptx("st.global.f32 [$0], $1;", address, values[0], predicate=predicate)
            return
        mgpu_utils.inline_ptx("st.global.v4.f32 [$0], {$1, $2, $3, $4};", address, *values, has_side_effects=True)

    def mma(self, a, b, c):
        return list(mgpu_utils.inline_ptx(_MMA, *a, *b, *c, result_types=[self.f32] * 4, convergent=True))

    def transpose8x8(self, x):
        return mgpu_utils.inline_ptx(
            "movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", x, result_types=self.i32, convergent=True
        )

    def exp2(self, x):
        return mgpu_utils.inline_ptx("ex2.approx.ftz.f32 $0, $1;", x, result_types=self.f32)

    def bf16_pair(self, low, high):
        return mgpu_utils.inline_ptx("cvt.rn.bf16x2.f32 $0, $1, $2;", high, low, result_types=self.i32)

    def halves(self, low, high):
        """(low half of `low`, low half of `high`) as one 32-bit pair."""
        return mgpu_utils.inline_ptx("prmt.b32 $0, $1, $2, 0x5410;", low, high, result_types=self.i32)

    def max(self, values):
        out = values[0]
        for v in values[1:]:
            out = arith.maximumf(out, v)
        return out

    def sum(self, values):
        out = values[0]
        for v in values[1:]:
            out = arith.addf(out, v)
        return out


def _emit(refs, *, codec, head_dim, head_tiles, chunk, capacity, window, ring, prefetch, kv_heads, num_splits):
    lengths, q_frags, k_data, k_scales, v_data, v_scales, out, peaks, totals = refs
    e = _Emitter()
    i32, c = e.i32, e.int
    D = head_dim
    row_bytes, scales_per_row = D // 2, D // codec.block_size

    thread = mgpu_utils.thread_idx()
    lane = arith.andi(thread, c(31))
    warp = arith.andi(arith.shrui(thread, c(5)), c(WARPS - 1))
    g, t = arith.shrui(lane, c(2)), arith.andi(lane, c(3))
    # Pallas launches its grid (split, kv_head, batch) reversed: batch is CUDA's x.
    block_id = lambda dim: arith.index_cast(i32, gpu.block_id(dim))
    batch, head, split = block_id(gpu.Dimension.x), block_id(gpu.Dimension.y), block_id(gpu.Dimension.z)
    row = e.wide(arith.addi(arith.muli(batch, c(kv_heads)), head))  # (batch, kv head)

    [length] = e.load(e.at(e.address(lengths), arith.muli(batch, c(4))), 4)
    lo = arith.muli(split, c(chunk))
    hi = arith.minsi(arith.minsi(arith.addi(lo, c(chunk)), c(capacity)), length)
    if window is not None and not ring:
        lo = arith.maxsi(lo, arith.subi(length, c(window)))
    first = arith.divsi(lo, c(BLOCK))
    last = arith.select(arith.cmpi(arith.CmpIPredicate.sgt, hi, lo), arith.divsi(arith.addi(hi, c(BLOCK - 1)), c(BLOCK)), first)
    mine = arith.maxsi(arith.subi(arith.subi(last, first), warp), c(0))
    iterations = arith.divui(arith.addi(mine, c(WARPS - 1)), c(WARPS))

    per_row = lambda ref, width: e.address(ref, arith.muli(row, arith.constant(e.i64, capacity * width)))
    k_base, v_base = per_row(k_data, row_bytes), per_row(v_data, row_bytes)
    ks_base, vs_base = per_row(k_scales, scales_per_row), per_row(v_scales, scales_per_row)

    # Keys: lane (g, t) reads D/8 bytes at byte (D/8) t of its rows, covering
    # `key_blocks` block scales; values: D/16 bytes at (D/16) g, one block scale.
    key_blocks = max(1, D // 4 // codec.block_size)
    key_scale_at = arith.divui(arith.muli(t, c(D // 4)), c(codec.block_size))
    value_scale_at = arith.divui(arith.muli(g, c(D // 8)), c(codec.block_size))
    key_byte_at, value_byte_at = arith.muli(t, c(D // 8)), arith.muli(g, c(D // 16))

    def key_rows(position0):
        """[mt][rr]: the positions of lane rows g + 8 rr of key tile mt."""
        return [[arith.addi(position0, arith.addi(g, c(16 * mt + 8 * rr))) for rr in range(2)] for mt in range(2)]

    def value_rows(position0):
        """[kk][pp][q]: positions 2t + q + 8 pp of value k-step kk."""
        base = arith.addi(position0, arith.muli(t, c(2)))
        return [[[arith.addi(base, c(16 * kk + 8 * pp + q)) for q in range(2)] for pp in range(2)] for kk in range(2)]

    def load_block(block):
        position0 = arith.muli(block, c(BLOCK))
        keys = [
            [
                (
                    e.load(e.at(k_base, arith.addi(arith.muli(p, c(row_bytes)), key_byte_at)), D // 8),
                    e.load(e.at(ks_base, arith.addi(arith.muli(p, c(scales_per_row)), key_scale_at)), key_blocks),
                )
                for p in rows
            ]
            for rows in key_rows(position0)
        ]
        values = [
            [
                [
                    (
                        e.load(e.at(v_base, arith.addi(arith.muli(p, c(row_bytes)), value_byte_at)), D // 16),
                        e.load(e.at(vs_base, arith.addi(arith.muli(p, c(scales_per_row)), value_scale_at)), 1),
                    )
                    for p in pair
                ]
                for pair in pairs
            ]
            for pairs in value_rows(position0)
        ]
        return keys, values

    def scale(byte):
        return mgpu_utils.inline_ptx(codec.plane_scale_ptx, byte, result_types=i32)

    def key_scales(raw):
        """The bf16 scale pair for each word of a key row."""
        [bytes_] = raw
        if key_blocks == 1:
            pairs = [scale(bytes_)]
        else:
            pairs = [scale(arith.andi(bytes_, c(0xFF))), scale(arith.shrui(bytes_, c(8)))]
        words = D // 32
        return [pairs[j * len(pairs) // words] for j in range(words)]

    def valid(p):
        ok = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, p, lo), arith.cmpi(arith.CmpIPredicate.slt, p, hi))
        if ring and window is not None:
            newest = arith.subi(length, c(1))
            position = arith.subi(newest, arith.remsi(arith.subi(newest, p), c(capacity)))
            ok = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.sge, position, arith.subi(length, c(window))))
        return ok

    # Queries: [head tile][k-step] -> (b0b1, b2b3), loaded once.
    q_words = D // 8
    q_at = lambda nt: e.at(
        e.address(q_frags, arith.muli(row, arith.constant(e.i64, head_tiles * 32 * q_words * 4))),
        arith.muli(arith.addi(lane, c(32 * nt)), c(q_words * 4)),
    )
    queries = []
    for nt in range(head_tiles):
        words = []
        for part in range(q_words // 4):
            words += e.load(arith.addi(q_at(nt), arith.constant(e.i64, 16 * part)), 16)
        queries.append([(words[2 * s], words[2 * s + 1]) for s in range(D // 16)])

    masked, zero = e.float(tiles.MASKED), e.float(0.0)

    def attend(block, raw, state):
        outs, peaks_, totals_ = state
        keys, values = raw
        position0 = arith.muli(block, c(BLOCK))
        # Keys -> A registers [mt][s] (rows g, g + 8 of each k-step's two halves).
        planes = [
            [
                [
                    mgpu_utils.inline_ptx(e2m1.PTX_WORD_PLANES, word, sc, result_types=[i32] * 4)
                    for word, sc in zip(words, key_scales(scale_bytes))
                ]
                for words, scale_bytes in tile
            ]
            for tile in keys
        ]
        key_operands = [
            [
                [planes[mt][0][s // 2][2 * (s % 2)], planes[mt][1][s // 2][2 * (s % 2)],
                 planes[mt][0][s // 2][2 * (s % 2) + 1], planes[mt][1][s // 2][2 * (s % 2) + 1]]
                for s in range(D // 16)
            ]
            for mt in range(2)
        ]
        positions = key_rows(position0)
        ok = [[valid(p) for p in rows] for rows in positions]

        # Values -> A registers [c][kk], decoded in position pairs.
        value_operands = [[None] * 2 for _ in range(D // 16)]
        for kk in range(2):
            columns = []  # [pp][u][n]
            for pp in range(2):
                (words_a, byte_a), (words_b, byte_b) = values[kk][pp]
                pair = e.halves(scale(byte_a[0]), scale(byte_b[0]))
                columns.append(
                    [
                        mgpu_utils.inline_ptx(e2m1.PTX_ROW_PAIR_COLUMNS, wa, wb, pair, result_types=[i32] * 8)
                        for wa, wb in zip(words_a, words_b)
                    ]
                )
            for tile in range(D // 16):
                u, m = divmod(tile, 4)
                value_operands[tile][kk] = [
                    columns[0][u][2 * m], columns[0][u][2 * m + 1], columns[1][u][2 * m], columns[1][u][2 * m + 1]
                ]

        new_outs, new_peaks, new_totals = [], [], []
        for nt in range(head_tiles):
            scores = []  # [mt] -> 4 floats (rows g, g + 8; heads 2t, 2t + 1)
            for mt in range(2):
                acc = [zero] * 4
                for s in range(D // 16):
                    acc = e.mma(key_operands[mt][s], queries[nt][s], acc)
                scores.append([arith.select(ok[mt][i // 2], acc[i], masked) for i in range(4)])
            weights = [[None] * 4 for _ in range(2)]
            corrections, peaks_nt, totals_nt = [], [], []
            for h in range(2):  # heads 2t + h
                block_peak = e.max([scores[mt][2 * rr + h] for mt in range(2) for rr in range(2)])
                for distance in (4, 8, 16):
                    block_peak = arith.maximumf(block_peak, mgpu_utils.shfl_bfly(block_peak, distance))
                peak = arith.maximumf(peaks_[nt][h], block_peak)
                correction = e.exp2(arith.subf(peaks_[nt][h], peak))
                for mt in range(2):
                    for rr in range(2):
                        w = e.exp2(arith.subf(scores[mt][2 * rr + h], peak))
                        weights[mt][2 * rr + h] = arith.select(ok[mt][rr], w, zero)
                total = arith.addf(
                    arith.mulf(totals_[nt][h], correction),
                    e.sum([weights[mt][2 * rr + h] for mt in range(2) for rr in range(2)]),
                )
                corrections.append(correction)
                peaks_nt.append(peak)
                totals_nt.append(total)
            # P^T in mma's B layout for k-step kk (= key tile kk): a transpose of each
            # 8 x 8 bf16 quarter.
            weight_operands = [
                [e.transpose8x8(e.bf16_pair(weights[kk][2 * rr], weights[kk][2 * rr + 1])) for rr in range(2)]
                for kk in range(2)
            ]
            tiles_out = []
            for tile in range(D // 16):
                acc = [arith.mulf(outs[nt][tile][i], corrections[i % 2]) for i in range(4)]
                for kk in range(2):
                    acc = e.mma(value_operands[tile][kk], weight_operands[kk], acc)
                tiles_out.append(acc)
            new_outs.append(tiles_out)
            new_peaks.append(peaks_nt)
            new_totals.append(totals_nt)
        return new_outs, new_peaks, new_totals

    state = (
        [[[zero] * 4 for _ in range(D // 16)] for _ in range(head_tiles)],
        [[masked] * 2 for _ in range(head_tiles)],
        [[zero] * 2 for _ in range(head_tiles)],
    )
    block_of = lambda i: arith.addi(first, arith.addi(warp, arith.muli(i, c(WARPS))))
    last_block = c(capacity // BLOCK - 1)
    steps = arith.index_cast(ir.IndexType.get(), iterations)
    if prefetch:
        @mgpu_utils.fori(steps, (load_block(arith.minsi(block_of(c(0)), last_block)), state))
        def loop(i, carry):
            raw, state = carry
            block = block_of(arith.index_cast(i32, i))
            upcoming = load_block(arith.minsi(arith.addi(block, c(WARPS)), last_block))
            return upcoming, attend(block, raw, state)

        _, state = loop.results
    else:
        @mgpu_utils.fori(steps, state)
        def loop(i, state):
            block = block_of(arith.index_cast(i32, i))
            return attend(block, load_block(block), state)

        state = loop.results
    outs, peaks_, totals_ = state

    # Each head's total is spread over the 8 lane groups; its peak is already common.
    rows_per_program = 8 * head_tiles
    out_split = arith.addi(arith.muli(split, c(WARPS)), warp)
    state_row = arith.addi(arith.muli(row, arith.constant(e.i64, num_splits * WARPS)), e.wide(out_split))
    first_of_group = arith.cmpi(arith.CmpIPredicate.eq, g, c(0))
    for nt in range(head_tiles):
        for h in range(2):
            total = totals_[nt][h]
            for distance in (4, 8, 16):
                total = arith.addf(total, mgpu_utils.shfl_bfly(total, distance))
            head_row = arith.addi(c(8 * nt + h), arith.muli(t, c(2)))
            index = arith.addi(arith.muli(state_row, arith.constant(e.i64, rows_per_program)), e.wide(head_row))
            index_bytes = arith.muli(index, arith.constant(e.i64, 4))
            e.store(e.address(peaks, index_bytes), [arith.mulf(peaks_[nt][h], e.float(math.log(2.0)))], first_of_group)
            e.store(e.address(totals, index_bytes), [total], first_of_group)
            # Channels (D/8) g + 2 tile + r, contiguous: O^T rows g + 8 r of each tile.
            values = [outs[nt][j // 2][2 * (j % 2) + h] for j in range(D // 8)]
            channel0 = e.wide(arith.muli(g, c(D // 8)))
            out_at = arith.muli(
                arith.addi(arith.muli(index, arith.constant(e.i64, D)), channel0), arith.constant(e.i64, 4)
            )
            for part in range(D // 32):
                e.store(
                    e.address(out, arith.addi(out_at, arith.constant(e.i64, 16 * part))), values[4 * part : 4 * part + 4]
                )


def query_fragments(q: jax.Array, k: QuantizedTensor, head_tiles: int, sm_scale: float) -> jax.Array:
    """q [B, Hq, D] -> bf16 [B, Hkv, head_tiles, 32, D/16, 4]: each lane's mma B registers
    for every k-step of the keys, times the softmax scale, K's plane factor and log2 e."""
    head_dim = q.shape[-1]
    grouped = splits.grouped_queries(q, k, 8 * head_tiles, sm_scale) * np.float32(math.log2(math.e))
    head, channel = warp_fragments.query_fragment_index(head_dim)
    tiles_ = [grouped[:, :, 8 * nt + head, channel] for nt in range(head_tiles)]
    return jnp.stack(tiles_, axis=2).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "ring", "num_splits", "prefetch"))
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
    num_splits: int | None = None,
    prefetch: bool = True,
) -> jax.Array:
    """q [B, Hq, D]; k, v packed FP4 [B, Hkv, S, D]; lengths int32 [B] -> [B, Hq, D] in q's dtype."""
    codec = get_codec(k.fmt)
    batch, num_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    check_supported(k, group)
    head_tiles = 1 if group <= 8 else 2
    rows = 8 * head_tiles
    chunk, num_split_programs = splits.plan(batch, kv_heads, capacity, BLOCK * WARPS, num_splits)
    splits_out = num_split_programs * WARPS

    def kernel(*refs):
        emit = plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))(
            lambda ctx, *refs: _emit(
                refs, codec=codec, head_dim=head_dim, head_tiles=head_tiles, chunk=chunk, capacity=capacity,
                window=window, ring=ring, prefetch=prefetch, kv_heads=kv_heads, num_splits=num_split_programs,
            )
        )
        emit(*refs)

    as_bytes = lambda s: s if s.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(s, jnp.uint8)
    out, peak, total = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((batch, kv_heads, splits_out, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits_out, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits_out, rows), jnp.float32),
        ),
        grid=(num_split_programs, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=COMPILER_PARAMS,
    )(
        lengths.astype(jnp.int32), query_fragments(q, k, head_tiles, sm_scale),
        k.data, as_bytes(k.scales), v.data, as_bytes(v.scales),
    )
    merged = splits.merge(out[:, :, :, None], peak, total, sinks, group)
    return (merged * tiles.plane_factor(v)).astype(q.dtype)
