"""An independent numpy (+ ml_dtypes) restatement of the cache formats of SPEC section 1.

Written from SPEC.md and the semantics below, not from the library code; the tests hold
the library to these functions byte for byte. Every encoder takes float32 values
[..., D] and returns what the library stores; every decoder returns float32 [..., D].

E2M1 codes: bit 3 is the sign, bits 0-2 index the magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6).
Two codes share a byte along the last axis, the even element in the low nibble:
byte = (code[2i+1] << 4) | code[2i].

fp4_e2m1 (SGLang's `fp4_e2m1` / `FP4MXBlock16KVQuantizeUtil`), blocks of 16:
  v = max(absmax / 6, 1e-10) computed in float32;
  e = ceil(log2(v)) with log2 the *correctly rounded float32* log2, restated as
      np.ceil(np.float32(np.log2(v as float64)));
  scale byte = e + 127 (an all-zero block stores 94 = 2**-33);
  y = x * 2**-e in float32; magnitude index = number of thresholds
      (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0) with |y| >= t (ties away from zero);
  sign bit where y < 0 (so -0.0 gets no sign bit);
  decode: value(code) * 2**(byte - 127).
  A block holding NaN or +-inf stores scale byte 255 and codes 0, and decodes to NaN.
  absmax is taken over the finite elements only.

mxfp4 (OCP MX v1.0), blocks of 32:
  e = floor(log2(absmax)) - 2 (2 is E2M1's emax), read from the float32 exponent; an
  all-zero block has e = -127; e is clamped to [-127, 127]; scale byte = e + 127.
  y = x * 2**-e (exact), rounded to the nearest E2M1 value, ties to the even code
  (code LSB 0), saturating at +-6 (done here by ml_dtypes' float4_e2m1fn cast, whose
  bit pattern is the E2M1 code); sign bit where y < 0.
  decode: value(code) * 2**(byte - 127); byte 255 (E8M0 NaN, used for NaN/inf blocks,
  whose codes are 0) decodes to NaN.

nvfp4 (NVIDIA), blocks of 16, float32 global scale g:
  default g = amax / (6 * 448) over the finite values, 1.0 when amax == 0;
  block_scale = float8_e4m3fn(min(absmax / 6 / g, 448)) (float32 arithmetic, RNE cast);
  q = RNE-E2M1(x / (float32(block_scale) * g)) with the division in float32, saturating
  at +-6, and y := 0 where the denominator is 0; sign bit where y < 0.
  A NaN/inf block stores a NaN block scale and codes 0; it decodes to NaN.
  decode: value(code) * float32(block_scale) * g (here: the exact product rounded once
  to float32; the library may round twice, so compare within one ulp unless g is a
  power of two).

fp8_e4m3 / fp8_e5m2: data = float8(clip(x / g, -max, max)) with max the format's largest
  finite value; non-finite x is stored as NaN (a finite x whose x / g overflows
  saturates); default g = 1.0; decode data * g.

bf16 / fp16 / float32: a cast; fp16 (and bf16) saturate finite values at their largest
  finite value instead of overflowing to inf.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Value of each of the 16 codes; code 8 is -0.0.
E2M1_CODE_VALUES = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])
SGLANG_THRESHOLDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)

FP4_E2M1_BLOCK = 16
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
NONFINITE_SCALE_BYTE = 255
E4M3_MAX = 448.0

FP8_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


# ----------------------------------------------------------------------------- packing


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., D] (each < 16) -> bytes [..., D // 2], even element low."""
    codes = np.asarray(codes, np.uint8)
    assert codes.shape[-1] % 2 == 0 and (codes < 16).all()
    low = codes[..., 0::2]
    high = codes[..., 1::2]
    return (low + 16 * high).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """bytes [..., D // 2] -> uint8 codes [..., D]."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed % 16
    out[..., 1::2] = packed // 16
    return out


def code_value(codes: np.ndarray) -> np.ndarray:
    """E2M1 code -> float64 value."""
    return E2M1_CODE_VALUES[np.asarray(codes, np.int64)]


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    assert x.shape[-1] % block == 0
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _finite_absmax(blocks: np.ndarray) -> np.ndarray:
    """Largest finite |x| per block (0 if none), float32."""
    return np.where(np.isfinite(blocks), np.abs(blocks), np.float32(0)).max(axis=-1)


def _nonfinite_block(blocks: np.ndarray) -> np.ndarray:
    return ~np.isfinite(blocks).all(axis=-1)


def _sign_bit(y: np.ndarray) -> np.ndarray:
    return np.where(y < 0, np.uint8(8), np.uint8(0))


def _e2m1_rne_magnitude_code(y: np.ndarray) -> np.ndarray:
    """|y| rounded to nearest E2M1 magnitude, ties to even code, saturating at 6 -> 0..7.

    ml_dtypes' float4_e2m1fn cast rounds to nearest-even and saturates; its 4-bit
    pattern is the E2M1 code, so the low 3 bits are the magnitude index.
    """
    a = np.abs(np.asarray(y, np.float32))
    assert not np.isnan(a).any()
    a = np.minimum(a, np.float32(6.0))  # saturation (ml_dtypes would saturate too)
    return (a.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x7).astype(np.uint8)


def _pow2_f32(e: np.ndarray) -> np.ndarray:
    """2.0**e as float32, exactly, for integer e with a normal float32 result."""
    e = np.asarray(e, np.int64)
    assert ((e >= -126) & (e <= 127)).all(), e
    return np.ldexp(np.float32(1.0), e.astype(np.int32)).astype(np.float32)


# ----------------------------------------------------------------------------- fp4_e2m1


def fp4_e2m1_exponent(absmax: np.ndarray) -> np.ndarray:
    """SGLang's e = ceil(log2(max(absmax / 6, 1e-10))), float32 log2 correctly rounded."""
    absmax = np.asarray(absmax, np.float32)
    v = np.maximum(absmax / np.float32(6), np.float32(1e-10))
    assert v.dtype == np.float32
    return np.ceil(np.float32(np.log2(v.astype(np.float64)))).astype(np.int64)


