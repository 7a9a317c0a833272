"""Prefill attention: a chunk of T new queries per sequence over the stored prefix plus
the chunk itself.

    out = prefill_attention(q, layer, start, sinks=None, sm_scale=None,
                            chunk_k=None, chunk_v=None, implementation=None)

What the chunk attends to for its own positions is a choice that matters for accuracy:
  - by default, its keys and values as stored in the cache (quantized), exactly what
    decode will read later, so prefill and decode see the same K/V and a prompt scored
    in one pass equals teacher-forced decode through the cache;
  - with `chunk_k`/`chunk_v` (the chunk's full-precision K/V), the chunk attends to
    those, and only the prefix before it comes from the cache.

Implementations:
  "reference"      float32 jnp: dequantize the layer, then attend (any backend).
  "pallas_triton"  fused dequantize-and-attend flash kernel; on CPU it runs in Pallas
                   interpret mode.
  "pallas_mosaic"  the same for packed FP4 caches on Hopper (Mosaic GPU lowering: TMA,
                   wgmma, a warpgroup decoding the cache for two computing ones); on
                   CPU it runs in Mosaic GPU interpret mode with one warpgroup. It
                   attends to the chunk as stored; over a layer keeping positions it
                   skips them, and XLA attends to them and merges (`kept_positions`).
The default on GPU is "pallas_mosaic" where it applies and "pallas_triton" otherwise
(for buffers its 32-bit offsets can address); "reference" elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fp4kv_jax.cache import LayerCache, to_stored_frame
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.prefill_attention import pallas_mosaic, pallas_triton, reference
from fp4kv_jax.rotation import hadamard_rotate

IMPLEMENTATIONS = ("reference", "pallas_triton", "pallas_mosaic")


def prefill_attention(
    q: jax.Array,
    layer: LayerCache,
    start: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sm_scale: float | None = None,
    chunk_k: jax.Array | None = None,
    chunk_v: jax.Array | None = None,
    full_k: jax.Array | None = None,
    full_v: jax.Array | None = None,
    implementation: str | None = None,
    **tuning,
) -> jax.Array:
    """Causal attention of q [B, T, Hq, D] at positions start + t over the layer.

    Args:
      q: float [B, T, Hq, D]; Hq a multiple of the layer's KV heads.
      layer: the layer's stored K and V, with the chunk's keys and values already
        written at positions start .. start + T - 1. Its `window` (each query sees the
        last W positions) is honoured; ring-buffer layers serve only T = 1.
      start: int32 [B], each sequence's length before the chunk.
      sinks: float [Hq] learned sink logits that join the softmax denominator only.
      sm_scale: softmax scale; default 1 / sqrt(D).
      chunk_k, chunk_v: both or neither; float [B, T, Hkv, D], the chunk's
        full-precision keys and values, attended instead of their stored copies.
      full_k, full_v: for a layer keeping positions in full precision
        (`LayerCache.keeps_positions`) and only then: float [B, Hkv, capacity, D], the
        full-precision keys and values by position (`fp4kv_jax.cache.kept_values`).
      implementation: one of IMPLEMENTATIONS, or None for the default above.
      **tuning: passed to the Pallas implementation (block_k and num_stages for both;
        block_t and num_warps for pallas_triton; feed_warpgroup,
        compute_warpgroups, ping_pong and programs for pallas_mosaic).

    Returns:
      [B, T, Hq, D] in q's dtype.
    """
    kept = tiles.kept_positions(layer, full_k, full_v)
    implementation = implementation or _default_implementation(q, layer, chunk_k)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: unknown {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}."
        )
    _check(q, layer, start, sinks, chunk_k, chunk_v)
    if kept and chunk_k is not None:
        raise ValueError("chunk_k, chunk_v: a layer keeping positions in full precision takes full_k, full_v instead.")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if chunk_k is not None:
        chunk_k, chunk_v = to_stored_frame(layer, chunk_k, chunk_v)
    if layer.keys_rotated:
        q = hadamard_rotate(q)  # scores are unchanged: (q H) . (k H) = q . k
    args = dict(
        sm_scale=sm_scale, window=layer.window, ring=layer.ring, sinks=sinks, chunk_k=chunk_k,
        chunk_v=chunk_v,
    )
    if implementation != "reference":
        tiles.refuse_per_channel_keys(layer, implementation)
        tiles.check_one_format(layer.k, layer.v, arg="layer")
    kept_args = dict(zip(("full_k", "full_v", "keep_first", "keep_recent"), kept)) if kept else {}
    if implementation == "reference":
        if tuning:
            raise ValueError(f"tuning: the reference takes none, got {sorted(tuning)}.")
        out = reference.prefill_attention(
            q, layer.k, layer.v, start, kept=kept, keys_per_channel=layer.keys_per_channel, **args
        )
    elif implementation == "pallas_mosaic":
        if chunk_k is not None or layer.ring:
            raise ValueError(
                "implementation: 'pallas_mosaic' attends to the chunk as stored in a layer that is "
                "not a ring buffer (no chunk_k, chunk_v); use 'pallas_triton'."
            )
        out = pallas_mosaic.prefill_attention(
            q, layer.k, layer.v, start, sm_scale=sm_scale, window=layer.window, sinks=sinks,
            interpret=not tiles.on_gpu(), **kept_args, **tuning,
        )
    else:
        interpret = tiles.interpret_mode(layer.k, layer.v, arg="layer")
        out = pallas_triton.prefill_attention(
            q, layer.k, layer.v, start, interpret=interpret, **args, **kept_args, **tuning
        )
    return tiles.output_from_stored_values(out, layer).astype(q.dtype)


def _default_implementation(q, layer: LayerCache, chunk_k) -> str:
    implementation = tiles.default_attention_implementation(layer)
    if implementation != "pallas_triton" or layer.ring or chunk_k is not None:
        return implementation
    try:
        pallas_mosaic.check_supported(layer.k, q.shape[2] // layer.k.shape[1])
    except ValueError:
        return implementation
    return "pallas_mosaic"


def _check(q, layer, start, sinks, chunk_k, chunk_v):
    if q.ndim != 4:
        raise ValueError(f"q: expected [batch, T, heads, head_dim], got shape {q.shape}.")
    batch, chunk, num_heads, head_dim = q.shape
    cache_batch, kv_heads, _, cache_dim = layer.k.shape
    if (batch, head_dim) != (cache_batch, cache_dim):
        raise ValueError(
            f"q: shape {q.shape} does not match the cache's batch {cache_batch} and "
            f"head_dim {cache_dim}."
        )
    if num_heads % kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of the {kv_heads} KV heads.")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q: expected a floating-point dtype, got {q.dtype}.")
    if layer.ring and chunk > 1:
        raise ValueError(
            "layer: a ring-buffer (trimmed sliding-window) layer cannot serve a prefill "
            f"chunk of {chunk} tokens: later tokens overwrite keys that earlier ones "
            "attend to. Build the cache without trim_sliding_layers, or feed one token at a time."
        )
    if start.shape != (batch,):
        raise ValueError(f"start: expected shape ({batch},), got {start.shape}.")
    if sinks is not None and sinks.shape != (num_heads,):
        raise ValueError(f"sinks: expected shape ({num_heads},), got {sinks.shape}.")
    tiles.refuse_sinks_over_centered_layer(layer, sinks)
    if (chunk_k is None) != (chunk_v is None):
        raise ValueError("chunk_k, chunk_v: pass both or neither.")
    expected = (batch, chunk, kv_heads, head_dim)
    for name, x in (("chunk_k", chunk_k), ("chunk_v", chunk_v)):
        if x is not None and x.shape != expected:
            raise ValueError(f"{name}: expected shape {expected}, got {x.shape}.")
