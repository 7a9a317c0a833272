"""fp4kv-jax: FP4 (E2M1) and other quantized KV caches for JAX, with fused Pallas kernels."""

from fp4kv_jax.formats import QuantizedTensor, dequantize, format_names, get_codec, quantize
from fp4kv_jax.generate import GenerationResult, generate

__all__ = [
    "GenerationResult",
    "QuantizedTensor",
    "dequantize",
    "format_names",
    "generate",
    "get_codec",
    "quantize",
]