def fp4_e2m1_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., D] -> (packed uint8 [..., D/2], scale bytes uint8 [..., D/16])."""
    x = np.asarray(x, np.float32)
    b = _blocks(x, FP4_E2M1_BLOCK)
    bad = _nonfinite_block(b)
    e = fp4_e2m1_exponent(_finite_absmax(b))
    with np.errstate(invalid="ignore", over="ignore"):
        y = b * _pow2_f32(-e)[..., None]  # float32, exact (x / 2**e)
    with np.errstate(invalid="ignore"):
        mag = np.searchsorted(SGLANG_THRESHOLDS, np.abs(y), side="right").astype(np.uint8)
    codes = mag | _sign_bit(y)
    codes = np.where(bad[..., None], np.uint8(0), codes)
    scales = np.where(bad, NONFINITE_SCALE_BYTE, e + 127).astype(np.uint8)
    return pack_nibbles(codes.reshape(x.shape)), scales


def fp4_e2m1_decode(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return _pow2_scaled_decode(packed, scales, FP4_E2M1_BLOCK)


def _pow2_scaled_decode(packed, scales, block) -> np.ndarray:
    values = _blocks(code_value(unpack_nibbles(packed)), block)
    scales = np.asarray(scales, np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = values * np.ldexp(1.0, scales - 127)[..., None]
        out = np.where((scales == NONFINITE_SCALE_BYTE)[..., None], np.nan, out)
        out = out.astype(np.float32)
    return out.reshape(*out.shape[:-2], -1)


# ----------------------------------------------------------------------------- mxfp4


def mxfp4_exponent(absmax: np.ndarray) -> np.ndarray:
    """floor(log2(absmax)) - 2, clamped to [-127, 127]; -127 for an all-zero block."""
    absmax = np.asarray(absmax, np.float32)
    _, exp = np.frexp(absmax)  # absmax = m * 2**exp, m in [0.5, 1)
    floor_log2 = np.where(absmax > 0, exp.astype(np.int64) - 1, -127)
    return np.clip(floor_log2 - 2, -127, 127)


def mxfp4_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., D] -> (packed uint8 [..., D/2], E8M0 bytes uint8 [..., D/32])."""
    x = np.asarray(x, np.float32)
    b = _blocks(x, MXFP4_BLOCK)
    bad = _nonfinite_block(b)
    e = mxfp4_exponent(_finite_absmax(b))
    y = b.astype(np.float64) * np.ldexp(1.0, -e)[..., None]  # exact
    y = np.where(np.isfinite(y), y, 0.0).astype(np.float32)  # exact (|y| < 8)
    codes = _e2m1_rne_magnitude_code(y) | _sign_bit(y)
    codes = np.where(bad[..., None], np.uint8(0), codes)
    scales = np.where(bad, NONFINITE_SCALE_BYTE, e + 127).astype(np.uint8)
    return pack_nibbles(codes.reshape(x.shape)), scales


