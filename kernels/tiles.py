"""What the attention kernels share about stored operands: the dtype fed to the tensor
cores, the factor folded out of decoded planes, the split of queries into planes, and
row-block loads from a cache buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.rotation import hadamard_rotate

MASKED = -1e30  # the score of a masked position: finite, so a fully masked block cannot make inf - inf


def compute_dtype(fmt: str) -> jnp.dtype:
    """The dot operands' dtype for a cache format.

    float32 and fp16 caches keep theirs; float8 data becomes fp16 (one hardware convert
    per two values; every e4m3 and e5m2 value is exact in fp16), with the global scale
    folded into the queries, which must then stay within fp16's range; E2M1 planes are
    bf16.
    """
    data_dtype = jnp.dtype(get_codec(fmt).data_dtype)
    if data_dtype in (jnp.float32, jnp.float16):
        return data_dtype
    if jnp.issubdtype(data_dtype, jnp.floating) and data_dtype.itemsize == 1:
        return jnp.dtype(jnp.float16)
    return jnp.dtype(jnp.bfloat16)


def plane_factor(x: QuantizedTensor) -> jax.Array:
    """float32 []: what a decoded plane must be multiplied by to give the stored values.

    Planes leave out the global scale and carry 2**plane_exponent; kernels fold this
    factor into their queries (for K) or outputs (for V) instead of touching every
    element.
    """
    factor = jnp.float32(2.0**-x.codec.plane_exponent)
    return factor if x.global_scale is None else factor * x.global_scale


def split_planes(x: jax.Array, num_planes: int) -> jax.Array:
    """[..., R, D] -> [..., P, R, D / P], plane p holding columns p, p + P, ...

    The layout of a packed format's decoded planes; kernels split their queries the
    same way and sum the per-plane dot products.
    """
    *lead, rows, dim = x.shape
    planes = x.reshape(*lead, rows, dim // num_planes, num_planes)
    return jnp.moveaxis(planes, -1, -3)


def merge_planes(x: jax.Array) -> jax.Array:
    """The inverse of `split_planes`: [..., P, R, D / P] -> [..., R, D]."""
    *lead, num_planes, rows, width = x.shape
    return jnp.moveaxis(x, -3, -1).reshape(*lead, rows, width * num_planes)


def overflows_int32_offsets(x: QuantizedTensor) -> bool:
    """Whether Pallas's Triton lowering would address one of x's buffers wrongly.

    It indexes arrays of at most 4 GiB with int32 element offsets, which overflow for
    1-byte buffers of more than 2**31 elements: packed FP4 or fp8 data between 2 and
    4 GiB (fp8 at B=64, Hkv=8, D=128 and 65536 slots is exactly 4 GiB).
    """
    buffers = (x.data,) if x.scales is None else (x.data, x.scales)
    return any(b.size > 2**31 and b.size * b.dtype.itemsize <= 2**32 for b in buffers)


# head_dim the compiled kernels are checked at on the GPU (tests/kernels -m gpu). A
# 16-wide FP4 layer (8-column planes, below the tensor cores' K of 16) gave wrong
# attention there (docs/benchmarks.md), so compiled kernels take only these.
GPU_HEAD_DIM_MULTIPLE = 64


def on_gpu() -> bool:
    """Whether computations run on a GPU: the device `jax.default_device` names, else
    JAX's default backend (so `fp4kv ablate --device cpu` works on a GPU machine)."""
    device = jax.config.jax_default_device
    platform = jax.default_backend() if device is None else getattr(device, "platform", device)
    return platform == "gpu"


def default_implementation(*tensors: QuantizedTensor) -> str:
    """"pallas_triton" on GPU when Pallas can address every tensor, they share one
    format and their head_dim is a multiple of GPU_HEAD_DIM_MULTIPLE, else "reference"."""
    on_gpu_now = on_gpu()
    addressable = not any(overflows_int32_offsets(x) for x in tensors)
    one_format = len({x.fmt for x in tensors}) == 1
    checked = all(x.shape[-1] % GPU_HEAD_DIM_MULTIPLE == 0 for x in tensors)
    return "pallas_triton" if on_gpu_now and addressable and one_format and checked else "reference"


def default_attention_implementation(layer) -> str:
    """The attention ops' default for a stored layer: `default_implementation` of its K
    and V, except the reference for keys with per-channel scales, which only it reads."""
    return "reference" if layer.keys_per_channel else default_implementation(layer.k, layer.v)


