"""How the warp decode kernel's lanes turn a stored layer into mma.sync operands: one
class for each way a format stores its elements (packed E2M1 with block scales, one
byte a float, two bytes a float), chosen by `operands_for` from the codec alone.

The kernel (`pallas_mosaic_warp`) computes S^T [positions, heads] = K q^T and
O^T [D, heads] += V^T P^T with mma.sync m16n8k16. Lane (g, t) = (lane // 4, lane % 4)
holds these fragments (PTX's layout; a register is a pair of 16-bit values, the lower
index in the low half):
  A [16 x 16]  a0 = (row g, k 2t and 2t + 1), a1 = (row g + 8, the same k),
               a2 = (row g, k 2t + 8 and 2t + 9), a3 = (row g + 8, the same k)
  B [16 x 8]   b0 = (k 2t and 2t + 1, column g), b1 = (k 2t + 8 and 2t + 9, column g)

What every layout shares:
  keys    lane (g, t) reads a quarter of each key row, bytes [R t/4, R (t + 1)/4) of
          the R bytes of positions g, g + 8 (+ 16, 24): channels [(D/4) t, (D/4)(t + 1)).
          A layout orders them into the k columns of its k-steps (`key_channel`); the
          queries follow that order.
  values  lane (g, t) reads an eighth of each value row, bytes [R g/8, R (g + 1)/8) of
          positions 2t, 2t + 1, 2t + 8, 2t + 9 (+ 16 ...): channels [(D/8) g,
          (D/8)(g + 1)), paired over consecutive positions into V^T's A registers.
          Channel (D/8) g + 2c + r fills row g + 8r of channel tile c, in every layout,
          so the output channels a lane holds do not depend on the format.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
from jax._src.lib.mlir.dialects import arith
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from fp4kv_jax.formats import Codec, QuantizedTensor, e2m1


class Operands(abc.ABC):
    """A lane's loads and decodes for one layer layout; subclasses fill in the decodes.

    Attributes:
      mma_dtype: the 16-bit type of the mma operands, "bf16" or "f16"; queries and
        softmax weights are rounded to it.
      default_block, default_warpgroups: positions a warp takes at a time (16 or 32)
        and warpgroups a program (1 to 4) by default, the fastest at the target shape
        (docs/benchmarks.md).
    """

    mma_dtype = "bf16"
    default_block = 32
    default_warpgroups = 4

    def __init__(self, e, codec: Codec, head_dim: int, capacity: int, row, g, t):
        """e: the kernel's Emitter; row: i64, the (batch, KV head) index of the program;
        g, t: i32, the lane's group and thread in group."""
        self.e, self.codec, self.head_dim, self.capacity = e, codec, head_dim, capacity
        self.row, self.g, self.t = row, g, t
        itemsize = jnp.dtype(codec.data_dtype).itemsize
        self.row_bytes = head_dim * itemsize // codec.elements_per_datum
        self.key_bytes, self.value_bytes = self.row_bytes // 4, self.row_bytes // 8

    @staticmethod
    def arrays(x: QuantizedTensor) -> list[jax.Array]:
        """The kernel operands that hold one of the layer's tensors (K or V)."""
        return [x.data]

    def lane_base(self, ref, width, first_row, byte_at):
        """i64 address of byte `byte_at` of row `first_row` of this program's [capacity,
        width] rows of `ref`."""
        e = self.e
        of_row = arith.muli(self.row, arith.constant(e.i64, self.capacity * width))
        return e.at(e.address(ref, of_row), arith.addi(arith.muli(first_row, e.int(width)), byte_at))

    def key_lanes(self, refs):
        """[(address, row width in bytes)] of the lane's first key row in each array."""
        byte_at = arith.muli(self.t, self.e.int(self.key_bytes))
        return [(self.lane_base(refs[0], self.row_bytes, self.g, byte_at), self.row_bytes)]

    def value_lanes(self, refs):
        """The same for the lane's first value row (position 2t)."""
        byte_at = arith.muli(self.g, self.e.int(self.value_bytes))
        first_row = arith.muli(self.t, self.e.int(2))
        return [(self.lane_base(refs[0], self.row_bytes, first_row, byte_at), self.row_bytes)]

    def load_key_row(self, at, r):
        """The raw words of key row r positions after the lane's first; `at` the block's
        addresses of `key_lanes`."""
        return (self.e.load(at[0], self.key_bytes, r * self.row_bytes),)

    def load_value_row(self, at, r):
        return (self.e.load(at[0], self.value_bytes, r * self.row_bytes),)

    @abc.abstractmethod
    def key_steps(self, raw):
        """One key row's A registers: for each k-step, (the pair of k 2t, 2t + 1; the
        pair of k 2t + 8, 2t + 9)."""

    @abc.abstractmethod
    def value_pairs(self, raw_a, raw_b):
        """The lane's D/8 value channels of two positions a, b: the pair (channel at a,
        channel at b) of channel (D/8) g + i, for i in order."""

    def query_steps(self, words):
        """The B registers (b0, b1) of each k-step from the lane's query channels
        [(D/4) t, (D/4)(t + 1)) as D/8 pairs of mma_dtype, word i = channels 2i, 2i + 1."""
        return [(words[2 * s], words[2 * s + 1]) for s in range(self.head_dim // 16)]

    @staticmethod
    def key_channel(head_dim: int, step: int, k):
        """The channel in column k (0..15) of the keys' k-step `step`: lane t = (k % 8)
        // 2 holds it; here the lane's channels in order, 4 a k-step."""
        t, pair_lane, upper = (k % 8) // 2, k % 2, k // 8
        return (head_dim // 4) * t + 4 * step + 2 * upper + pair_lane


class PackedFp4Operands(Operands):
    """Packed E2M1 with block scales of 16 or more values (fp4_e2m1, the nvfp4 family,
    mxfp4): the codes are decoded with their block scales into bf16 pairs,
    2**-plane_exponent times the stored value.

    Keys: the lane's word j decodes into the channel pairs (n, n + 4) of its 8 channels
    (`e2m1.PTX_WORD_HALF_PAIRS`), and k-step s = 2j + p takes pairs 2p and 2p + 1.
    Values: two positions' words are decoded in row pairs (`e2m1.PTX_ROW_PAIR_COLUMNS`).
    """

    def __init__(self, e, codec, head_dim, capacity, row, g, t):
        super().__init__(e, codec, head_dim, capacity, row, g, t)
        self.scales_per_row = head_dim // codec.block_size
        self.key_blocks = max(1, head_dim // 4 // codec.block_size)  # scales a key row's quarter spans

    @staticmethod
    def arrays(x):
        as_bytes = lambda s: s if s.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(s, jnp.uint8)
        return [x.data, as_bytes(x.scales)]

    def key_lanes(self, refs):
        c, D = self.e.int, self.head_dim
        scale_at = arith.divui(arith.muli(self.t, c(D // 4)), c(self.codec.block_size))
        scales = (self.lane_base(refs[1], self.scales_per_row, self.g, scale_at), self.scales_per_row)
        return [*super().key_lanes(refs), scales]

    def value_lanes(self, refs):
        c, D = self.e.int, self.head_dim
        scale_at = arith.divui(arith.muli(self.g, c(D // 8)), c(self.codec.block_size))
        first_row = arith.muli(self.t, c(2))
        scales = (self.lane_base(refs[1], self.scales_per_row, first_row, scale_at), self.scales_per_row)
        return [*super().value_lanes(refs), scales]

    def load_key_row(self, at, r):
        return (*super().load_key_row(at, r), self.e.load(at[1], self.key_blocks, r * self.scales_per_row))

    def load_value_row(self, at, r):
        return (*super().load_value_row(at, r), self.e.load(at[1], 1, r * self.scales_per_row))

    def _scale_pair(self, first, second):
        return mgpu_utils.inline_ptx(self.codec.plane_scale_pair_ptx, first, second, result_types=self.e.i32)

    def _key_scales(self, scale_bytes):
        """The bf16 scale pair (one scale twice) for each word of a key row."""
        [bytes_] = scale_bytes
        if self.key_blocks == 1:
            pairs = [self._scale_pair(bytes_, bytes_)]
        else:
            both = self._scale_pair(bytes_, arith.shrui(bytes_, self.e.int(8)))
            pairs = [self.e.permute(both, both, selector) for selector in (0x1010, 0x3232)]
        words = self.head_dim // 32
        return [pairs[j * len(pairs) // words] for j in range(words)]

    def key_steps(self, raw):
        words, scale_bytes = raw
        decoded = [
            mgpu_utils.inline_ptx(e2m1.PTX_WORD_HALF_PAIRS, word, scale, result_types=[self.e.i32] * 4)
            for word, scale in zip(words, self._key_scales(scale_bytes))
        ]
        return [(decoded[s // 2][2 * (s % 2)], decoded[s // 2][2 * (s % 2) + 1]) for s in range(self.head_dim // 16)]

    def value_pairs(self, raw_a, raw_b):
        (words_a, [byte_a]), (words_b, [byte_b]) = raw_a, raw_b
        pair = self._scale_pair(byte_a, byte_b)
        return [
            column
            for wa, wb in zip(words_a, words_b)
            for column in mgpu_utils.inline_ptx(e2m1.PTX_ROW_PAIR_COLUMNS, wa, wb, pair, result_types=[self.e.i32] * 8)
        ]

    def query_steps(self, words):
        # k-step s = 2j + p: channels (b + 2p, b + 2p + 4) and (b + 2p + 1, b + 2p + 5)
        # of b = (D/4) t + 8j, the low or the high halves of words 4j + p and 4j + 2 + p.
        low, high = 0x5410, 0x7632
        return [
            (self.e.permute(words[4 * j + p], words[4 * j + 2 + p], low),
             self.e.permute(words[4 * j + p], words[4 * j + 2 + p], high))
            for j, p in (divmod(s, 2) for s in range(self.head_dim // 16))
        ]

    @staticmethod
    def key_channel(head_dim, step, k):
        t, pair_lane, upper = (k % 8) // 2, k % 2, k // 8
        return (head_dim // 4) * t + 8 * (step // 2) + 2 * (step % 2) + upper + 4 * pair_lane


class Float8Operands(Operands):
    """One byte a float with a tensor-wide scale (fp8_e4m3, fp8_e5m2): the codec's
    `word_f16_pairs_ptx` turns four codes into two f16 pairs, exactly, so the mma
    takes f16 operands (and the queries, scaled, must lie within f16's range, 65504:
    beyond it they are infinite and the output is not finite). Keys: word s of the lane's quarter is k-step s. Values: byte
    permutes pair two positions' codes before the decode."""

    mma_dtype = "f16"
    default_block = 16
    default_warpgroups = 2
    # prmt selectors of the bytes (a0, b0, a1, b1) and (a2, b2, a3, b3) of two words.
    POSITION_PAIR_SELECTORS = (0x5140, 0x7362)

    def _decode(self, word):
        return mgpu_utils.inline_ptx(self.codec.word_f16_pairs_ptx, word, result_types=[self.e.i32] * 2)

    def key_steps(self, raw):
        [words] = raw
        return [tuple(self._decode(word)) for word in words]

    def value_pairs(self, raw_a, raw_b):
        [words_a], [words_b] = raw_a, raw_b
        return [  # channels 4u .. 4u + 3 of word u
            pair
            for wa, wb in zip(words_a, words_b)
            for selector in self.POSITION_PAIR_SELECTORS
            for pair in self._decode(self.e.permute(wa, wb, selector))
        ]


class Float16Operands(Operands):
    """Two bytes a float (bf16, fp16): the stored pairs are the mma operands. Keys: words
    2s and 2s + 1 of the lane's quarter are k-step s. Values: half permutes pair two
    positions."""

    default_block = 16
    default_warpgroups = 2
    # prmt selectors of the low halves (a0, b0) and the high halves (a1, b1) of two words.
    POSITION_PAIR_SELECTORS = (0x5410, 0x7632)

    def __init__(self, e, codec, head_dim, capacity, row, g, t):
        super().__init__(e, codec, head_dim, capacity, row, g, t)
        self.mma_dtype = "bf16" if codec.data_dtype == jnp.bfloat16 else "f16"

    def key_steps(self, raw):
        [words] = raw
        return [(words[2 * s], words[2 * s + 1]) for s in range(self.head_dim // 16)]

    def value_pairs(self, raw_a, raw_b):
        [words_a], [words_b] = raw_a, raw_b
        return [
            self.e.permute(wa, wb, selector) for wa, wb in zip(words_a, words_b) for selector in self.POSITION_PAIR_SELECTORS
        ]


def operands_for(codec: Codec) -> type[Operands] | None:
    """The layout class that reads `codec`'s layers, or None if the kernel has none."""
    itemsize = jnp.dtype(codec.data_dtype).itemsize
    # A lane's value columns (16 channels at head_dim 128) must share one block scale.
    if codec.elements_per_datum == 2 and codec.plane_scale_pair_ptx is not None and codec.block_size >= 16:
        return PackedFp4Operands
    if itemsize == 1 and codec.word_f16_pairs_ptx is not None:
        return Float8Operands
    if itemsize == 2 and codec.data_dtype in (jnp.bfloat16, jnp.float16) and codec.block_size is None:
        return Float16Operands
    return None
