"""Prefill attention: a chunk of T new queries per sequence over the stored prefix plus
the chunk itself, read as stored in the cache (so prefill and decode see the same K/V).

    out = prefill_attention(q, layer, start, sinks=None, sm_scale=None)

Only the float32 `reference` implementation exists so far; the fused Pallas kernels
are the prefill issue's work.
"""

from __future__ import annotations

import math

import jax

from fp4kv_jax.cache import LayerCache
from fp4kv_jax.kernels.prefill_attention import reference


def prefill_attention(
    q: jax.Array,
    layer: LayerCache,
    start: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Causal attention of q [B, T, Hq, D] at positions start + t over the layer.

    The chunk's keys and values must already be written to the layer at positions
    start .. start + T - 1. Returns [B, T, Hq, D] in q's dtype.
    """
    if layer.ring and q.shape[1] > 1:
        raise ValueError(
            "layer: a ring-buffer (trimmed sliding-window) layer cannot serve a prefill "
            f"chunk of {q.shape[1]} tokens: later tokens overwrite keys that earlier ones "
            "attend to. Build the cache without trim_sliding_layers, or feed one token at a time."
        )
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    out = reference.prefill_attention(
        q, layer.k, layer.v, start, sm_scale=sm_scale, window=layer.window, ring=layer.ring,
        sinks=sinks,
    )
    return out.astype(q.dtype)
