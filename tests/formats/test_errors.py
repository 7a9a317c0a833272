"""Refusals: unknown format names, head_dims that do not fit the block, stray global scales.

* An unknown format raises ValueError naming the argument (`fmt`) and listing every
  valid format.
* A last axis (head_dim) that is not a multiple of the format's block size (16 for
  fp4_e2m1 and nvfp4, 32 for mxfp4) raises ValueError that names the multiple.
* A global_scale for a format without one (fp4_e2m1, mxfp4, float32, bf16, fp16) raises
  ValueError naming `global_scale`.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import fp4kv_jax

ALL_FORMATS = ("fp4_e2m1", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4", "float32", "bf16", "fp16")
NO_GLOBAL_SCALE = ("fp4_e2m1", "mxfp4", "float32", "bf16", "fp16")


def _x(d=64, rows=2):
    return np.linspace(-3, 3, rows * d, dtype=np.float32).reshape(rows, d)


@pytest.mark.parametrize("bad", ["fp4", "FP4_E2M1", "nvfp4 ", "int8", "", "e2m1"])
def test_unknown_format_raises_value_error_listing_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        fp4kv_jax.quantize(_x(), bad)
    message = str(info.value)
    assert re.search(r"\bfmt\b", message), message
    assert repr(bad) in message or bad in message
    for name in ALL_FORMATS:
        assert name in message, (name, message)


def test_get_codec_unknown_name_raises_value_error():
    with pytest.raises(ValueError, match=r"\bfmt\b") as info:
        fp4kv_jax.get_codec("fp3")
    for name in ALL_FORMATS:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [None, 4, ("fp4_e2m1",)])
def test_non_string_format_raises_value_error(bad):
    with pytest.raises(ValueError, match=r"\bfmt\b"):
        fp4kv_jax.quantize(_x(), bad)


@pytest.mark.parametrize(
    "fmt,d,multiple",
    [("fp4_e2m1", 24, 16), ("fp4_e2m1", 8, 16), ("fp4_e2m1", 65, 16), ("nvfp4", 40, 16),
     ("nvfp4", 17, 16), ("mxfp4", 48, 32), ("mxfp4", 16, 32), ("mxfp4", 80, 32)],
)
def test_head_dim_not_a_multiple_of_the_block_raises(fmt, d, multiple):
    with pytest.raises(ValueError, match=rf"multiple of {multiple}\b"):
        fp4kv_jax.quantize(_x(d), fmt)
    with pytest.raises(ValueError, match=rf"multiple of {multiple}\b"):
        fp4kv_jax.get_codec(fmt).bytes_per_vector(d)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "float32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [1, 7, 24])
def test_per_element_formats_accept_any_head_dim(fmt, d):
    q = fp4kv_jax.quantize(_x(d), fmt)
    assert q.shape == (2, d)
    assert fp4kv_jax.get_codec(fmt).bytes_per_vector(d) > 0


@pytest.mark.parametrize("fmt", NO_GLOBAL_SCALE)
@pytest.mark.parametrize("g", [1.0, np.float32(0.5), jnp.float32(2.0)])
def test_global_scale_for_a_format_without_one_raises(fmt, g):
    with pytest.raises(ValueError, match="global_scale"):
        fp4kv_jax.quantize(_x(), fmt, global_scale=g)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "nvfp4"])
def test_global_scale_is_accepted_where_the_format_has_one(fmt):
    q = fp4kv_jax.quantize(_x(), fmt, global_scale=0.25)
    assert float(q.global_scale) == 0.25


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
def test_non_scalar_global_scale_raises(fmt):
    with pytest.raises(ValueError, match="global_scale"):
        fp4kv_jax.quantize(_x(), fmt, global_scale=np.ones(2, np.float32))


def test_non_float_input_and_scalar_input_are_refused():
    with pytest.raises(TypeError, match="floating"):
        fp4kv_jax.quantize(np.arange(64, dtype=np.int32), "fp4_e2m1")
    with pytest.raises(ValueError):
        fp4kv_jax.quantize(np.float32(1.0), "bf16")
