"""The E2M1 register decodes of the warp decode kernel (e2m1.PTX_WORD_HALF_PAIRS and
PTX_ROW_PAIR_COLUMNS), run on CPU by a small emulator of the PTX instructions they
use, against the code table."""

import re

import numpy as np
import pytest

from fp4kv_jax.formats import e2m1

SCALE_PAIR = 0x7E807E80  # bf16 2**126 twice: undoes the codes' 2**-126


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
        op, args = match[1], [a.strip() for a in match[2].split(",")]
        dst, srcs = args[0], [value(a) for a in args[1:]]
        if op in ("mov.b32",):
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
