"""The register decodes of the warp decode kernel, run on CPU by a small emulator of the
PTX instructions they use: E2M1's (e2m1.PTX_WORD_HALF_PAIRS and PTX_ROW_PAIR_COLUMNS)
against the code table, FP8's (the codecs' word_f16_pairs_ptx) against ml_dtypes, and
the byte and half permutes that pair two positions' values."""

import re

import ml_dtypes
import numpy as np
import pytest

from fp4kv_jax.formats import e2m1, get_codec
from fp4kv_jax.kernels.decode_attention.warp_operands import Float8Operands, Float16Operands

SCALE_PAIR = 0x7E807E80  # bf16 2**126 twice: undoes the codes' 2**-126
_FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def _bf16_halves(word):
    return [np.array([(word >> shift & 0xFFFF) << 16], np.uint32).view(np.float32)[0] for shift in (0, 16)]


def _bf16_bits(value):
    bits = int(np.array([value], np.float32).view(np.uint32)[0])
    return (bits + 0x7FFF + (bits >> 16 & 1)) >> 16  # round to nearest even


def _run(ptx, inputs, outputs):
    """Runs `ptx` with $0..$(outputs - 1) as results and inputs from $outputs on."""
    regs = {f"${outputs + i}": value for i, value in enumerate(inputs)}
    value = lambda x: regs[x] if x in regs else int(x, 0)
    for line in ptx.splitlines():
        match = re.fullmatch(r"(\S+) (.+);", line.strip())
        if not match or match[1] == ".reg":
            continue
        op = match[1]
        halves = re.fullmatch(r"\{(\w+), (\w+)\}, (\S+)", match[2])
        if op == "mov.b32" and halves:  # a word into its low and high halves
            word = value(halves[3])
            regs[halves[1]], regs[halves[2]] = word & 0xFFFF, word >> 16
            continue
        args = [a.strip() for a in match[2].split(",")]
        dst, srcs = args[0], [value(a) for a in args[1:]]
        fp8 = re.fullmatch(r"cvt\.rn\.f16x2\.(e4m3|e5m2)x2", op)
        if fp8:
            codes = np.array([srcs[0] & 0xFF, srcs[0] >> 8], np.uint8).view(_FP8[fp8[1]])
            result = int(codes.astype(np.float16).view(np.uint16).astype(np.uint32) @ [1, 1 << 16])
        elif op in ("mov.b32",):
            result = srcs[0]
        elif op == "and.b32":
            result = srcs[0] & srcs[1]
        elif op == "shr.u32":
            result = srcs[0] >> srcs[1]
        elif op == "mul.lo.u32":
            result = srcs[0] * srcs[1] & 0xFFFFFFFF
        elif op == "prmt.b32":
            pool = (srcs[1] << 32 | srcs[0]).to_bytes(8, "little")
            result = int.from_bytes(bytes(pool[srcs[2] >> 4 * i & 7] for i in range(4)), "little")
        elif op == "mul.rn.bf16x2":
            products = [a * b for a, b in zip(_bf16_halves(srcs[0]), _bf16_halves(srcs[1]))]
            result = _bf16_bits(products[0]) | _bf16_bits(products[1]) << 16
        else:
            raise NotImplementedError(op)
        regs[dst] = result
    return [regs[f"${n}"] for n in range(outputs)]


def _values(word):
    """The 8 code values of a packed word, channel 2i the low nibble of byte i."""
    return [float(e2m1.VALUES[word >> 4 * n & 0xF]) for n in range(8)]


@pytest.mark.parametrize("seed", range(4))
def test_word_half_pairs_pair_channel_n_with_n_plus_4(seed):
    rng = np.random.default_rng(seed)
    for word in [int(w) for w in rng.integers(0, 2**32, 16)] + [0xFFFFFFFF, 0x88888888, 0x0]:
        pairs = _run(e2m1.PTX_WORD_HALF_PAIRS, [word, SCALE_PAIR], 4)
        channels = _values(word)
        for n, pair in enumerate(pairs):
            assert [float(x) for x in _bf16_halves(pair)] == [channels[n], channels[n + 4]]


@pytest.mark.parametrize("seed", range(4))
def test_row_pair_columns_pair_the_rows_of_each_column(seed):
    rng = np.random.default_rng(seed)
    for a, b in rng.integers(0, 2**32, (16, 2)).tolist() + [[0xFFFFFFFF, 0x77777777]]:
        pairs = _run(e2m1.PTX_ROW_PAIR_COLUMNS, [a, b, SCALE_PAIR], 8)
        for n, pair in enumerate(pairs):
            assert [float(x) for x in _bf16_halves(pair)] == [_values(a)[n], _values(b)[n]]


def _f16_halves(word):
    return list(np.array([word & 0xFFFF, word >> 16], np.uint16).view(np.float16))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_word_decodes_into_two_exact_f16_pairs(fmt):
    codec = get_codec(fmt)
    rng = np.random.default_rng(0)
    every_code = [int.from_bytes(bytes([b, b + 1, b + 2, b + 3]), "little") for b in range(0, 256, 4)]
    for word in every_code + [int(w) for w in rng.integers(0, 2**32, 16)]:
        pairs = _run(codec.word_f16_pairs_ptx, [word], 2)
        codes = np.frombuffer(word.to_bytes(4, "little"), np.uint8).view(codec.data_dtype).astype(np.float32)
        decoded = np.array([*_f16_halves(pairs[0]), *_f16_halves(pairs[1])], np.float32)
        np.testing.assert_array_equal(decoded, codes)  # NaN codes decode to NaN


@pytest.mark.parametrize("layout, element_bytes", [(Float8Operands, 1), (Float16Operands, 2)])
def test_position_pairs_interleave_two_words_in_channel_order(layout, element_bytes):
    """value_pairs' permutes of position a's word and position b's word hold, in
    order, channel 0 at a, channel 0 at b, channel 1 at a, ... (FP8 then decodes each
    half, two codes, into one f16 pair; a 16-bit half is one value)."""
    rng = np.random.default_rng(1)
    a, b = (int(w) for w in rng.integers(0, 2**32, 2))
    bits = 8 * element_bytes
    elements = lambda word: [word >> (bits * i) & ((1 << bits) - 1) for i in range(32 // bits)]
    permuted = [_run(f"prmt.b32 $0, $1, $2, {selector:#06x};", [a, b], 1)[0] for selector in layout.POSITION_PAIR_SELECTORS]
    interleaved = [x for pair in zip(elements(a), elements(b)) for x in pair]
    assert [x for word in permuted for x in elements(word)] == interleaved
