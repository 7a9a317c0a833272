"""Cache formats behind one API: `quantize`, `dequantize` and the codec registry.

Each format is one module in this package that registers its codec; the modules are
found and imported here, so adding a format touches only its own file.
"""

from __future__ import annotations

import importlib
import pkgutil

import jax
import jax.numpy as jnp

from fp4kv_jax.formats.base import Codec, QuantizedTensor
from fp4kv_jax.formats.registry import format_names, get_codec, register

_NOT_CODECS = {"base", "registry", "e2m1"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_CODECS:
        importlib.import_module(f"{__name__}.{_module.name}")


def quantize(
    x: jax.Array, fmt: str, *, global_scale: jax.Array | float | None = None
) -> QuantizedTensor:
    """Stores `x` [..., D] in format `fmt`, blocks running along the last axis.

    Args:
      x: floating-point values; they are converted to float32 first.
      fmt: a name from `format_names()`.
      global_scale: float32 scalar for formats with a tensor-wide scale (fp8, nvfp4);
        None picks the format's default (1.0 for fp8, amax / (6 * 448) for nvfp4).
    """
    codec = get_codec(fmt)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}.")
    if x.ndim == 0:
        raise ValueError("x: expected at least one axis (the blocked last axis).")
    codec.check_last_dim(x.shape[-1])
    x = x.astype(jnp.float32)
    if codec.has_global_scale:
        if global_scale is None:
            global_scale = codec.global_scale_for(x)
        global_scale = jnp.asarray(global_scale, jnp.float32)
        if global_scale.shape != ():
            raise ValueError(f"global_scale: expected a scalar, got shape {global_scale.shape}.")
    elif global_scale is not None:
        raise ValueError(f"global_scale: format {fmt!r} has no global scale; pass None.")
    data, scales = codec.encode(x, global_scale)
    return QuantizedTensor(data=data, scales=scales, global_scale=global_scale, fmt=fmt)


def dequantize(q: QuantizedTensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The logical values of `q`, [..., D], in `dtype`."""
    return q.codec.decode(q.data, q.scales, q.global_scale).astype(dtype)


__all__ = [
    "Codec",
    "QuantizedTensor",
    "dequantize",
    "format_names",
    "get_codec",
    "quantize",
    "register",
]
