"""E2M1 (FP4) codes, nibble packing and exact powers of two, shared by the FP4 codecs.

An E2M1 code is 4 bits: bit 3 is the sign, bits 0-2 index the magnitudes
(0, 0.5, 1, 1.5, 2, 3, 4, 6). Two codes share a byte along the last axis, the even
element in the low nibble: byte = (code[2i+1] << 4) | code[2i].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MAX_MAGNITUDE = 6.0
# Midpoints between neighbouring magnitudes.
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# All 16 code values, indexed by code; -0.0 for code 8.
VALUES = np.array(MAGNITUDES + tuple(-m for m in MAGNITUDES), np.float32)


def magnitude_index_ties_away(abs_y: jax.Array) -> jax.Array:
    """Index of |y| on the grid, a midpoint rounding away from zero.

    The count of midpoints that |y| reaches or passes; saturates at 7 (= 6.0).
    float32 [...] -> uint8 [...].
    """
    return _magnitude_index(abs_y, nearest_even=False)


def magnitude_index_nearest_even(abs_y: jax.Array) -> jax.Array:
    """Index of |y| on the grid, rounding to nearest with ties to the even code.

    At a midpoint whose lower neighbour has an even index the tie stays down,
    otherwise it goes up. Saturates at 7 (= 6.0). float32 -> uint8.
    """
    return _magnitude_index(abs_y, nearest_even=True)


def _magnitude_index(abs_y: jax.Array, *, nearest_even: bool) -> jax.Array:
    # Integer ops on the float32 bits, a few a value where counting the seven
    # midpoints takes fourteen. From 1.0 up the grid is float32 with one mantissa
    # bit, so rounding the mantissa at bit 22 and reading exponent and that bit gives
    # the index (2 for 1.0, 3 for 1.5, ...); below 1.0 the grid 0, 0.5, 1 is two
    # comparisons (0.25 ties to index 0 under nearest-even, 0.75 to index 2 either way).
    bits = jax.lax.bitcast_convert_type(abs_y, jnp.uint32)
    half = jnp.uint32(0x200000)
    if nearest_even:
        half = half - 1 + ((bits >> 22) & 1)
    normal = jnp.minimum((bits + half) >> 22, jnp.uint32(259)) - 252
    quarter, three_quarters = 0x3E800000, 0x3F400000
    passed_quarter = bits > quarter if nearest_even else bits >= quarter
    low = passed_quarter.astype(jnp.uint32) + (bits >= three_quarters).astype(jnp.uint32)
    return jnp.where(bits >= 0x3F800000, normal, low).astype(jnp.uint8)


def with_sign(magnitude_index: jax.Array, y: jax.Array) -> jax.Array:
    """Sets bit 3 where y < 0. uint8, float32 -> uint8 codes."""
    return magnitude_index | jnp.where(y < 0, jnp.uint8(8), jnp.uint8(0))


def pack(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., D] -> packed bytes [..., D // 2], even element low."""
    return pack_planes(*split_planes(codes))


