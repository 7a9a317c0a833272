"""Decoding a packed E2M1 tile in shared memory into wgmma's bf16 operand layout, by
inline PTX run from every thread of a warpgroup (Mosaic GPU kernels only).

Each thread takes 16-byte chunks of packed bytes (32 codes of one row): one vector
load, the codec's block scales (two 16-code blocks' in one 16-bit load, eight 4-code
blocks' in one 8-byte load) turned into bf16 pairs, the E2M1 bit decode of
`e2m1.ptx_word_pairs` (one multiply a pair of values), and four 16-byte stores into
the 128-byte-swizzled tile in channel order: byte c's low code goes to column 2c, its
high code to column 2c + 1.
"""

from __future__ import annotations

from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4kv_jax.formats import e2m1

# E2M1 codes in the 32-bit word the decode takes at once. A block scale covers whole
# words or one half of a word (`e2m1.ptx_word_pairs` scales each half on its own), so
# the tile decode takes blocks of MIN_BLOCK_SIZE values or more.
CODES_PER_WORD = 8
MIN_BLOCK_SIZE = CODES_PER_WORD // 2
_CHUNK = 16  # packed bytes a thread loads at once
_WARPGROUP = 128
_SWIZZLE = 128  # bytes; a swizzle atom is 8 rows of this
SWIZZLED_TILE = plgpu.RefType((plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE)))


