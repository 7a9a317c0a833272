"""Shared helpers for the format tests: jitted library calls and hypothesis strategies.

Subnormals: XLA on CPU flushes float32 subnormals to zero (inputs and results), while
numpy keeps them. The strategies therefore keep every nonzero |x| in about
[2**-95, 2**64] (inside [1e-30, 1e30]) or exactly +-0, and keep the dynamic range inside
one scale block to at most 2**35, so that no intermediate (x / 2**e, x / scale) is
subnormal. Outside those limits a flushed, negative tiny `y` would lose its sign bit
(-0.0 is not < 0) and the bytes would differ for a reason that is the platform's, not
the recipe's.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import numpy as np
from hypothesis.extra.numpy import arrays

import fp4kv_jax

D = 64

# ----------------------------------------------------------------------------- library


@functools.cache
def jit_quantize(fmt: str, with_global_scale: bool = False):
    """Jitted `quantize` for one format (shape-stable, so compiled once per shape)."""
    if with_global_scale:
        return jax.jit(lambda x, g: fp4kv_jax.quantize(x, fmt, global_scale=g))
    return jax.jit(lambda x: fp4kv_jax.quantize(x, fmt))


_jit_dequantize = jax.jit(fp4kv_jax.dequantize)


def jit_dequantize(q):
    return _jit_dequantize(q)


def roundtrip(x: np.ndarray, fmt: str, global_scale=None):
    """(QuantizedTensor, dequantized numpy float32) through the jitted library."""
    if global_scale is None:
        q = jit_quantize(fmt)(x)
    else:
        q = jit_quantize(fmt, True)(x, np.float32(global_scale))
    return q, np.asarray(jit_dequantize(q))


def as_bytes(a) -> np.ndarray:
    """Any 1-byte array (uint8, float8) as its uint8 bit patterns."""
    a = np.asarray(a)
    assert a.dtype.itemsize == 1, a.dtype
    return a.view(np.uint8)


# ----------------------------------------------------------------------------- strategies

# Mantissas that put x / 2**e exactly on E2M1 values and on rounding thresholds
# (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 times powers of two), or right next to them.
SPECIAL_MANTISSAS = (
    0,
    1,
    (1 << 23) - 1,
    1 << 21,  # 1.25
    (1 << 21) - 1,
    (1 << 21) + 1,
    1 << 22,  # 1.5
    (1 << 22) - 1,
    (1 << 22) + 1,
    3 << 21,  # 1.75
    (3 << 21) - 1,
    (3 << 21) + 1,
)
MANTISSAS = st.one_of(st.sampled_from(SPECIAL_MANTISSAS), st.integers(0, (1 << 23) - 1))


@st.composite
def bit_built_blocks(draw, block: int, d: int = D, max_rows: int = 3, base_range: int = 60):
    """float32 [rows, d] built from sign, exponent and mantissa fields.

    Each block has a base binary exponent in [-base_range, base_range]; its elements
    have exponents base - 32 .. base + 2 (mostly within 4 of the top), so intra-block
    dynamic range stays below 2**35. Some elements, and some whole blocks, are +-0.
    """
    rows = draw(st.integers(1, max_rows))
    nb = d // block
    base = draw(arrays(np.int64, (rows, nb), elements=st.integers(-base_range, base_range)))
    offset = draw(
        arrays(np.int64, (rows, d), elements=st.one_of(st.integers(-3, 2), st.integers(-32, 2)))
    )
    mant = draw(arrays(np.int64, (rows, d), elements=MANTISSAS))
    neg = draw(arrays(np.bool_, (rows, d)))
    zero = draw(arrays(np.bool_, (rows, d)))
    zero_block = draw(arrays(np.bool_, (rows, nb)))
    biased = np.repeat(base, block, axis=-1) + offset + 127
    bits = (
        (neg.astype(np.uint32) << 31)
        | (biased.astype(np.uint32) << 23)
        | mant.astype(np.uint32)
    )
    x = bits.view(np.float32)
    signed_zero = np.where(neg, np.float32(-0.0), np.float32(0.0))
    x = np.where(zero | np.repeat(zero_block, block, axis=-1), signed_zero, x)
    return x.astype(np.float32)


@st.composite
def seeded_normal_blocks(draw, block: int, d: int = D, max_rows: int = 3):
    """Gaussian rows with a per-row scale 2**[-60, 60] and per-block scale 2**[-12, 12].

    Gaussian samples are never so small next to their block's max that a scaled value
    becomes subnormal (that would need a ratio below ~2**-90).
    """
    rows = draw(st.integers(1, max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    row_exp = draw(st.integers(-60, 60))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d))
    block_exp = rng.integers(-12, 13, size=(rows, d // block))
    x = x * np.ldexp(1.0, row_exp + np.repeat(block_exp, block, axis=-1))
    return x.astype(np.float32)


def fp4_inputs(block: int, max_rows: int = 3):
    return st.one_of(
        bit_built_blocks(block, max_rows=max_rows), seeded_normal_blocks(block, max_rows=max_rows)
    )


# Global scales for nvfp4 and fp8: normal float32 in [2**-20, 2**20].
GLOBAL_SCALES = st.floats(
    min_value=2.0**-20, max_value=2.0**20, width=32, allow_nan=False, allow_infinity=False
)
POW2_GLOBAL_SCALES = st.integers(-20, 20).map(lambda j: np.float32(2.0**j))


@st.composite
def wide_float32(draw, d: int = D, max_rows: int = 3, max_abs: float = 1e30,
                 allow_nonfinite: bool = True):
    """Per-element float32 over a wide range: 0, |x| in [1e-30, max_abs], NaN, +-inf."""
    rows = draw(st.integers(1, max_rows))
    magnitude = st.floats(
        min_value=float(np.float32(1e-30)), max_value=float(np.float32(max_abs)), width=32
    )
    special = [0.0, -0.0] + ([np.nan, np.inf, -np.inf] if allow_nonfinite else [])
    element = st.one_of(magnitude, magnitude.map(lambda v: -v), st.sampled_from(special))
    return draw(arrays(np.float32, (rows, d), elements=element))