def split_planes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., D] -> (even columns, odd columns), each [..., D // 2]: the planes that
    `Codec.encode_planes` takes and `decode_planes` returns for packed formats."""
    return x[..., 0::2], x[..., 1::2]


def pack_planes(even: jax.Array, odd: jax.Array) -> jax.Array:
    """uint8 codes of the even and odd columns, each [..., n] -> packed bytes [..., n]."""
    return (odd << 4) | even


def plane_blocks(planes: tuple[jax.Array, ...], block_size: int) -> tuple[jax.Array, ...]:
    """Planes [..., D // P] -> [..., D // block_size, block_size // P] each: block j
    of the logical columns is block j of every plane."""
    return tuple(block_view(p, block_size // len(planes)) for p in planes)


def block_absmax(blocks: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
    """Blocks [..., n, b] of each plane -> (absmax float32 [..., n], non-finite bool [..., n]).

    A block holding NaN or an infinity is non-finite and its absmax is 0. The max is
    taken over the magnitudes' bits: for non-negative floats the integer order is the
    float order, NaN and infinities sort above every finite value, and one integer
    max behaves alike on every backend (Triton's float max drops NaN, XLA's keeps it).
    """
    magnitude_bits = [
        jax.lax.bitcast_convert_type(b, jnp.uint32) & jnp.uint32(0x7FFFFFFF) for b in blocks
    ]
    largest = functools.reduce(jnp.maximum, [jnp.max(m, axis=-1) for m in magnitude_bits])
    nonfinite = largest >= 0x7F800000
    absmax = jax.lax.bitcast_convert_type(jnp.where(nonfinite, jnp.uint32(0), largest), jnp.float32)
    return absmax, nonfinite


def unpack(packed: jax.Array) -> jax.Array:
    """Packed bytes [..., D // 2] -> uint8 codes [..., D]."""
    low, high = packed & 0x0F, packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)


def code_values(codes: jax.Array) -> jax.Array:
    """uint8 codes -> float32 values."""
    return jnp.asarray(VALUES)[codes.astype(jnp.int32)]


def packed_planes(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed bytes [..., n] -> (even codes, odd codes), each uint8 [..., n]."""
    return packed & 0x0F, packed >> 4


def value_by_bits(codes: jax.Array) -> jax.Array:
    """E2M1 codes (uint8) -> float32 values, by bit ops alone (no table gather).

    The three magnitude bits placed at float16 bits 9-11 and the sign at bit 15 form
    the float16 value(code) * 2**-14 (code 1, 0.5, lands on the float16 subnormal
    2**-15); the multiply by 2**14 is exact.
    """
    c = codes.astype(jnp.uint16)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32) * 16384.0


def expand_block_scales(scales: jax.Array, columns_per_block: int) -> jax.Array:
    """[rows, n] -> [rows, n * columns_per_block], each scale repeated."""
    rows, n = scales.shape
    wide = jnp.broadcast_to(scales[:, :, None], (rows, n, columns_per_block))
    return wide.reshape(rows, n * columns_per_block)


# Kernels receive E2M1 planes scaled by 2**PLANE_EXPONENT and undo it on their queries
# and outputs: the bit decode below yields value * 2**-126, and folding 2**63 of that
# into the block scale leaves one multiply per pair of values.
PLANE_EXPONENT = -63


def _ptx_decode(nibble_shift: int) -> str:
    """PTX decoding one nibble of each of 4 packed bytes into 4 bf16 values.

    Bytes 0,1 (then 2,3) are spread into the two halves of a word; the nibble's
    magnitude bits go to bf16 bits 6-8 and its sign to bit 15, which reads as
    value * 2**-126 (code 1 is the bf16 subnormal 2**-127); one multiply by the block
    scale times 2**63 finishes two values per instruction. Operands: $0, $1 the bf16
    pairs out; $2 the 4 bytes; $3, $4 the bf16 scale pairs.
    """
    magnitude, sign = 6 - nibble_shift, 12 - nibble_shift
    pair = """shl.b32 m, {w}, {magnitude}; shl.b32 s, {w}, {sign}; and.b32 s, s, 0x80008000;
lop3.b32 m, m, 0x01C001C0, s, 0xEA; mul.rn.bf16x2 {out}, m, {scale};
"""
    return (
        "{\n.reg .b32 z, lo, hi, m, s;\nmov.b32 z, 0;\n"
        "prmt.b32 lo, $2, z, 0x4140;\nprmt.b32 hi, $2, z, 0x4342;\n"
        + pair.format(w="lo", magnitude=magnitude, sign=sign, out="$0", scale="$3")
        + pair.format(w="hi", magnitude=magnitude, sign=sign, out="$1", scale="$4")
        + "}"
    )


PTX_EVEN_PLANE, PTX_ODD_PLANE = _ptx_decode(0), _ptx_decode(4)


def ptx_exponent_scale(nan_byte: int) -> str:
    """`Codec.plane_scale_ptx` for uint8 exponent scales (bias 127).

    2**(byte - 127) * 2**-PLANE_EXPONENT in bf16 has exponent field byte + 63: byte 0
    gives 0 and bytes of 192 or more inf, as `exponent_byte_scale` does once cast to
    bf16; nan_byte gives NaN.
    """
    bias = 127 + PLANE_EXPONENT - 127  # the bf16 exponent field is byte - bias
    return (
        "{\n.reg .pred nan, big, zero;\n.reg .b32 e;\n"
        f"setp.eq.u32 nan, $1, {nan_byte};\nsetp.ge.u32 big, $1, {255 + bias};\n"
        "setp.eq.u32 zero, $1, 0;\n"
        f"add.u32 e, $1, {-bias};\nshl.b32 e, e, 7;\n"
        "selp.b32 e, 0x7F80, e, big;\nselp.b32 e, 0x7FC0, e, nan;\nselp.b32 e, 0, e, zero;\n"
        "prmt.b32 $0, e, e, 0x1010;\n}"
    )


def ptx_exponent_scale_pair() -> str:
    """`Codec.plane_scale_pair_ptx` for uint8 exponent scales (bias 127): the bf16
    exponent field byte + 63 for both bytes at once, saturated at 255 (inf), so bytes
    of 192 or more and the non-finite byte 255 give inf."""
    bias = 127 + PLANE_EXPONENT - 127
    return (
        "{\n.reg .b32 x, top;\n"
        "prmt.b32 x, $1, $2, 0x7430;\n"  # the two bytes as 16-bit lanes
        f"add.u32 x, x, {(-bias) * 0x10001};\nmov.b32 top, 0x00FF00FF;\nmin.u16x2 x, x, top;\n"
        "shl.b32 $0, x, 7;\n}"
    )


# `Codec.plane_scale_ptx` for e4m3 block scales: hardware e4m3 -> f16, then times
# 2**-PLANE_EXPONENT in float32 and rounded to bf16 (exact: 3 mantissa bits).
PTX_E4M3_SCALE = (
    "{\n.reg .b16 sb, lo, hi, b;\n.reg .b32 pair;\n.reg .f32 f;\n"
    "cvt.u16.u32 sb, $1;\ncvt.rn.f16x2.e4m3x2 pair, sb;\nmov.b32 {lo, hi}, pair;\n"
    f"cvt.f32.f16 f, lo;\nmul.f32 f, f, 0f{(127 - PLANE_EXPONENT) << 23:08X};\n"
    "cvt.rn.bf16.f32 b, f;\nmov.b32 $0, {b, b};\n}"
)
# `Codec.plane_scale_pair_ptx` for e4m3 block scales: the same, two at a time, with
# the power of two applied to the bf16 pair (exact: it stays within bf16's range).
PTX_E4M3_SCALE_PAIR = (
    "{\n.reg .b32 x, pair, unscaled, power;\n.reg .b16 sb, lo, hi;\n.reg .f32 f0, f1;\n"
    "prmt.b32 x, $1, $2, 0x3340;\ncvt.u16.u32 sb, x;\ncvt.rn.f16x2.e4m3x2 pair, sb;\nmov.b32 {lo, hi}, pair;\n"
    "cvt.f32.f16 f0, lo;\ncvt.f32.f16 f1, hi;\ncvt.rn.bf16x2.f32 unscaled, f1, f0;\n"
    f"mov.b32 power, {((127 - PLANE_EXPONENT) << 7) * 0x10001:#010x};\nmul.rn.bf16x2 $0, unscaled, power;\n}}"
)


def ptx_word_pairs(scales_per_word: int) -> str:
    """PTX decoding the 8 codes of one 32-bit word of 4 packed bytes b0..b3 into 4 bf16
    pairs in channel order: $n = (low code, high code) of byte n, channels 2n and
    2n + 1; $4 the word, then `scales_per_word` (1 or 2) bf16 scale pairs, $5 for
    channels 0-7 or, with 2, $5 for channels 0-3 and $6 for 4-7 (blocks of 4).

    The low and high codes are masked apart, and a byte permute takes byte n of each
    into the two 16-bit halves (zero bytes by replicating the sign bit of a byte that
    has none). A nibble x at bits 0-3 of a half then becomes (x << 6) | (x << 12) by
    one multiply (the two never overlap, so the sum is the OR): magnitude at bits 6-8,
    sign at bit 15 once masked, read as value * 2**-126 like `_ptx_decode`'s.
    """
    if scales_per_word not in (1, 2):
        raise ValueError(f"scales_per_word: 1 or 2, got {scales_per_word}.")
    return (
        "{\n.reg .b32 lo, hi, x, y0, y1, y2, y3;\n"
        "and.b32 lo, $4, 0x0F0F0F0F;\nshr.u32 hi, $4, 4;\nand.b32 hi, hi, 0x0F0F0F0F;\n"
        + "".join(
            f"prmt.b32 x, lo, hi, {n | (8 | n) << 4 | (4 + n) << 8 | (12 + n) << 12:#06x};\nmul.lo.u32 x, x, 4160;\n"
            f"and.b32 x, x, 0x81C081C0;\nmul.rn.bf16x2 y{n}, x, ${5 + n * scales_per_word // 4};\n"
            for n in range(4)
        )
        + "mov.b32 $0, y0;\nmov.b32 $1, y1;\nmov.b32 $2, y2;\nmov.b32 $3, y3;\n}"  # outputs last: they may share inputs' registers
    )


# The decode of `ptx_word_pairs` for two codes 16 bits apart, lane by lane: `src`
# masked to one nibble a 16-bit half (at bits 0-3, or 4-7 when `high`), spread by one
# multiply, masked to the bf16 bits and scaled by the bf16 pair `scale`, into `out`.
def _ptx_half_pair(out: str, src: str, high: bool, scale: str) -> str:
    mask, factor = ("0x00F000F0", 260) if high else ("0x000F000F", 4160)
    return (
        f"and.b32 x, {src}, {mask};\nmul.lo.u32 x, x, {factor};\n"
        f"and.b32 x, x, 0x81C081C0;\nmul.rn.bf16x2 {out}, x, {scale};\n"
    )


# PTX decoding the 8 codes of one 32-bit word (byte i holds channels 2i, low nibble,
# and 2i + 1) into 4 bf16 pairs $n = (channel n, channel n + 4), n = 0..3; $4 the
# word, $5 the bf16 scale pair. Channels n and n + 4 sit 16 bits apart, so no byte
# permute is needed: one shift brings bytes 1 and 3 down for channels 2, 3, 6, 7.
PTX_WORD_HALF_PAIRS = (
    "{\n.reg .b32 down, x, y0, y1, y2, y3;\nshr.u32 down, $4, 8;\n"
    + "".join(_ptx_half_pair(f"y{n}", "$4" if n < 2 else "down", n % 2 == 1, "$5") for n in range(4))
    + "".join(f"mov.b32 ${n}, y{n};\n" for n in range(4))
    + "}"
)


# PTX decoding the same 8 columns of two rows a and b into 8 bf16 pairs (row a, row b):
# $n is column n (n = 0..7) of the word pair $8 (row a) and $9 (row b); $10 the bf16
# pair (scale of a, scale of b). Pairing rows rather than columns is the operand
# layout mma.sync wants when positions are its K. A byte permute puts bytes i, i + 1
# of a in the low half and of b in the high half; then `PTX_WORD_HALF_PAIRS`'s decode.
PTX_ROW_PAIR_COLUMNS = (
    "{\n.reg .b32 p, down, x, " + ", ".join(f"y{n}" for n in range(8)) + ";\n"
    + "".join(
        f"prmt.b32 p, $8, $9, {selector:#06x};\nshr.u32 down, p, 8;\n"
        + "".join(
            _ptx_half_pair(f"y{4 * part + n}", "p" if n < 2 else "down", n % 2 == 1, "$10") for n in range(4)
        )
        for part, selector in enumerate((0x5410, 0x7632))
    )
    + "".join(f"mov.b32 ${n}, y{n};\n" for n in range(8))
    + "}"
)


def exponent_byte_scale(scales: jax.Array, nan_byte: int) -> jax.Array:
    """uint8 exponent bytes (bias 127) -> float32 2**(byte - 127), NaN for nan_byte.

    Built from exponent bits, so byte 0 gives 0 rather than the subnormal 2**-127,
    as XLA's CPU flush-to-zero does.
    """
    power = jax.lax.bitcast_convert_type(scales.astype(jnp.uint32) << 23, jnp.float32)
    return jnp.where(scales == nan_byte, jnp.nan, power)


def decode_packed_planes(data: jax.Array, block_scale: jax.Array, block_size: int, *, ptx: bool):
    """Packed tile uint8 [rows, D/2] and float32 block scales [rows, D/block] ->
    (even, odd) planes [rows, D/2] of value(code) * block scale * 2**PLANE_EXPONENT.

    The products are exact in bf16 when the block scale is a power of two below
    2**64 or an e4m3 value, so the PTX path returns bf16 and the portable path
    float32 with the same values. Block scales of 2**62 or more (|x| above about
    2**64) overflow to inf here; the reference path has no such limit.
    """
    scale = expand_block_scales(block_scale * 2.0**-PLANE_EXPONENT, block_size // 2)
    if not ptx:
        return tuple(value_by_bits(c) * scale * 2.0**-126 for c in packed_planes(data))
    from jax.experimental.pallas import triton as plgpu

    plane = jax.ShapeDtypeStruct(data.shape, jnp.bfloat16)
    scale = scale.astype(jnp.bfloat16)
    return tuple(
        plgpu.elementwise_inline_asm(
            asm, args=[data, scale], constraints="=r,=r,r,r,r", pack=4, result_shape_dtypes=[plane]
        )[0]
        for asm in (PTX_EVEN_PLANE, PTX_ODD_PLANE)
    )


def exponent_of(x: jax.Array) -> jax.Array:
    """floor(log2(|x|)) for normal float32 x, read from the exponent bits; int32.

    Zero and subnormals give -127.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return ((bits >> 23) & 0xFF).astype(jnp.int32) - 127


def mantissa_of(x: jax.Array) -> jax.Array:
    """The 23 stored mantissa bits of float32 x, as int32."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return (bits & 0x7FFFFF).astype(jnp.int32)


def exact_pow2(e: jax.Array) -> jax.Array:
    """2.0**e as float32, exact, by writing the exponent bits; e int32 in [-126, 127].

    XLA's exp2 is off by an ulp for integer arguments beyond about +-12 on CPU.
    """
    bits = ((e + 127).astype(jnp.uint32) & 0xFF) << 23
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def scale_by_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
    """x * 2**e, exact for any int32 e with a normal result (two exact steps)."""
    half = e // 2
    return x * exact_pow2(half) * exact_pow2(e - half)


def _largest_mantissa_rounding_down() -> tuple[tuple[int, int], ...]:
    """For k in [-150, 128): the largest 23-bit mantissa j with RN32(k + log2(1 + j/2**23)) == k.

    That is the largest j whose log2 offset stays within half the float32 spacing
    just above k (the tie goes to k, whose last mantissa bit is even). The limit only
    changes between binades of |k|, so it is returned as runs: (first k, limit) pairs
    in increasing k.
    """
    ks = np.arange(-150, 128)
    limits = np.zeros(ks.shape, np.int64)
    j = np.arange(0, 64, dtype=np.float64)
    offsets = np.log1p(j * 2.0**-23) / np.log(2.0)
    for i, k in enumerate(ks):
        k32 = np.float32(k)
        spacing = float(np.nextafter(k32, np.float32(np.inf))) - float(k32)
        limits[i] = np.nonzero(offsets <= spacing / 2)[0].max()
    starts = np.flatnonzero(np.diff(limits, prepend=-1))
    return tuple((int(ks[i]), int(limits[i])) for i in starts)


_ROUND_DOWN_LIMIT_RUNS = _largest_mantissa_rounding_down()


def ceil_log2_rounded(v: jax.Array) -> jax.Array:
    """ceil(log2(v)) where log2 is float32 log2, correctly rounded; v > 0 normal. int32.

    This is what `torch.ceil(torch.log2(v))` computes in float32 with a correctly
    rounded log2, done with integer ops so it is exact on every backend (XLA's own log2
    is not exact even at powers of two). Just above a power of two 2**k the float32
    log2 rounds back down to k, so the result is k, not k + 1.
    """
    k = exponent_of(v)
    # A dozen selects over the runs rather than a table gather, which Pallas cannot
    # lower to Triton.
    (_, limit), *runs = _ROUND_DOWN_LIMIT_RUNS
    limit = jnp.full(k.shape, limit, jnp.int32)
    for first_k, run_limit in runs:
        limit = jnp.where(k >= first_k, run_limit, limit)
    return k + (mantissa_of(v) > limit).astype(jnp.int32)


def divide(x: jax.Array, divisor: jax.Array | float, *, ptx: bool = False) -> jax.Array:
    """x / divisor in float32, correctly rounded even under jit and inside kernels.

    XLA rewrites a division by a broadcast value (a scalar or a per-block scale) into a
    multiplication by its rounded reciprocal, and a quotient divided again, (a / b) / c,
    into a / (b * c); both are an ulp off for some x, which changes stored bytes.
    Hiding both operands behind an optimization barrier keeps a true division.

    Pallas lowers neither the barrier nor a correctly rounded `/` to Triton (Triton's
    float32 `/` is the approximate div.full.f32), so inside a Pallas kernel compiled
    for an NVIDIA GPU pass `ptx=True`: the division is then PTX div.rn.f32, with the
    same result.
    """
    divisor = jnp.broadcast_to(jnp.asarray(divisor, jnp.float32), x.shape)
    if not ptx:
        x, divisor = jax.lax.optimization_barrier((x, divisor))
        return x / divisor
    from jax.experimental.pallas import triton as plgpu

    [quotient] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[x, divisor],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return quotient


def divide_by_scalar(x: jax.Array, divisor: jax.Array, *, ptx: bool) -> jax.Array:
    """x / divisor for a positive float32 scalar divisor, correctly rounded as `divide`.

    Inside a kernel compiled for an NVIDIA GPU (`ptx=True`), a power-of-two divisor
    (fp8's default global scale, 1.0) multiplies by its reciprocal instead: that is the
    same real quotient, rounded once, so the same float32, at one instruction where
    div.rn.f32 takes several. The test is on the scalar, so the whole kernel takes one
    branch.
    """
    if not ptx:
        return divide(x, divisor)
    exponent = exponent_of(divisor)
    power_of_two = (divisor > 0) & (mantissa_of(divisor) == 0) & (jnp.abs(exponent) <= 126)
    return jax.lax.cond(
        power_of_two,
        lambda: x * exact_pow2(-exponent),
        lambda: divide(x, divisor, ptx=True),
    )


# The one NaN byte float8 formats store (see round_to_float8).
FLOAT8_NAN_BYTE = np.uint8(0x7F)


def round_to_float8(w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """float32 w, within dtype's finite range or NaN -> dtype, rounded once to nearest-even.

    NaN stores FLOAT8_NAN_BYTE, 0x7F, the positive NaN with every mantissa bit set,
    whichever NaN a backend's conversion would pick: Hopper's conversion writes it,
    and XLA's CPU float8 updates (through float16) keep it; numpy's e5m2 NaN, 0x7E,
    would come back from them as 0x7F.

    The rounding is float32 addition: XLA's float32-to-float8 conversion on CPU can
    round twice (through a wider format), which breaks ties, so w is rounded on the
    float8 grid in float32 first and the final conversion is exact. |w| plus a shifter
    1.5 * 2**k whose float32 spacing is the grid's quantum lands on the grid, ties to
    even, and subtracting the shifter again is exact (Pallas lowers no jnp.round to
    Triton). The fp8 codec's compiled kernel path rounds with `saturated_float8_bytes`
    instead; nvfp4's block scales, a few a tile, come through here everywhere.
    """
    finfo = jnp.finfo(dtype)
    min_exponent, mantissa_bits = int(np.log2(float(finfo.smallest_normal))), finfo.nmant
    magnitude = jnp.abs(w)
    exponent = jnp.maximum(exponent_of(magnitude), min_exponent)
    shifter = 1.5 * exact_pow2(exponent - mantissa_bits + 23)
    rounded_magnitude = (magnitude + shifter) - shifter
    sign = jax.lax.bitcast_convert_type(w, jnp.uint32) & jnp.uint32(0x80000000)
    rounded = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(rounded_magnitude, jnp.uint32) | sign, jnp.float32
    )
    stored = jax.lax.bitcast_convert_type(rounded.astype(dtype), jnp.uint8)
    return jax.lax.bitcast_convert_type(jnp.where(jnp.isnan(w), FLOAT8_NAN_BYTE, stored), dtype)


def saturated_float8_bytes(w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """float32 w -> uint8 float8 bytes by PTX cvt.rn.satfinite (sm_89 and later), inside
    a Pallas kernel (Triton lowering): nearest-even, finite values past the range and
    infinities to the largest finite value, NaN of either sign to FLOAT8_NAN_BYTE."""
    from jax.experimental.pallas import triton as plgpu

    ptx_types = {jnp.dtype(jnp.float8_e4m3fn): "e4m3", jnp.dtype(jnp.float8_e5m2): "e5m2"}
    ptx_type = ptx_types[jnp.dtype(dtype)]
    [stored] = plgpu.elementwise_inline_asm(
        # The second source lands in the low byte: element 0 of the pair.
        f"cvt.rn.satfinite.{ptx_type}x2.f32 $0, $2, $1;",
        args=[w],
        constraints="=h,r,r",
        pack=2,
        # int8: Triton's inline assembly takes signless integers only.
        result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int8)],
    )
    return jax.lax.bitcast_convert_type(stored, jnp.uint8)


def block_view(x: jax.Array, block_size: int) -> jax.Array:
    """[..., D] -> [..., D // block_size, block_size]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
