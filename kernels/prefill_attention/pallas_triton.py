"""Flash attention of a prefill chunk over a stored layer in Pallas (Triton lowering),
dequantizing the cache in registers.

Grid (batch, kv_head, query block). A program takes `block_t` consecutive chunk
positions for every query head of one KV group, stacked as rows (position-major), so
each decoded key and value block serves the whole group. It streams the stored
positions the block can see, causally and within the window, in blocks of `block_k`:
packed bytes and scales are loaded straight from the cache and decoded by the codec's
`decode_planes` (no bf16 copy of the cache reaches memory). Queries are split into the
same planes as the decoded keys, as in decode attention.

With `chunk_k`/`chunk_v` given, the stored positions before the chunk come from the
cache and the chunk's own positions from those full-precision values, in a second
loop. For a layer keeping positions in full precision (KIVI's sinks and recent window:
`full_k`/`full_v`, `keep_first`, `keep_recent`), a query at position i reads positions
p < keep_first and p > i - keep_recent from the full-precision values by position
instead, in loops of their own, and the stored loop skips them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4kv_jax.formats import QuantizedTensor, get_codec
from fp4kv_jax.kernels import tiles

_MIN_ROWS = 16  # the tensor cores' smallest M


def _kernel(
    start_ref,
    q_ref,
    sinks_ref,
    *refs,
    codec,
    has_scales: bool,
    exact_chunk: bool,
    keep_first: int,
    keep_recent: int,
    chunk: int,
    block_t: int,
    block_k: int,
    group_rows: int,
    capacity: int,
    window: int | None,
    ring: bool,
    compute_dtype,
    ptx: bool,
):
    refs = list(refs)
    o_ref = refs.pop()
    keeps = keep_first + keep_recent > 0
    full_k_ref, full_v_ref = (refs.pop(-2), refs.pop()) if keeps else (None, None)
    chunk_k_ref, chunk_v_ref = (refs.pop(-2), refs.pop()) if exact_chunk else (None, None)
    if has_scales:
        k_data_ref, k_scales_ref, v_data_ref, v_scales_ref = refs
    else:
        (k_data_ref, v_data_ref), k_scales_ref, v_scales_ref = refs, None, None
    num_planes, rows, plane_width = q_ref.shape
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    start = start_ref[...]
    first = start + pl.program_id(2) * block_t  # this block's first query position
    row_positions = first + jnp.arange(rows) // group_rows
    last = jnp.minimum(first + block_t, start + chunk)  # one past its last real query
    lowest = 0 if window is None else jnp.maximum(first - window + 1, 0)
    queries = [q_ref[p] for p in range(num_planes)]

    def attend(carry, keys, values, key_positions, key_limit, read=None):
        """read: None, or which (key position, query position) pairs this loop serves."""
        outs, peak, total = carry
        scores = sum(
            plgpu.dot(qp, kp.astype(compute_dtype), trans_b=True, precision=precision)
            for qp, kp in zip(queries, keys)
        )
        visible = (
            (key_positions[None, :] >= 0)
            & (key_positions[None, :] <= row_positions[:, None])
            & (key_positions[None, :] < key_limit)
        )
        if window is not None:
            visible &= key_positions[None, :] > row_positions[:, None] - window
        if read is not None:
            visible &= read(key_positions[None, :], row_positions[:, None])
        scores = jnp.where(visible, scores, tiles.MASKED)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=1))
        correction = jnp.exp(peak - new_peak)
        weights = jnp.where(visible, jnp.exp(scores - new_peak[:, None]), 0.0)
        total = correction * total + jnp.sum(weights, axis=1)
        outs = tuple(
            correction[:, None] * o
            + plgpu.dot(weights.astype(compute_dtype), vp.astype(compute_dtype), precision=precision)
            for o, vp in zip(outs, values)
        )
        return outs, new_peak, total

    def load(ref, block):
        return None if ref is None else tiles.load_rows(ref, block, block_k, capacity)

    # Stored positions: the prefix only when the chunk comes in full precision.
    stored_end = start if exact_chunk else last
    read_stored = (lambda p, i: (p >= keep_first) & (p <= i - keep_recent)) if keeps else None

    def stored_block(block, carry):
        keys = codec.decode_planes(load(k_data_ref, block), load(k_scales_ref, block), ptx=ptx)
        values = codec.decode_planes(load(v_data_ref, block), load(v_scales_ref, block), ptx=ptx)
        slots = block * block_k + jnp.arange(block_k)
        if ring:
            # The slot of position p is p % capacity; unwritten slots come out negative.
            newest = start + chunk - 1
            positions = newest - (newest - slots) % capacity
        else:
            positions = slots
        return attend(carry, keys, values, positions, stored_end, read_stored)

    carry = (
        tuple(jnp.zeros((rows, plane_width), jnp.float32) for _ in range(num_planes)),
        jnp.full((rows,), tiles.MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    if ring:
        stored_blocks = (0, pl.cdiv(capacity, block_k))
    else:
        stored_blocks = (lowest // block_k, pl.cdiv(stored_end, block_k))
    carry = lax.fori_loop(*stored_blocks, stored_block, carry)

    if exact_chunk:
        padded_chunk = chunk_k_ref.shape[0]

        def chunk_block(block, carry):
            keys, values = (
                [
                    tiles.load_rows(ref, block, block_k, padded_chunk, pl.ds(p * plane_width, plane_width))
                    for p in range(num_planes)
                ]
                for ref in (chunk_k_ref, chunk_v_ref)
            )
            positions = start + block * block_k + jnp.arange(block_k)
            return attend(carry, keys, values, positions, last)

        chunk_lowest = jnp.maximum(lowest - start, 0)
        carry = lax.fori_loop(
            chunk_lowest // block_k, pl.cdiv(last - start, block_k), chunk_block, carry
        )

    if keeps:
        def full_block(read):
            def body(block, carry):
                keys, values = (
                    [
                        tiles.load_rows(ref, block, block_k, capacity, pl.ds(p * plane_width, plane_width))
                        for p in range(num_planes)
                    ]
                    for ref in (full_k_ref, full_v_ref)
                )
                return attend(carry, keys, values, block * block_k + jnp.arange(block_k), last, read)

            return body

        if keep_first:
            carry = lax.fori_loop(
                0, pl.cdiv(keep_first, block_k), full_block(lambda p, i: p < keep_first), carry
            )
        if keep_recent:
            newest_first = jnp.maximum(first - keep_recent + 1, 0)  # the oldest recent key of the block's first query
            carry = lax.fori_loop(
                newest_first // block_k, pl.cdiv(last, block_k),
                full_block(lambda p, i: (p >= keep_first) & (p > i - keep_recent)), carry,
            )

    outs, peak, total = carry
    # The sinks join the denominator only.
    sink = sinks_ref[...]
    best = jnp.maximum(peak, sink)
    rescale = jnp.exp(peak - best)
    denominator = total * rescale + jnp.exp(sink - best)
    denominator = jnp.where(denominator > 0, denominator, 1.0)
    for p in range(num_planes):
        o_ref[p] = outs[p] * (rescale / denominator)[:, None]


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "window", "ring", "keep_first", "keep_recent", "block_t", "block_k", "num_warps", "num_stages",
        "interpret",
    ),
)
def prefill_attention(
    q: jax.Array,
    k: QuantizedTensor,
    v: QuantizedTensor,
    start: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    ring: bool,
    sinks: jax.Array | None,
    chunk_k: jax.Array | None = None,
    chunk_v: jax.Array | None = None,
    full_k: jax.Array | None = None,
    full_v: jax.Array | None = None,
    keep_first: int = 0,
    keep_recent: int = 0,
    block_t: int | None = None,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, Hq, D]; k, v stored [B, Hkv, S, D]; start int32 [B];
    chunk_k, chunk_v None or float [B, T, Hkv, D] -> [B, T, Hq, D] in q's dtype.

    full_k, full_v: for a layer keeping positions, float [B, Hkv, S, D] full-precision
      values by position (`cache.kept_values`), read for positions p < keep_first and
      p > i - keep_recent of a query at i.

    block_t: chunk positions per program (default: 64 query rows' worth of the group).
    """
    codec = get_codec(k.fmt)
    batch, chunk, num_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    num_planes = codec.elements_per_datum
    group_rows = pl.next_power_of_2(group)
    if block_t is None:
        block_t = max(1, 64 // group_rows)
    block_t = max(block_t, pl.cdiv(_MIN_ROWS, group_rows))
    rows = block_t * group_rows
    num_blocks = pl.cdiv(chunk, block_t)
    padded_chunk = num_blocks * block_t
    compute_dtype = tiles.compute_dtype(k.fmt)
    exact_chunk = chunk_k is not None

    # [B, Hkv, P, T' * G', D/P]: position-major rows, the group padded to a power of two.
    qg = q.astype(jnp.float32) * (sm_scale * tiles.plane_factor(k))
    qg = qg.reshape(batch, chunk, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_chunk - chunk), (0, group_rows - group), (0, 0)))
    qg = qg.reshape(batch, kv_heads, padded_chunk * group_rows, head_dim)
    q_planes = tiles.split_planes(qg, num_planes).astype(compute_dtype)

    sink = jnp.full((kv_heads, group_rows), tiles.MASKED, jnp.float32)
    if sinks is not None:
        sink = sink.at[:, :group].set(sinks.astype(jnp.float32).reshape(kv_heads, group))
    sink = jnp.tile(sink, (1, block_t))  # [Hkv, rows], row r is head r % group_rows

    has_scales = k.scales is not None
    stored = [k.data, k.scales, v.data, v.scales] if has_scales else [k.data, v.data]

    def whole(x):
        return pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, t: (b, h) + (0,) * (x.ndim - 2))

    inputs = [start.astype(jnp.int32), q_planes, sink, *stored]
    in_specs = [
        pl.BlockSpec((None,), lambda b, h, t: (b,)),
        pl.BlockSpec((None, None, num_planes, rows, head_dim // num_planes), lambda b, h, t: (b, h, 0, t, 0)),
        pl.BlockSpec((None, rows), lambda b, h, t: (h, 0)),
        *[whole(x) for x in stored],
    ]

    def plane_rows(x, stored_tensor):
        """Full-precision rows [B, Hkv, N, D] as the kernel reads them: without the plane
        factor (as the planes are), plane p in columns [p * D/P, (p + 1) * D/P)."""
        x = x.astype(jnp.float32) / tiles.plane_factor(stored_tensor)
        planes = jnp.moveaxis(tiles.split_planes(x, num_planes), -3, -2)
        return planes.reshape(*x.shape).astype(compute_dtype)

    full_precision = []
    if exact_chunk:
        pad = ((0, 0), (0, 0), (0, padded_chunk - chunk), (0, 0))
        full_precision += [(jnp.pad(chunk_k.transpose(0, 2, 1, 3), pad), k), (jnp.pad(chunk_v.transpose(0, 2, 1, 3), pad), v)]
    if keep_first + keep_recent:
        full_precision += [(full_k, k), (full_v, v)]
    for x, stored_tensor in full_precision:
        x = plane_rows(x, stored_tensor)
        inputs.append(x)
        in_specs.append(whole(x))

    kernel = functools.partial(
        _kernel,
        codec=codec,
        has_scales=has_scales,
        exact_chunk=exact_chunk,
        keep_first=keep_first,
        keep_recent=keep_recent,
        chunk=chunk,
        block_t=block_t,
        block_k=block_k,
        group_rows=group_rows,
        capacity=capacity,
        window=window,
        ring=ring,
        compute_dtype=compute_dtype,
        ptx=not interpret,
    )
    plane_width = head_dim // num_planes
    out = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_blocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, num_planes, rows, plane_width), lambda b, h, t: (b, h, 0, t, 0)),
        out_shape=jax.ShapeDtypeStruct(
            (batch, kv_heads, num_planes, padded_chunk * group_rows, plane_width), jnp.float32
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"prefill_attention_{k.fmt}",
    )(*inputs)
    out = tiles.merge_planes(out) * tiles.plane_factor(v)  # [B, Hkv, T' * G', D]
    out = out.reshape(batch, kv_heads, padded_chunk, group_rows, head_dim)[:, :, :chunk, :group]
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, chunk, num_heads, head_dim).astype(q.dtype)