def mxfp4_decode(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return _pow2_scaled_decode(packed, scales, MXFP4_BLOCK)


# ----------------------------------------------------------------------------- nvfp4


def nvfp4_default_global_scale(x: np.ndarray) -> np.float32:
    x = np.asarray(x, np.float32)
    finite = np.abs(x[np.isfinite(x)])
    amax = finite.max() if finite.size else np.float32(0)
    if amax == 0:
        return np.float32(1.0)
    return np.float32(np.float32(amax) / np.float32(6 * 448))


def nvfp4_encode(
    x: np.ndarray, global_scale=None
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """float32 [..., D] -> (packed uint8 [..., D/2], e4m3 scales [..., D/16], g)."""
    x = np.asarray(x, np.float32)
    g = nvfp4_default_global_scale(x) if global_scale is None else np.float32(global_scale)
    b = _blocks(x, NVFP4_BLOCK)
    bad = _nonfinite_block(b)
    absmax = _finite_absmax(b)
    with np.errstate(under="ignore"):
        wanted = np.minimum(absmax / np.float32(6) / g, np.float32(E4M3_MAX))
    wanted = np.where(bad, np.float32(np.nan), wanted).astype(np.float32)
    block_scale = wanted.astype(ml_dtypes.float8_e4m3fn)
    denom = (block_scale.astype(np.float32) * g).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        y = np.where(denom[..., None] > 0, b / denom[..., None], np.float32(0))
    y = np.where(bad[..., None], np.float32(0), y).astype(np.float32)
    codes = _e2m1_rne_magnitude_code(y) | _sign_bit(y)
    codes = np.where(bad[..., None], np.uint8(0), codes)
    return pack_nibbles(codes.reshape(x.shape)), block_scale, g


def nvfp4_decode(packed: np.ndarray, scales: np.ndarray, global_scale) -> np.ndarray:
    """value * block_scale * g, the exact product rounded once to float32."""
    values = _blocks(code_value(unpack_nibbles(packed)), NVFP4_BLOCK)
    s = np.asarray(scales).astype(np.float64) * np.float64(np.float32(global_scale))
    with np.errstate(invalid="ignore", over="ignore"):
        out = (values * s[..., None]).astype(np.float32)
    return out.reshape(*out.shape[:-2], -1)


# ----------------------------------------------------------------------------- fp8


def fp8_encode(x: np.ndarray, fmt: str, global_scale=None) -> np.ndarray:
    dtype = FP8_DTYPES[fmt]
    x = np.asarray(x, np.float32)
    g = np.float32(1.0 if global_scale is None else global_scale)
    largest = np.float32(ml_dtypes.finfo(dtype).max)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y = (x / g).astype(np.float32)
    y = np.where(np.isfinite(x), np.clip(y, -largest, largest), np.float32(np.nan))
    return y.astype(dtype)


def fp8_decode(data: np.ndarray, global_scale=1.0) -> np.ndarray:
    return (np.asarray(data).astype(np.float32) * np.float32(global_scale)).astype(np.float32)


# ----------------------------------------------------------------------------- casts

CAST_DTYPES = {"float32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}


def cast_encode(x: np.ndarray, fmt: str) -> np.ndarray:
    dtype = CAST_DTYPES[fmt]
    x = np.asarray(x, np.float32)
    largest = np.float32(ml_dtypes.finfo(dtype).max)
    y = np.where(np.isfinite(x), np.clip(x, -largest, largest), x)
    return y.astype(dtype)


# ----------------------------------------------------------------------------- dispatch

FP4_FORMATS = ("fp4_e2m1", "mxfp4", "nvfp4")
FP4_BLOCK = {"fp4_e2m1": FP4_E2M1_BLOCK, "mxfp4": MXFP4_BLOCK, "nvfp4": NVFP4_BLOCK}


def fp4_encode(x, fmt, global_scale=None):
    """(packed, scales) for any FP4 format (nvfp4's global scale dropped)."""
    if fmt == "fp4_e2m1":
        assert global_scale is None
        return fp4_e2m1_encode(x)
    if fmt == "mxfp4":
        assert global_scale is None
        return mxfp4_encode(x)
    if fmt == "nvfp4":
        packed, scales, _ = nvfp4_encode(x, global_scale)
        return packed, scales
    raise ValueError(fmt)