def decode_tile(codec, data_ref, scales_ref, out_ref):
    """data_ref uint8 [R, D/2] and scales_ref uint8 [R * D/block / 16, 16] (row-major
    block scales) in shared memory -> out_ref bf16 [R, D] in channel order, swizzled.

    The values are those of `codec.decode_planes` (times 2**-plane_exponent), in bf16.
    """
    rows, width = data_ref.shape
    head_dim = 2 * width
    scales_per_row = head_dim // codec.block_size
    chunks_per_row = width // _CHUNK
    words_per_scale = max(1, codec.block_size // CODES_PER_WORD)
    scales_per_word = max(1, CODES_PER_WORD // codec.block_size)
    word_pairs_ptx = e2m1.ptx_word_pairs(scales_per_word)
    if codec.block_size < MIN_BLOCK_SIZE:
        raise ValueError(f"decode_tile: blocks of {codec.block_size} values; it takes {MIN_BLOCK_SIZE} or more.")
    if (rows * chunks_per_row) % _WARPGROUP:
        raise ValueError(f"decode_tile: {rows} rows of {width} bytes do not split over a warpgroup.")

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), SWIZZLED_TILE))
    def emit(ctx, data, scales, out):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        const = lambda value: arith.constant(i32, value)
        address = lambda ref: llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref))
        data_base, scales_base, out_base = address(data), address(scales), address(out)
        thread = arith.remui(mgpu_utils.thread_idx(), const(_WARPGROUP))
        first_row, column = _first_chunk(thread, chunks_per_row, const)
        load = lambda instruction, offset, results: mgpu_utils.inline_ptx(
            instruction, offset, result_types=results,
            has_side_effects=True,  # keep it after the barrier that makes the bytes ready
        )
        steps = range(rows * chunks_per_row // _WARPGROUP)
        rows_of = [arith.addi(first_row, const(step * _WARPGROUP // chunks_per_row)) for step in steps]
        # Every load of the tile first, then the decodes and stores: a thread's loads
        # are then in flight together, where a store between them would order them.
        loaded = []
        for row in rows_of:
            words = load("ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];",
                         arith.addi(data_base, arith.addi(arith.muli(row, const(width)), column)), [i32] * 4)
            first_block = arith.divui(arith.muli(column, const(2)), const(codec.block_size))
            scale_base = arith.addi(scales_base, arith.addi(arith.muli(row, const(scales_per_row)), first_block))
            if scales_per_word == 2:  # the chunk's eight block scales, one 8-byte load
                scale_bytes = load("ld.shared.v2.b32 {$0, $1}, [$2];", scale_base, [i32] * 2)
            elif words_per_scale == 2:  # the chunk's two block scales, one 16-bit load
                scale_bytes = [load("ld.shared.u16 $0, [$1];", scale_base, i32)]
            else:  # a block scale for each `words_per_scale` words
                scale_bytes = [
                    load("ld.shared.u8 $0, [$1];", arith.addi(scale_base, const(j // words_per_scale)), i32)
                    for j in range(0, 4, words_per_scale)
                ]
            loaded.append((words, scale_bytes))

        def scale_pair(two_bytes):  # bytes 0 and 1 of an i32 -> their two bf16 scales
            return mgpu_utils.inline_ptx(
                codec.plane_scale_pair_ptx, two_bytes, arith.shrui(two_bytes, const(8)), result_types=i32
            )

        def both_halves(pair):  # a scale pair -> (low scale, high scale), each in both halves
            return tuple(mgpu_utils.inline_ptx(f"prmt.b32 $0, $1, $1, {selector};", pair, result_types=i32)
                         for selector in ("0x1010", "0x3232"))

        for row, (words, scale_bytes) in zip(rows_of, loaded):
            if scales_per_word == 2:  # word j's two scales: bytes 2j and 2j + 1 of the eight
                word_scales = [
                    both_halves(scale_pair(arith.andi(arith.shrui(scale_bytes[j // 2], const(16 * (j % 2))), const(0xFFFF))))
                    for j in range(4)
                ]
            elif words_per_scale == 2:
                first, second = both_halves(scale_pair(scale_bytes[0]))
                word_scales = [(first,), (first,), (second,), (second,)]
            else:
                scales = [mgpu_utils.inline_ptx(codec.plane_scale_ptx, b, result_types=i32) for b in scale_bytes]
                word_scales = [(scales[j // words_per_scale],) for j in range(4)]
            for j, word in enumerate(words):
                pairs = mgpu_utils.inline_ptx(word_pairs_ptx, word, *word_scales[j], result_types=[i32] * 4)
                col = arith.addi(arith.muli(column, const(2)), const(8 * j))  # the word's 8 channels: one 16-byte store
                mgpu_utils.inline_ptx(
                    "st.shared.v4.b32 [$0], {$1, $2, $3, $4};",
                    arith.addi(out_base, _swizzled_offset(row, col, head_dim, const)),
                    *pairs,
                )

    emit(data_ref, scales_ref, out_ref)


def _first_chunk(thread, chunks_per_row, const):
    """(row, byte column) of the first 16-byte chunk thread `thread` (0-127) of the
    warpgroup decodes; its later ones sit 128 / chunks_per_row rows further down.

    16-byte accesses are served a quarter-warp (8 threads) at a time, so 8 consecutive
    threads must hit 8 different 16-byte bank groups both when loading packed rows
    (`width` bytes apart) and when storing into the swizzled tile (where a row's group
    is its 16-byte column XOR the row mod 8). Row-major order does both at head_dim 64;
    at 128 it would store chunks 0 and 2 of a row into one group, so there each
    quarter-warp q takes 8 rows, chunk (row // 2 + q) mod 4 of each.
    """
    if chunks_per_row != 4:
        return arith.divui(thread, const(chunks_per_row)), arith.muli(arith.remui(thread, const(chunks_per_row)), const(_CHUNK))
    lane, warp = arith.remui(thread, const(32)), arith.divui(thread, const(32))
    row_in_warp, quarter = arith.remui(lane, const(8)), arith.divui(lane, const(8))
    chunk = arith.remui(arith.addi(arith.divui(row_in_warp, const(2)), quarter), const(4))
    return arith.addi(arith.muli(warp, const(8)), row_in_warp), arith.muli(chunk, const(_CHUNK))


def _swizzled_offset(row, col, head_dim, const):
    """Byte offset of bf16 element (row, col) of a [R, head_dim] tile tiled (8, 64) and
    swizzled by 128 bytes; col a multiple of 8.

    Tiles of 8 rows x 64 columns (1 KiB) are stored row-major over (row tile, column
    tile); inside one, row r's 16-byte chunk k sits at chunk k XOR r.
    """
    tile_cols = _SWIZZLE // 2
    r = arith.remui(row, const(8))
    tile = arith.addi(
        arith.muli(arith.divui(row, const(8)), const(head_dim // tile_cols)), arith.divui(col, const(tile_cols))
    )
    chunk = arith.xori(arith.divui(arith.remui(col, const(tile_cols)), const(8)), r)
    return arith.addi(
        arith.muli(tile, const(8 * _SWIZZLE)), arith.addi(arith.muli(r, const(_SWIZZLE)), arith.muli(chunk, const(16)))
    )
