"""Flash-decoding over a stored layer in Pallas (Triton lowering), dequantizing in registers.

Grid (batch, kv_head, split). Each program streams one split of one (sequence, KV
head)'s positions in blocks of `block_k` rows: packed bytes and block scales are loaded
straight from the cache, decoded by the codec's `decode_planes` (bit ops, no bf16 copy
of the cache ever reaches memory), and fed to the tensor cores for all the query heads
of the group at once. Packed formats come out as planes of even and odd columns; the
queries are split the same way and the per-plane dot products summed, so no register
interleave is needed. The splits' partial softmax states are merged afterwards in XLA,
where the attention sinks join the denominator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4kv_jax.cache import LayerCache
from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.decode_attention import kept_positions, splits

_MIN_QUERY_ROWS = 16  # the tensor cores' smallest M


def _kernel(
    lengths_ref,
    q_ref,
    *refs,
    codec,
    has_scales: bool,
    block_k: int,
    chunk: int,
    capacity: int,
    window: int | None,
    ring: bool,
    skip_first: int,
    skip_recent: int,
    compute_dtype,
    prefetch: bool,
    ptx: bool,
):
    if has_scales:
        k_data_ref, k_scales_ref, v_data_ref, v_scales_ref, o_ref, m_ref, l_ref = refs
    else:
        k_data_ref, v_data_ref, o_ref, m_ref, l_ref = refs
        k_scales_ref = v_scales_ref = None
    num_planes = q_ref.shape[0]
    rows = q_ref.shape[1]
    length = lengths_ref[...]
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    split_start = pl.program_id(2) * chunk
    lo = split_start
    hi = jnp.minimum(jnp.minimum(split_start + chunk, capacity), length)
    if window is not None and not ring:
        lo = jnp.maximum(lo, length - window)
    # A layer's full-precision positions (the first and the newest) are attended outside.
    lo = jnp.maximum(lo, skip_first)
    hi = jnp.minimum(hi, length - skip_recent)
    queries = [q_ref[p] for p in range(num_planes)]

    def load(ref, block):
        return None if ref is None else tiles.load_rows(ref, block, block_k, capacity)

    stored_refs = (k_data_ref, k_scales_ref, v_data_ref, v_scales_ref)
    last_block = pl.cdiv(capacity, block_k) - 1

    def load_block(block):
        return tuple(load(ref, jnp.minimum(block, last_block)) for ref in stored_refs)

    def body(block, carry):
        outs, peak, total, loaded = carry
        if prefetch:
            # Issue the next block's loads before this block's math, so their latency
            # hides behind it; the tiles wait in registers.
            next_tiles = load_block(block + 1)
        else:
            loaded = load_block(block)
        k_data, k_scales, v_data, v_scales = loaded
        slots = block * block_k + jnp.arange(block_k)
        keys = codec.decode_planes(k_data, k_scales, ptx=ptx)
        scores = sum(
            plgpu.dot(qp, kp.astype(compute_dtype), trans_b=True, precision=precision)
            for qp, kp in zip(queries, keys)
        )
        valid = (slots >= lo) & (slots < hi)
        if ring and window is not None:
            positions = length - 1 - (length - 1 - slots) % capacity
            valid &= positions >= length - window
        scores = jnp.where(valid[None, :], scores, tiles.MASKED)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=1))
        correction = jnp.exp(peak - new_peak)
        weights = jnp.where(valid[None, :], jnp.exp(scores - new_peak[:, None]), 0.0)
        total = correction * total + jnp.sum(weights, axis=1)
        values = codec.decode_planes(v_data, v_scales, ptx=ptx)
        outs = tuple(
            correction[:, None] * o
            + plgpu.dot(weights.astype(compute_dtype), vp.astype(compute_dtype), precision=precision)
            for o, vp in zip(outs, values)
        )
        return outs, new_peak, total, (next_tiles if prefetch else carry[3])

    plane_width = q_ref.shape[2]
    first = lo // block_k
    last = jnp.where(hi > lo, pl.cdiv(hi, block_k), first)
    init = (
        tuple(jnp.zeros((rows, plane_width), jnp.float32) for _ in range(num_planes)),
        jnp.full((rows,), tiles.MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        load_block(first) if prefetch else tuple(None for _ in stored_refs),
    )
    outs, peak, total, _ = lax.fori_loop(first, last, body, init)
    for p in range(num_planes):
        o_ref[p] = outs[p]
    m_ref[...] = peak
    l_ref[...] = total


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "window", "ring", "block_k", "num_splits", "num_warps", "num_stages",
        "prefetch", "interpret",
    ),
)
def decode_attention(
    q: jax.Array,
    k: QuantizedTensor,
    v: QuantizedTensor,
    lengths: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    ring: bool,
    sinks: jax.Array | None,
    block_k: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    prefetch: bool | None = None,
    interpret: bool = False,
    kept: LayerCache | None = None,
) -> jax.Array:
    """q [B, Hq, D]; k, v stored [B, Hkv, S, D]; lengths int32 [B] -> [B, Hq, D] in q's dtype.

    kept: the layer, when it keeps positions in full precision (`LayerCache.kept_k`):
      the kernel skips them and they join the merge as one more split
      (`kept_positions`).
    """
    codec = get_codec(k.fmt)
    batch, num_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    num_planes = codec.elements_per_datum
    rows = max(_MIN_QUERY_ROWS, pl.next_power_of_2(group))
    compute_dtype = tiles.compute_dtype(k.fmt)
    chunk, num_split_programs = splits.plan(batch, kv_heads, capacity, block_k, num_splits)
    if prefetch is None:
        # Measured on H100 (docs/benchmarks.md): prefetching pays for packed FP4 tiles,
        # whose decode is long enough to hide the next block's loads behind.
        prefetch = num_planes > 1

    # K's plane factor joins the queries, V's the output.
    qg = splits.grouped_queries(q, k, rows, sm_scale)
    q_planes = tiles.split_planes(qg, num_planes).astype(compute_dtype)  # [B, Hkv, P, rows, D/P]

    has_scales = k.scales is not None
    stored = [k.data, k.scales, v.data, v.scales] if has_scales else [k.data, v.data]

    def whole_rows(x):
        return pl.BlockSpec((None, None, capacity, x.shape[-1]), lambda b, h, s: (b, h, 0, 0))

    plane_width = head_dim // num_planes
    kernel = functools.partial(
        _kernel,
        codec=codec,
        has_scales=has_scales,
        block_k=block_k,
        chunk=chunk,
        capacity=capacity,
        window=window,
        ring=ring,
        **kept_positions.skipped(kept),
        compute_dtype=compute_dtype,
        prefetch=prefetch,
        ptx=not interpret,
    )
    out, peak, total = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_split_programs),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, num_planes, rows, plane_width), lambda b, h, s: (b, h, 0, 0, 0)),
            *[whole_rows(x) for x in stored],
        ],
        out_specs=[
            pl.BlockSpec(
                (None, None, None, num_planes, rows, plane_width),
                lambda b, h, s: (b, h, s, 0, 0, 0),
            ),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, num_planes, rows, plane_width), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_split_programs, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"decode_attention_{k.fmt}",
    )(lengths.astype(jnp.int32), q_planes, *stored)
    out, peak, total = kept_positions.with_kept_split(
        (out, peak, total), q, kept, lengths, sm_scale=sm_scale, rows=rows, num_planes=num_planes,
        value_factor=tiles.plane_factor(v),
    )
    return (splits.merge(out, peak, total, sinks, group) * tiles.plane_factor(v)).astype(q.dtype)
