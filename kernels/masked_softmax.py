"""The softmax every attention reference shares: masked, with optional sink logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(scores: jax.Array, mask: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Softmax of float32 scores [..., S] over the positions where `mask` holds.

    `sinks`, broadcastable to [..., 1], are extra logits that join the denominator
    only (GPT-OSS's attention sinks). A row with nothing attended gives zeros.
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    if sinks is not None:
        peak = jnp.maximum(peak, sinks)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    denominator = jnp.sum(weights, axis=-1, keepdims=True)
    if sinks is not None:
        denominator += jnp.exp(sinks - peak)
    return weights / jnp.where(denominator > 0, denominator, 1.0)