def check_one_format(k: QuantizedTensor, v: QuantizedTensor, *, arg: str) -> None:
    """The Pallas attention kernels decode K and V with one codec: refuse a layer whose
    keys and values are stored in different formats, naming `arg`."""
    if k.fmt != v.fmt:
        raise ValueError(
            f"{arg}: keys stored as {k.fmt!r} and values as {v.fmt!r}; the Pallas kernels "
            "need one format for both, use implementation='reference'."
        )


def interpret_mode(*tensors: QuantizedTensor, arg: str) -> bool:
    """Whether a Pallas call over `tensors` runs in interpret mode: everywhere but on a GPU.

    On a GPU it refuses, naming `arg`, a tensor that `overflows_int32_offsets` or whose
    head_dim is not a multiple of GPU_HEAD_DIM_MULTIPLE.
    """
    if not on_gpu():
        return True
    for x in tensors:
        if x.shape[-1] % GPU_HEAD_DIM_MULTIPLE:
            raise ValueError(
                f"{arg}: head_dim {x.shape[-1]}; the compiled Pallas kernels take multiples of "
                f"{GPU_HEAD_DIM_MULTIPLE} on the GPU; use implementation='reference'."
            )
        if overflows_int32_offsets(x):
            raise ValueError(
                f"{arg}: a buffer of {x.data.shape} {x.data.dtype} is one that Pallas's Triton "
                "lowering addresses with overflowing int32 offsets; use implementation='reference'."
            )
    return False


def load_rows(ref, block: jax.Array, block_rows: int, num_rows: int, columns=slice(None)) -> jax.Array:
    """Rows [block * block_rows, + block_rows) of a [num_rows, C] ref, zeros past the end.

    Inside a Pallas (Triton) kernel; `columns` (a slice or `pl.ds`) picks some columns
    in the same indexer, since Triton lowers only one indexer per masked load. The
    mask is emitted only when num_rows is not a multiple of block_rows.
    """
    view = ref.at[pl.ds(block * block_rows, block_rows), columns]
    if num_rows % block_rows == 0:
        return view[...]
    rows = block * block_rows + jnp.arange(block_rows)
    return plgpu.load(view, mask=(rows < num_rows)[:, None], other=jnp.zeros((), view.dtype))


def kept_positions(layer, full_k, full_v):
    """The reference's `kept` argument for a layer: (full_k, full_v, keep_first,
    keep_recent) if the layer keeps positions in full precision, else None; refuses
    full_k, full_v given to a layer that keeps none, or missing for one that does."""
    if (full_k is None) != (full_v is None):
        raise ValueError("full_k, full_v: pass both or neither.")
    if not layer.keeps_positions:
        if full_k is not None:
            raise ValueError("full_k, full_v: the layer keeps no positions in full precision.")
        return None
    if full_k is None:
        raise ValueError(
            "full_k, full_v: required for a layer keeping positions in full precision "
            "(keep_first, keep_recent); see fp4kv_jax.cache.kept_values."
        )
    expected = tuple(layer.k.shape)
    for name, x in (("full_k", full_k), ("full_v", full_v)):
        if x.shape != expected:
            raise ValueError(f"{name}: expected shape {expected}, got {x.shape}.")
    return full_k, full_v, layer.keep_first, layer.keep_recent


def refuse_sinks_over_centered_layer(layer, sinks) -> None:
    """Centered keys (`LayerCache.key_mean`) move a query's scores by q . mean, which
    sink logits do not follow, and centered values need weights that sum to 1: refuse
    either with sinks."""
    if sinks is not None and (layer.key_mean is not None or layer.value_mean is not None):
        raise ValueError(
            "sinks: the layer stores centered keys or values (center_keys, center_values), "
            "which attention undoes exactly only without sinks; build the cache without them "
            "for a model with attention sinks."
        )


def output_from_stored_values(out: jax.Array, layer) -> jax.Array:
    """Attention output [B, Hq, D] or [B, T, Hq, D] over the layer's stored values,
    in the values' own frame: rotated back (rotated values: weights . (V H), times H,
    is weights . V), plus each query head's mean value (centered values: weights .
    (V - mean) + mean, as the weights sum to 1)."""
    if layer.values_rotated:
        out = hadamard_rotate(out)
    if layer.value_mean is None:
        return out
    mean = jnp.repeat(layer.value_mean, out.shape[-2] // layer.value_mean.shape[1], axis=1)
    return out.astype(jnp.float32) + (mean[:, None] if out.ndim == 4 else mean)


def refuse_per_channel_keys(layer, implementation: str) -> None:
    """The Pallas kernels read block scales along head_dim: refuse a layer whose keys
    have per-channel scales over blocks of positions, naming the implementation."""
    if layer.keys_per_channel:
        raise ValueError(
            f"implementation: {implementation!r} does not read per-channel key scales "
            "(per_channel_keys); use 'reference'."
        )
