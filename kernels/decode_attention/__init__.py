"""Decode attention: one new query per sequence over a stored cache layer.

    out = decode_attention(q, layer, lengths, sinks=None, sm_scale=None, implementation=None)

Implementations:
  "reference"      float32 jnp: dequantize the layer, then attend (any backend).
  "pallas_triton"  fused dequantize-and-attend kernel (Triton lowering); on CPU it runs
                   in Pallas interpret mode.
  "pallas_mosaic"  the same for packed FP4 caches on Hopper (Mosaic GPU lowering: TMA,
                   decode into shared memory, wgmma); on CPU it runs in Mosaic GPU
                   interpret mode.
  "pallas_mosaic_warp"  the same for bf16, fp16, fp8 and packed FP4 caches, one warp a
                   split, decoding into mma.sync's registers (Mosaic GPU lowering,
                   inline PTX); GPU only.
On GPU the default is the first of "pallas_mosaic_warp" and "pallas_mosaic" that
handles the layer (the fastest, then the next: docs/benchmarks.md), else
"pallas_triton" (for buffers its 32-bit offsets can address); "reference" elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fp4kv_jax.cache import LayerCache, kept_values
from fp4kv_jax.kernels import tiles
from fp4kv_jax.kernels.decode_attention import pallas_mosaic, pallas_mosaic_warp, pallas_triton, reference
from fp4kv_jax.kernels.prefill_attention import reference as prefill_reference
from fp4kv_jax.rotation import hadamard_rotate

IMPLEMENTATIONS = ("reference", "pallas_triton", "pallas_mosaic", "pallas_mosaic_warp")


def decode_attention(
    q: jax.Array,
    layer: LayerCache,
    lengths: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sm_scale: float | None = None,
    implementation: str | None = None,
    **tuning,
) -> jax.Array:
    """Attention of each sequence's newest query over its cached keys and values.

    Args:
      q: float [B, Hq, D], the query at position lengths - 1 (its own K/V already
        written to the cache). Hq must be a multiple of the layer's KV heads (GQA;
        Hkv = 1 is MQA).
      layer: the layer's stored K and V; its `window` (last W positions attended) and
        `ring` layout are honoured, and so are the positions it keeps in full precision
        (`LayerCache.kept_k`, written with the query's own K/V: the copies then hold
        exactly the positions this query reads from them).
      lengths: int32 [B], valid positions per sequence (each >= 1).
      sinks: float [Hq] learned sink logits that join the softmax denominator only.
      sm_scale: softmax scale; default 1 / sqrt(D).
      implementation: one of IMPLEMENTATIONS, or None for the default above. Layers
        whose keys have per-channel scales are read by the reference only.
      **tuning: passed to the Pallas implementation (num_splits for all; block_k and
        num_stages for pallas_triton and pallas_mosaic, num_warps for pallas_triton;
        block, prefetch and warpgroups for pallas_mosaic_warp).

    Returns:
      [B, Hq, D] in q's dtype.
    """
    implementation = implementation or _default_implementation(q, layer)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: unknown {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}."
        )
    batch, num_heads, head_dim = _check(q, layer, lengths, sinks)
    if implementation != "reference":
        tiles.refuse_per_channel_keys(layer, implementation)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if layer.keys_rotated:
        q = hadamard_rotate(q)  # scores are unchanged: (q H) . (k H) = q . k
    args = dict(sm_scale=sm_scale, window=layer.window, ring=layer.ring, sinks=sinks)
    kept = layer if layer.keeps_positions else None
    if implementation == "reference":
        if tuning:
            raise ValueError(f"tuning: the reference takes none, got {sorted(tuning)}.")
        if layer.keeps_positions:  # one query at position lengths - 1: a prefill of one token
            nothing_new = jnp.zeros((batch, 0, layer.k.shape[1], head_dim))
            full_k, full_v = kept_values(layer, lengths, nothing_new, nothing_new)
            out = prefill_reference.prefill_attention(
                q[:, None], layer.k, layer.v, lengths - 1, kept=(full_k, full_v, layer.keep_first, layer.keep_recent),
                keys_per_channel=layer.keys_per_channel, **args,
            )[:, 0]
        else:
            out = reference.decode_attention(q, layer.k, layer.v, lengths, **args)
    elif implementation == "pallas_mosaic_warp":
        tiles.check_one_format(layer.k, layer.v, arg="layer")
        if not tiles.on_gpu():
            raise ValueError(
                "implementation: 'pallas_mosaic_warp' runs on GPUs only (inline PTX, no interpret mode)."
            )
        out = pallas_mosaic_warp.decode_attention(q, layer.k, layer.v, lengths, kept=kept, **args, **tuning)
    elif implementation == "pallas_mosaic":
        tiles.check_one_format(layer.k, layer.v, arg="layer")
        interpret = not tiles.on_gpu()
        out = pallas_mosaic.decode_attention(
            q, layer.k, layer.v, lengths, interpret=interpret, kept=kept, **args, **tuning
        )
    else:
        tiles.check_one_format(layer.k, layer.v, arg="layer")
        interpret = tiles.interpret_mode(layer.k, layer.v, arg="layer")
        out = pallas_triton.decode_attention(
            q, layer.k, layer.v, lengths, interpret=interpret, kept=kept, **args, **tuning
        )
    return tiles.output_from_stored_values(out, layer).astype(q.dtype)


def _default_implementation(q, layer: LayerCache) -> str:
    implementation = tiles.default_attention_implementation(layer)
    if implementation != "pallas_triton":
        return implementation
    for name, kernel in (("pallas_mosaic_warp", pallas_mosaic_warp), ("pallas_mosaic", pallas_mosaic)):
        try:
            kernel.check_supported(layer.k, q.shape[1] // layer.k.shape[1])
        except ValueError:
            continue
        return name
    return implementation


def _check(q, layer, lengths, sinks):
    if q.ndim != 3:
        raise ValueError(f"q: expected [batch, heads, head_dim], got shape {q.shape}.")
    batch, num_heads, head_dim = q.shape
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
    if lengths.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {lengths.shape}.")
    if sinks is not None and sinks.shape != (num_heads,):
        raise ValueError(f"sinks: expected shape ({num_heads},), got {sinks.shape}.")
    tiles.refuse_sinks_over_centered_layer(layer, sinks)
    return batch, num_heads, head_dim
